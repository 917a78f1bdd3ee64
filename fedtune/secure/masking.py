"""Secure aggregation by masking (SecAgg: Bonawitz et al. 2017, https://eprint.iacr.org/2017/281), without Flower.

The server learns the sum of the sampled clients' encoded updates and nothing else about any one of
them. One round, as the server (fedtune/secure_server.py) and each client (fedtune/secure_client.py) run it
(U1 ⊇ U2 ⊇ U3 are the clients still present):

1. **keys**: each client makes two X25519 key pairs for this round (one to encrypt shares, one to agree
   masks) and a random ring secret, and signs the public halves and a commitment to the secret with its
   long-term Ed25519 identity (bound to run and round).
2. **shares**: each client checks every peer's signed keys, picks a random self-mask seed ``b``, splits
   ``b`` and its mask private key into Shamir shares (threshold t of |U1|), and sends each peer its
   shares encrypted with AES-GCM under their pairwise key, through the server (which cannot read them).
   It commits to ``b`` (SHA-256), so a wrong reconstruction is caught, and to every share it dealt
   (:func:`share_commitment`), so a client that later reveals a wrong share is caught and left out.
3. **masked input**: each client uploads ``y = x + PRG(b) + sum_v ±PRG(s_uv)`` mod 2^32, where ``x`` is its
   fixed-point update (fedtune/secure/fixed_point.py) and ``s_uv`` the seed it agrees with peer ``v``
   (``+`` if its name sorts before ``v``'s, ``-`` after); the pairwise masks cancel in the sum. A peer whose
   share this client cannot open, or that does not match the peer's commitment, is left out of its masks
   and named in the upload: the server then treats that peer as dropped, not this client.
4. **agree, then unmask**: the server names the survivors (U3) and those that dropped after step 2; each
   client signs these lists, once per round (the consistency check of Bonawitz et al.), and reveals only
   for the lists it signed, once the server shows it valid signatures on them from t of its peers. Then for
   each client in U3 the survivors reveal their share of its ``b``; for each client that dropped they reveal
   their share of its mask private key, so the server can recompute and remove its pairwise masks. A client
   never reveals both for the same peer and refuses to unmask with fewer than t survivors; with t > |U1|/2
   the server can collect t shares of both neither from a split set nor by telling clients different
   stories (two stories cannot both gather t signatures).
   A node uploads at most once per round of an experiment (fedtune/secure/uploads.py): a second masked
   upload would be a two-time pad, and a second sum of the round over other clients a difference attack.

Every share is sealed under what its dealer was shown (the round keys and any fixed groups: ``dealing_view``),
so a peer shown another round cannot open it and leaves the dealer out of its masks; a client deals one
round's keys for one view only.

Steps 1 and 2 do not depend on the round's model, so the server pipelines them (fedtune/secure_server.py):
a client's keys for round r+1 travel in its round-r upload and its shares for r+1 in its round-r unmask
reply, each still signed and bound to round r+1; the protocol itself is unchanged.

"Peers" are all other clients, or with ``neighbours: k`` only k of them (SecAgg+, fedtune/secure/graph.py):
masks, shares and the threshold then apply per neighbourhood, and a client's cost grows with k, not n.
Whoever orders the ring chooses a client's neighbours, so no one may: between steps 1 and 2 a SecAgg+
round has a **ring** step (:func:`reveal_ring`). Each client is shown U1, the round keys the server
forwards, and reveals its ring secret, signed together with a digest of that U1 (once per round: shown
another U1 it refuses); the ring is ordered by a hash of the secrets of all of U1, and at step 2 each client
checks every secret against its commitment and its signature against the same U1. The server fixes U1
before any secret is out, so it cannot search subsets of U1 for an order that puts its accomplices around
a victim (a coin toss by commitment, Blum 1983). A node's secret for a round is fixed (derived from its
identity key) and it reveals it for one set of clients per round of its experiment, whatever the run
(fedtune/secure/uploads.py): the server gets one ring per round number, and can only abandon a round
and try the next.

Trust: the server is honest-but-curious about contents. A deployed node takes its peers' identity keys
only from its own list (node config ``trusted-keys``), so the server cannot invent peers. Secrets live
only in the client's memory (Flower's Context.state) and are erased when the round's unmask step is
answered, or when the node makes keys for a later round (a round it dropped out of).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedtune.secure import graph, identity, primitives, shamir
from fedtune.secure.fixed_point import FixedPoint
from fedtune.secure.identity import Identity
from fedtune.secure.session import (
    DOMAIN,
    RING_SECRET_BYTES,
    ClientRound,
    KeyBundle,
    ProtocolError,
    RingReveal,
    Session,
    dealing_view,
    ring_commitment,
    view_digest,
)

T = TypeVar("T")

# The smallest masked round a node takes part in unless its node config says otherwise (min-round-clients):
# a round of two is a victim and, possibly, the server's accomplice.
MIN_ROUND_CLIENTS = 3


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation by pairwise masking with dropout recovery (config group ``secure=masking``).

    Args:
        threshold: Fraction of a round's clients whose shares are needed to unmask (t = ceil(threshold * n),
            at least 2). Must exceed 0.5; up to n - t clients may drop out after sharing keys.
        value_range: Largest absolute value of one update coordinate (an update outside it is refused, not clipped).
        max_examples: Largest training example count of one client (the weight of its update).
        neighbours: Mask with and share secrets among only this many peers (even, >= 2; SecAgg+ for large
            rounds, where O(log n) suffices); None = every other client of the round.

    Raises:
        ValueError: An out-of-range value.
    """

    threshold: float = 0.6
    value_range: float = 1.0
    max_examples: int = 100_000
    neighbours: int | None = None

    masked = True

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1:
            raise ValueError(
                f"secure.threshold={self.threshold}: must lie in (0.5, 1]; at or below one half a server could "
                "collect the shares of both masks of one client from two halves of the round."
            )
        if not self.value_range > 0:
            raise ValueError(f"secure.value_range={self.value_range}: must be positive.")
        if not self.max_examples >= 1:
            raise ValueError(f"secure.max_examples={self.max_examples}: must be at least 1.")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(
                f"secure.neighbours={self.neighbours}: must be an even number >= 2 (half on each side of a "
                "client on the ring), or null for every other client."
            )

    def min_survivors(self, group: int) -> int:
        """t: members of a group (a client and its peers) that must stay to the end (never fewer than 2)."""
        return max(2, math.ceil(self.threshold * group - 1e-9))

    def round_minimum(self, num_clients: int) -> int:
        """Clients a round needs at every step (with neighbourhoods, each must also keep its own t)."""
        group = num_clients if self.neighbours is None else min(num_clients, self.neighbours + 1)
        return self.min_survivors(group)

    def uses_ring(self, round_size: int) -> bool:
        """Whether a round of ``round_size`` clients masks on a ring (and so has the ring step)."""
        return self.neighbours is not None and self.neighbours < round_size - 1

    def peers(
        self,
        bundles: Mapping[str, KeyBundle],
        ring: Mapping[str, RingReveal] | None = None,
        groups: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, frozenset[str]]:
        """Each client's peers in the round of these verified round keys: all others, its neighbours on the
        ring ordered by every client's revealed ring secret (``ring``, already verified), or the other members
        of its fixed group (``groups``: contribution accounting; the server then learns each group's sum).

        Raises:
            ProtocolError: A ring round without the secret of each of its clients, or a client in no group
                or in two.
        """
        names = sorted(bundles)
        if groups is not None:
            holding = {name: [g for g in groups if name in g] for name in names}
            if any(len(found) != 1 for found in holding.values()):
                raise ProtocolError("Every client of a grouped round must be in exactly one group.")
            return {name: frozenset(holding[name][0]) & frozenset(names) - {name} for name in names}
        if not self.uses_ring(len(names)):
            return {name: frozenset(names) - {name} for name in names}
        if ring is None or set(ring) != set(names):
            raise ProtocolError("A SecAgg+ ring needs the revealed ring secret of every client of the round.")
        digest = hashlib.sha256(DOMAIN + b"ring")
        for name in names:
            digest.update(len(name.encode()).to_bytes(4, "big") + name.encode() + ring[name].secret)
        return graph.ring_neighbourhoods(names, self.neighbours, digest.digest())

    def fixed_point(self, round_size: int, unit_weights: bool) -> FixedPoint:
        """The round's code, the same for every client and the server: its scale keeps the sum of all
        ``round_size`` clients of the round (U1, not one neighbourhood) from overflowing. ``unit_weights``
        when every update counts once (organisation-level DP)."""
        return FixedPoint.for_round(self.value_range, 1 if unit_weights else self.max_examples, round_size)

    def describe(self) -> str:
        """One line for the model card."""
        return (
            f"masking (SecAgg with Shamir dropout recovery, threshold {self.threshold}, "
            f"{'all peers' if self.neighbours is None else f'{self.neighbours} neighbours'}): the server saw only "
            f"the sum of the updates; values within ±{self.value_range}, fixed point mod 2^32."
        )


