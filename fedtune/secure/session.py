"""The public context of a protocol round and the client's private state between its steps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from fedtune.secure import identity

DOMAIN = b"fedtune-secagg-v1"


class ProtocolError(ValueError):
    """A protocol step cannot go on safely (too few clients, a bad signature, an inconsistent request)."""


@dataclass(frozen=True)
class Session:
    """What binds a protocol message to one round of one run."""

    run_nonce: str
    server_round: int

    def context(self, purpose: str, *parts: str) -> bytes:
        """Unambiguous bytes naming the run, the round, a purpose and the parties (length-prefixed)."""
        fields = [self.run_nonce, str(self.server_round), purpose, *parts]
        return DOMAIN + b"".join(len(f.encode()).to_bytes(4, "big") + f.encode() for f in fields)

    def reply_signed_bytes(self, message_type: str, client: str, digest: str) -> bytes:
        """What a node signs for its reply with content digest ``digest`` (hex) to a ``message_type`` message:
        checked by the server on receipt (fedtune/wire.py) and by an auditor in the ledger later."""
        return self.context("reply", message_type, client, digest)


RING_SECRET_BYTES = 32


def ring_commitment(session: Session, client: str, secret: bytes) -> bytes:
    """The hash commitment to a client's ring secret that its signed round keys carry."""
    return hashlib.sha256(session.context("ring-commitment", client, secret.hex())).digest()


@dataclass(frozen=True)
class KeyBundle:
    """A client's public keys for one round and its commitment to a ring secret, signed by its identity key."""

    client: str
    encryption_key: bytes
    mask_key: bytes
    ring_commitment: bytes
    signature: bytes

    def signed_bytes(self, session: Session) -> bytes:
        """What the signature covers."""
        return session.context(
            "keys", self.client, self.encryption_key.hex(), self.mask_key.hex(), self.ring_commitment.hex()
        )

    def verify(self, session: Session, public_hex: str | None) -> None:
        """Raise ProtocolError unless signed by ``public_hex`` for this session."""
        if public_hex is None or not identity.verify(public_hex, self.signature, self.signed_bytes(session)):
            raise ProtocolError(f"The round keys of {self.client} are not signed by its known identity key.")

    def to_json(self) -> str:
        """Wire form."""
        return json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> KeyBundle:
        """Parse the wire form."""
        data = json.loads(text)
        return cls(
            str(data["client"]),
            bytes.fromhex(data["encryption_key"]),
            bytes.fromhex(data["mask_key"]),
            bytes.fromhex(data["ring_commitment"]),
            bytes.fromhex(data["signature"]),
        )


def view_digest(session: Session, bundles: Iterable[KeyBundle]) -> str:
    """Names the set of round keys a client was shown (U1), the same for everyone shown the same set (hex)."""
    digest = hashlib.sha256(session.context("view"))
    for bundle in sorted(bundles, key=lambda b: b.client):
        signed = bundle.signed_bytes(session)
        digest.update(len(signed).to_bytes(4, "big") + signed)
    return digest.hexdigest()


def dealing_view(session: Session, bundles: Iterable[KeyBundle], groups: Iterable[Iterable[str]] | None) -> str:
    """Names what a client deals its shares for: the round keys it was shown (U1) and, when masked within fixed
    groups, the grouping (hex). Every share is sealed under it, so a peer shown anything else cannot open it."""
    grouping = "" if groups is None else json.dumps(sorted(sorted(group) for group in groups))
    return hashlib.sha256(session.context("dealing", view_digest(session, bundles), grouping)).hexdigest()