def advertise_keys(
    session: Session, client: str, signer: Identity, ring_secret: bytes | None = None
) -> tuple[ClientRound, KeyBundle]:
    """Step 1 (client): fresh round keys and their signed public halves, with a commitment to ``ring_secret``
    (a node derives it per round of its experiment, fedtune/secure_client.py; random if None)."""
    encryption_private, _ = primitives.x25519_keypair()
    mask_private, _ = primitives.x25519_keypair()
    if ring_secret is None:
        ring_secret = secrets.token_bytes(RING_SECRET_BYTES)
    state = ClientRound(session, client, encryption_private, mask_private, ring_secret=ring_secret)
    return state, signed_bundle(state, signer)


def signed_bundle(state: ClientRound, signer: Identity) -> KeyBundle:
    """The signed public halves of ``state``'s round keys (the same every time: Ed25519 is deterministic)."""
    unsigned = _unsigned_bundle(state)
    return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_bytes(state.session)))


def _unsigned_bundle(state: ClientRound) -> KeyBundle:
    return KeyBundle(
        state.client,
        primitives.x25519_public(state.encryption_private),
        primitives.x25519_public(state.mask_private),
        ring_commitment(state.session, state.client, state.ring_secret),
        b"",
    )


def reveal_ring(
    state: ClientRound,
    bundles: list[KeyBundle],
    identities: Mapping[str, str],
    signer: Identity,
    config: SecureAggregation,
) -> RingReveal:
    """The ring step (client, SecAgg+ only): this client's ring secret, signed with the digest of the round keys
    it was shown. Shown other keys later in the round, it refuses: a second set would let the server see
    the secrets first and then choose the clients, and so the ring (a node also keeps, on its disk, the set
    of clients it revealed for in each round of its experiment: fedtune/secure/uploads.py).

    Raises:
        ProtocolError: The keys do not verify (as in :func:`share_keys`), this round is not a ring round, or
            this client already revealed its secret for other keys.
    """
    if not config.uses_ring(len(bundles)):
        raise ProtocolError(f"A round of {len(bundles)} clients has no ring (secure.neighbours={config.neighbours}).")
    _verified_bundles(state, bundles, identities)
    view = view_digest(state.session, bundles)
    if state.ring_view and state.ring_view != view:
        raise ProtocolError(
            "This node already revealed its ring secret in this round for another set of clients; a second set "
            "would let the server choose the ring after seeing the secrets. Refused."
        )
    state.ring_view = view
    unsigned = RingReveal(state.client, state.ring_secret, b"")
    return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_bytes(state.session, view)))