@dataclass(frozen=True)
class RingReveal:
    """A client's ring secret, revealed once the round's clients (U1) are fixed and signed with the digest of
    the keys it was shown: the SecAgg+ ring is ordered by the secrets of all of U1 (fedtune/secure/masking.py)."""

    client: str
    secret: bytes
    signature: bytes

    def signed_bytes(self, session: Session, view: str) -> bytes:
        """What the signature covers: the secret, and the view it was revealed for."""
        return session.context("ring-reveal", self.client, view, self.secret.hex())

    def verify(self, session: Session, view: str, public_hex: str | None, bundle: KeyBundle) -> None:
        """Raise ProtocolError unless this is the secret ``bundle`` committed to, revealed for ``view`` by the
        holder of ``public_hex``."""
        if len(self.secret) != RING_SECRET_BYTES:
            raise ProtocolError(f"The ring secret of {self.client} is not {RING_SECRET_BYTES} bytes.")
        if public_hex is None or not identity.verify(public_hex, self.signature, self.signed_bytes(session, view)):
            raise ProtocolError(
                f"The ring secret of {self.client} was not revealed by it for the clients this node was shown."
            )
        if ring_commitment(session, self.client, self.secret) != bundle.ring_commitment:
            raise ProtocolError(f"The ring secret of {self.client} does not match its commitment.")

    def to_json(self) -> str:
        """Wire form."""
        return json.dumps({"client": self.client, "secret": self.secret.hex(), "signature": self.signature.hex()})

    @classmethod
    def from_json(cls, text: str) -> RingReveal:
        """Parse the wire form."""
        data = json.loads(text)
        return cls(str(data["client"]), bytes.fromhex(data["secret"]), bytes.fromhex(data["signature"]))


@dataclass
class ClientRound:
    """One client's secrets and view of a round, kept between protocol steps and erased after unmasking."""

    session: Session
    client: str
    encryption_private: bytes
    mask_private: bytes
    threshold: int = 0
    self_seed: bytes = b""
    peers: dict[str, KeyBundle] = field(default_factory=dict)  # this client's neighbourhood in U1, self included
    shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (share of b, share of mask key)
    uploaders: list[str] = field(default_factory=list)  # U2 as announced at the upload step
    round_size: int = 0  # |U1|: every client whose keys were verified, neighbours or not (fixes the code's scale)
    ring_secret: bytes = b""  # committed to in the round keys, revealed once U1 is fixed (SecAgg+ rings)
    ring_view: str = ""  # the U1 (view_digest) this client revealed its ring secret for; "" before
    view: str = ""  # what it dealt its shares for (dealing_view); "" before it deals
    identities: dict[str, str] = field(default_factory=dict)  # its peers' identity keys (hex), itself included
    agreed: str = ""  # the unmask lists it signed (the consistency check); "" before
    grouped: bool = False  # its peers are its fixed group (contribution accounting): its sum is the group's

    def to_json(self) -> str:
        """Serialised for Flower's Context.state (the client's memory between messages)."""
        return json.dumps(
            {
                "session": asdict(self.session),
                "client": self.client,
                "encryption_private": self.encryption_private.hex(),
                "mask_private": self.mask_private.hex(),
                "threshold": self.threshold,
                "self_seed": self.self_seed.hex(),
                "peers": {k: b.to_json() for k, b in self.peers.items()},
                "shares": {k: [b.hex(), s.hex()] for k, (b, s) in self.shares.items()},
                "uploaders": self.uploaders,
                "round_size": self.round_size,
                "ring_secret": self.ring_secret.hex(),
                "ring_view": self.ring_view,
                "view": self.view,
                "identities": self.identities,
                "agreed": self.agreed,
                "grouped": self.grouped,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ClientRound:
        """Parse :meth:`to_json`."""
        data = json.loads(text)
        return cls(
            Session(**data["session"]),
            data["client"],
            bytes.fromhex(data["encryption_private"]),
            bytes.fromhex(data["mask_private"]),
            data["threshold"],
            bytes.fromhex(data["self_seed"]),
            {k: KeyBundle.from_json(v) for k, v in data["peers"].items()},
            {k: (bytes.fromhex(b), bytes.fromhex(s)) for k, (b, s) in data["shares"].items()},
            data["uploaders"],
            data["round_size"],
            bytes.fromhex(data["ring_secret"]),
            data["ring_view"],
            data["view"],
            data["identities"],
            data["agreed"],
            data["grouped"],
        )