_SHARED = ("seed", "mask_key")  # what a client shares, in the order its two commitments per recipient are joined
_DIGEST_HEX = 64
COMMITMENTS_HEX = len(_SHARED) * _DIGEST_HEX  # length of one recipient's joined share commitments


def share_commitment(session: Session, dealer: str, recipient: str, kind: str, share: bytes) -> str:
    """A hash commitment to one Shamir share (hex), published by its dealer: a revealed share is checked
    against it, so a client that reveals a wrong share is caught and left out. Shares are uniformly random
    field elements, so the commitment tells nothing about the secret."""
    return hashlib.sha256(session.context("share-commitment", dealer, recipient, kind, share.hex())).hexdigest()


def share_keys(
    state: ClientRound,
    bundles: list[KeyBundle],
    identities: Mapping[str, str],
    config: SecureAggregation,
    ring: Mapping[str, RingReveal] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> tuple[dict[str, bytes], bytes, dict[str, str]]:
    """Step 2 (client): encrypted shares for every peer, the commitment to the self-mask seed, and a
    commitment to each share (recipient -> seed-share and key-share commitments, hex, joined). In a ring
    round, ``ring`` holds every client's revealed ring secret, which orders the ring; in a grouped round,
    ``groups`` the fixed groups (the caller checks them: fedtune/secure_client.py), whose members mask only
    with each other.

    Raises:
        ProtocolError: A peer's keys are not validly signed, this client's own keys were altered, names
            repeat, fewer than t clients take part, or (ring rounds) these are not the keys this client
            revealed its ring secret for, or a secret is missing, uncommitted or revealed for other keys.
    """
    peers = _verified_bundles(state, bundles, identities)
    view = view_digest(state.session, bundles)
    if (state.ring_view or config.uses_ring(len(peers))) and state.ring_view != view:
        raise ProtocolError(
            "The server asks for shares among other clients than those this node revealed its ring secret for."
        )
    if config.uses_ring(len(peers)):
        for name, reveal in (ring or {}).items():
            if name not in peers or reveal.client != name:
                raise ProtocolError(f"A ring secret for {name}, who is not in this round.")
            reveal.verify(state.session, view, identities.get(name), peers[name])
    dealing = dealing_view(state.session, bundles, groups)
    if state.view and state.view != dealing:
        raise ProtocolError(
            "This node already dealt its shares in this round for other clients or groups; a second dealing of the "
            "same keys would let the server rebuild its secrets from two sets of peers. Ask for fresh round keys."
        )
    names = sorted(config.peers(peers, ring, groups)[state.client] | {state.client})
    state.grouped = groups is not None
    state.threshold = config.min_survivors(len(names))
    if len(names) < state.threshold:
        raise ProtocolError(f"{len(names)} clients in the round, fewer than the threshold t={state.threshold}.")
    state.peers = {name: peers[name] for name in names}
    state.identities = {name: identities[name] for name in names}  # _verified_bundles checked each one
    state.view = dealing
    state.round_size = len(peers)
    state.self_seed = secrets.token_bytes(shamir.SECRET_BYTES)
    seed_shares = shamir.split(state.self_seed, state.threshold, len(names))
    key_shares = shamir.split(state.mask_private, state.threshold, len(names))
    sealed, committed = {}, {}
    for name, seed_share, key_share in zip(names, seed_shares, key_shares, strict=True):
        committed[name] = _share_commitments(state.session, state.client, name, seed_share, key_share)
        if name == state.client:
            state.shares[name] = (seed_share, key_share)
        else:
            key = _share_key(state, name)
            sealed[name] = primitives.seal(  # bound to the view: a peer shown another round cannot open it
                key, seed_share + key_share, state.session.context("share", state.client, name, state.view)
            )
    return sealed, hashlib.sha256(state.self_seed).digest(), committed


def _verified_bundles(
    state: ClientRound, bundles: list[KeyBundle], identities: Mapping[str, str]
) -> dict[str, KeyBundle]:
    """The round keys by client, once their names are unique, this client's own are unchanged, and each is
    signed by its client's identity key in ``identities``."""
    peers = {bundle.client: bundle for bundle in bundles}
    if len(peers) != len(bundles):
        raise ProtocolError("Two key bundles carry the same client name.")
    own = peers.get(state.client)
    if own is None or dataclasses.replace(own, signature=b"") != _unsigned_bundle(state):
        raise ProtocolError("The server did not forward this client's own round keys unchanged.")
    for bundle in bundles:
        bundle.verify(state.session, identities.get(bundle.client))
    return peers


def _share_commitments(session: Session, dealer: str, recipient: str, seed_share: bytes, key_share: bytes) -> str:
    shares = (seed_share, key_share)
    return "".join(share_commitment(session, dealer, recipient, k, v) for k, v in zip(_SHARED, shares, strict=True))


def mask_update(
    state: ClientRound,
    sealed_for_me: Mapping[str, bytes],
    committed_for_me: Mapping[str, str],
    survivors: list[str],
    encoded: np.ndarray,
) -> tuple[np.ndarray, list[str]]:
    """Step 3 (client): store the shares peers sent, and mask the encoded update.

    ``survivors`` is U2, the clients that shared keys; this client masks with its peers among them, except a
    peer whose share is missing, does not authenticate or does not match that peer's published commitment
    (``committed_for_me``): that peer is treated as dropped (its dealing is bad; this client stays).

    Returns:
        The masked update, and the peers left out (the server must treat them as dropped).

    Raises:
        ProtocolError: Too few of this client's group are left.
    """
    present = _present_peers(state, survivors, "uploaders")
    state.uploaders = sorted(survivors)
    excluded = []
    for name in present:
        if name == state.client:
            continue
        share = _open_share(state, name, sealed_for_me.get(name), committed_for_me.get(name))
        if share is None:
            excluded.append(name)
        else:
            state.shares[name] = share
    present = _present_peers(state, sorted(set(present) - set(excluded)), "uploaders with valid shares")
    masked = encoded + primitives.keystream(state.self_seed, len(encoded))
    for name in present:
        if name != state.client:
            mask = primitives.keystream(
                _pair_seed(state.session, state.mask_private, state.client, state.peers[name]), len(encoded)
            )
            (np.add if state.client < name else np.subtract)(masked, mask, out=masked)  # in place: no copies
    return masked, excluded


def _open_share(
    state: ClientRound, dealer: str, sealed: bytes | None, committed: str | None
) -> tuple[bytes, bytes] | None:
    """The (seed share, key share) ``dealer`` dealt this client, or None if it is missing, forged or uncommitted."""
    if sealed is None or committed is None:
        return None
    try:
        share = primitives.unseal(
            _share_key(state, dealer), sealed, state.session.context("share", dealer, state.client, state.view)
        )
    except primitives.AuthenticationError:
        return None
    half = len(share) // 2
    seed_share, key_share = share[:half], share[half:]
    if _share_commitments(state.session, dealer, state.client, seed_share, key_share) != committed:
        return None
    return seed_share, key_share


def agree(state: ClientRound, survivors: list[str], dropped: list[str], signer: Identity) -> bytes:
    """Step 4a (client), the consistency check of Bonawitz et al. 2017 (their ConsistencyCheck round): before
    anything is revealed, this client signs the unmask lists it is given, once per round. It reveals only for
    lists that at least t of its peers signed too (:func:`reveal_shares`); honest clients sign one pair of lists
    and t exceeds half of a group, so no two stories of who dropped can both gather t signatures, and a server
    that tells some clients a peer dropped and others that it survived gets neither.

    Raises:
        ProtocolError: Lists that :func:`reveal_shares` would refuse, or other lists than it signed in this round.
    """
    _check_lists(state, survivors, dropped)
    digest = lists_digest(state.session, survivors, dropped)
    if state.agreed and state.agreed != digest:
        raise ProtocolError("This node already signed other unmask lists for this round; refusing to sign a second.")
    state.agreed = digest
    return signer.sign(agreement_bytes(state.session, state.client, digest))


def reveal_shares(
    state: ClientRound,
    survivors: list[str],
    dropped: list[str],
    agreements: Mapping[str, bytes],
    colluders: int = 0,
) -> dict[str, dict[str, str]]:
    """Step 4b (client): shares of survivors' self-mask seeds and of dropped clients' mask keys (hex), for the
    lists this client signed (:func:`agree`) once ``agreements`` holds valid signatures on them from at least t
    of the surviving peers it masked with (itself included): then at least t - 1 of its masks stay in its
    upload whatever the lists say (on a SecAgg+ ring too, where a node cannot see the rest of the sum). Up to
    ``colluders`` of those peers may sign two stories for the server; two stories cannot both gather more
    than (g + colluders) / 2 signatures of the g it masked with, so that many are needed too.

    Raises:
        ProtocolError: The request is inconsistent (a client both survived and dropped, unknown names,
            this client not a survivor), leaves fewer than t survivors, is not what this client agreed to, or
            too few of its peers agreed to the same.
    """
    _check_lists(state, survivors, dropped)
    digest = lists_digest(state.session, survivors, dropped)
    if state.agreed != digest:
        raise ProtocolError("These are not the unmask lists this node signed for this round; refusing to reveal.")
    agreeing = [  # peers this client masked with (it holds their valid shares), itself included
        name
        for name, signature in agreements.items()
        if name in survivors
        and name in state.shares
        and name in state.identities
        and identity.verify(state.identities[name], signature, agreement_bytes(state.session, name, digest))
    ]
    needed = max(state.threshold, (len(state.shares) + colluders) // 2 + 1)
    if len(agreeing) < needed:
        raise ProtocolError(
            f"{len(agreeing)} of the peers this client masked with signed these unmask lists, {needed} are needed "
            f"(t={state.threshold}, and more than half of its {len(state.shares)} with {colluders} colluding): "
            "other clients may have been told another story. Refusing to reveal."
        )
    return {
        "seed": {name: state.shares[name][0].hex() for name in survivors if name in state.shares},
        "mask_key": {name: state.shares[name][1].hex() for name in dropped if name in state.shares},
    }


def _check_lists(state: ClientRound, survivors: list[str], dropped: list[str]) -> None:
    if set(survivors) & set(dropped):
        raise ProtocolError("The server asked for both masks of the same client; refusing to reveal anything.")
    if set(survivors) | set(dropped) != set(state.uploaders):
        raise ProtocolError("Survivors and dropped clients do not add up to the clients that shared keys.")
    _present_peers(state, survivors, "survivors")


def lists_digest(session: Session, survivors: list[str], dropped: list[str]) -> str:
    """Names a round's unmask lists (hex): what clients sign in the consistency check."""
    lists = (json.dumps(sorted(survivors)), json.dumps(sorted(dropped)))
    return hashlib.sha256(session.context("unmask-lists", *lists)).hexdigest()


def agreement_bytes(session: Session, client: str, lists: str) -> bytes:
    """What ``client`` signs to agree to the unmask lists named ``lists``."""
    return session.context("unmask-agreement", client, lists)


def unmask(
    session: Session,
    masked: Mapping[str, np.ndarray],
    bundles: Mapping[str, KeyBundle],
    commitments: Mapping[str, bytes],
    revealed: Mapping[str, dict[str, dict[str, str]]],
    config: SecureAggregation,
    share_commitments: Mapping[str, Mapping[str, str]],
    excluded: Mapping[str, Iterable[str]],
    ring: Mapping[str, RingReveal] | None = None,
    within: Iterable[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Step 4 (server): the sum of the survivors' encoded updates, their masks removed.

    ``masked`` holds the survivors' uploads (U3); clients in ``commitments`` but not in ``masked`` shared
    keys and then dropped (U2 \\ U3). ``revealed`` maps each revealer to its shares; a revealer with any
    share that does not match its dealer's ``share_commitments`` is left out, and the secrets are rebuilt
    from the others. ``excluded`` names, per uploader, the peers it did not mask with (bad dealings);
    ``ring`` the revealed ring secrets of a ring round. ``within`` restricts all of it to one fixed group
    (contribution accounting), whose members mask only with each other: the sum of that group alone, a
    masked round of its own, unmasked from its members' shares.

    Returns:
        The unmasked sum, and the revealers left out for revealing a wrong share.

    Raises:
        ProtocolError: Fewer than t valid shares for a secret that is needed.
    """
    if within is not None:
        members = set(within)
        masked, bundles, commitments = (
            _within(masked, members),
            _within(bundles, members),
            _within(commitments, members),
        )
        revealed, share_commitments = _within(revealed, members), _within(share_commitments, members)
        excluded = _within(excluded, members)
    liars = sorted(name for name, shares in revealed.items() if not _honest(session, name, shares, share_commitments))
    honest = [shares for name, shares in revealed.items() if name not in liars]
    peers = config.peers(bundles, ring)
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint32)
    for name, upload in masked.items():
        seed = _reconstruct(honest, "seed", name, config.min_survivors(len(peers[name]) + 1))
        if hashlib.sha256(seed).digest() != commitments[name]:
            raise ProtocolError(f"The reconstructed self-mask of {name} does not match its commitment.")
        total += upload
        total -= primitives.keystream(seed, length)
    for gone in sorted(set(commitments) - set(masked)):
        masked_with = sorted(n for n in peers[gone] & set(masked) if gone not in set(excluded.get(n, ())))
        if not masked_with:  # every survivor left it out: no mask of it is in the sum
            continue
        mask_private = _reconstruct(honest, "mask_key", gone, config.min_survivors(len(peers[gone]) + 1))
        if primitives.x25519_public(mask_private) != bundles[gone].mask_key:
            raise ProtocolError(f"The reconstructed mask key of {gone} does not match its signed public key.")
        for name in masked_with:
            mask = primitives.keystream(_pair_seed(session, mask_private, gone, bundles[name]), length)
            (np.subtract if name < gone else np.add)(total, mask, out=total)  # undo what ``name`` added
    return total, liars


def _within(mapping: Mapping[str, T], members: set[str]) -> dict[str, T]:
    return {name: value for name, value in mapping.items() if name in members}


def _honest(
    session: Session,
    revealer: str,
    shares: dict[str, dict[str, str]],
    share_commitments: Mapping[str, Mapping[str, str]],
) -> bool:
    """Whether every share ``revealer`` revealed is the one its dealer committed to for it."""
    for index, kind in enumerate(_SHARED):
        offset = index * _DIGEST_HEX
        for dealer, share in shares[kind].items():
            committed = share_commitments.get(dealer, {}).get(revealer, "")
            try:
                opened = share_commitment(session, dealer, revealer, kind, bytes.fromhex(share))
            except ValueError:  # not hex
                return False
            if opened != committed[offset : offset + _DIGEST_HEX]:
                return False
    return True


def _reconstruct(revealed: list[dict[str, dict[str, str]]], kind: str, name: str, threshold: int) -> bytes:
    shares = [bytes.fromhex(r[kind][name]) for r in revealed if name in r.get(kind, {})]
    try:
        return shamir.combine(shares, threshold)
    except shamir.ShareError as error:
        raise ProtocolError(f"Cannot reconstruct the {kind} of {name}: {error}") from error


def _present_peers(state: ClientRound, names: list[str], what: str) -> list[str]:
    """This client and its peers among ``names``, refusing if this client is missing or fewer than t remain."""
    if state.client not in names:
        raise ProtocolError(f"The {what} list must include this client.")
    present = sorted(set(names) & set(state.peers))
    if len(present) < state.threshold:
        raise ProtocolError(
            f"{len(present)} of this client's group are {what}, fewer than the threshold t={state.threshold}."
        )
    return present


def _share_key(state: ClientRound, peer: str) -> bytes:
    low, high = sorted((state.client, peer))
    return primitives.agree(
        state.encryption_private, state.peers[peer].encryption_key, state.session.context("share-key", low, high)
    )


def _pair_seed(session: Session, own_mask_private: bytes, own: str, peer: KeyBundle) -> bytes:
    low, high = sorted((own, peer.client))
    return primitives.agree(own_mask_private, peer.mask_key, session.context("mask", low, high))
