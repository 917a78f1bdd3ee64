"""A node's side of securely aggregated rounds (protocol: fedtune/secure/masking.py; the server's side:
fedtune/secure_server.py).

The node keeps each round's secrets in Flower's ``Context.state`` and answers the four steps: round keys,
encrypted shares, the masked upload, and the shares it reveals for unmasking (with SecAgg+ rings also the
ring step between keys and shares). It also owns pipelining: asked to, it sends the next round's keys with
its upload and deals that round's shares with its unmask answer. Everything that protects the node from
the server is checked here, before it answers: the round is at least its own minimum size, the peers are
the ones it trusts, it uploads at most once per round and reveals its ring secret for one set of clients
per round, and the count the server gives for its DP noise share is the count of keys it verified.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import client_state, wire
from fedtune.adapters import AdapterState
from fedtune.contribution.groups import Groups, check_partition, group_of
from fedtune.experiment import Experiment
from fedtune.secure import identity, masking
from fedtune.secure.identity import Identity
from fedtune.secure.masking import MIN_ROUND_CLIENTS
from fedtune.secure.session import DOMAIN, ClientRound, KeyBundle, ProtocolError, RingReveal, Session
from fedtune.secure.uploads import GroupRecord, RingRecord, UploadRecord

logger = logging.getLogger("fedtune")

SECAGG_STATE = "secagg"  # Context.state record holding the secrets of the rounds in progress
# How many of its peers a node assumes may collude with the server unless its node config says otherwise
# (``colluders``): one, the accomplice that min-round-clients also guards against.
DEFAULT_COLLUDERS = 1


class SecureClient:
    """One node's secure aggregation for the experiment it runs.

    Args:
        context: The node's Flower context (its node config, and the state that keeps round secrets).
        experiment: The experiment (its secure-aggregation and weighting settings).
        name: The node's name.
        signer: The node's identity key.
        simulated: fedtune's in-process simulation, where one operator runs every node: the node may take
            its peers' identity keys from the server, and "one upload per round" holds per run directory
            (whose ``node-state/`` keeps the records unless the node config names a ``state-dir``).
    """

    def __init__(self, context: Context, experiment: Experiment, name: str, signer: Identity, simulated: bool) -> None:
        self.context, self.experiment, self.name, self.signer = context, experiment, name, signer
        self.node_config = client_state.records_config(context.node_config, experiment.cfg.run_dir, simulated)
        self.simulated = simulated

    def peer_identities(self, received: ConfigRecord) -> dict[str, str]:
        """Peers' identity keys: the node's own trusted list; only fedtune's in-process simulation may take the
        server's (a deployed node would let the server invent peers).

        Raises:
            ProtocolError: A deployed node without its own list (node config ``trusted-keys``).
        """
        if "trusted-keys" in self.node_config:
            return identity.load_trusted_keys(str(self.node_config["trusted-keys"]))
        if not self.simulated:
            raise ProtocolError(
                "secure=masking needs this node's own list of its peers' identity keys, or the server could invent "
                "them: start the SuperNode with --node-config \"... trusted-keys='/etc/fedtune/trusted_keys.json'\"."
            )
        return json.loads(str(received[wire.IDENTITIES]))

    def keys(self, msg: Message) -> RecordDict:
        """Step 1: this round's signed public keys."""
        return RecordDict({wire.CONFIG: self._round_keys(session_of(msg))})

    def ring(self, msg: Message) -> RecordDict:
        """The ring step (SecAgg+): this node's ring secret for the round keys it is shown, once per round."""
        return self._reveal_ring(session_of(msg), msg.content.config_records[wire.CONFIG])

    def shares(self, msg: Message) -> RecordDict:
        """Step 2: an encrypted share of this node's secrets for each peer, and the commitments."""
        return self._deal(session_of(msg), msg.content.config_records[wire.CONFIG])

    def before_training(self, msg: Message) -> ClientRound:
        """Step 3's checks, all before any training (fail fast): the round's secrets exist, this node has not
        uploaded in this round, the round is big enough, and the server's count is the verified one.

        Raises:
            ProtocolError: Any of these does not hold.
        """
        state = self._secrets(session_of(msg))
        received = msg.content.config_records[wire.CONFIG]
        server_round, num_sampled = state.session.server_round, int(received[wire.NUM_SAMPLED])
        self._uploads().check(server_round)
        if num_sampled != state.round_size:
            raise ProtocolError(
                f"The server says {num_sampled} clients take part in round {server_round}, but this node verified "
                f"the keys of {state.round_size}; a larger count would shrink its DP noise. Refused."
            )
        self._require_group(self._summed_with(state, json.loads(str(received[wire.SURVIVORS]))), "shared keys")
        return state

    def upload(self, msg: Message, state: ClientRound, update: AdapterState, metrics: dict[str, float]) -> RecordDict:
        """Step 3: the masked, weighted update (its example count masked with it), recorded on disk first; with
        the next round's keys when the server pipelines."""
        received = msg.content.config_records[wire.CONFIG]
        weighting = self.experiment.weighting
        code = self.experiment.secure.fixed_point(state.round_size, weighting.unit)
        sealed = {name: bytes(value) for name, value in msg.content.config_records[wire.SEALED].items()}
        committed = {k: str(v) for k, v in msg.content.config_records.get(wire.SHARE_COMMITMENTS, {}).items()}
        survivors = json.loads(str(received[wire.SURVIVORS]))
        encoded = code.encode(update, weighting.weight(metrics["num_examples"]))
        masked, excluded = masking.mask_update(state, sealed, committed, survivors, encoded)
        # A peer left out is not in this node's masks: the server could unmask this node's sum without it.
        self._require_group(self._summed_with(state, survivors), "dealt this node valid shares")
        self._keep(state)
        self._uploads().record(state.session.server_round, state.session.run_nonce)  # before the upload leaves
        if excluded:
            logger.warning(
                "Round %d: left out %s, whose shares for this node were bad", state.session.server_round, excluded
            )
        return self._upload_content(msg, masked, metrics, excluded)

    def agree(self, msg: Message) -> RecordDict:
        """Step 4a: this node's signature on the unmask lists it is given, once per round (the consistency check:
        fedtune/secure/masking.py ``agree``)."""
        session = session_of(msg)
        state = self._secrets(session)
        received = msg.content.config_records[wire.CONFIG]
        survivors = json.loads(str(received[wire.SURVIVORS]))
        self._require_group(self._summed_with(state, survivors), "would be summed")
        signature = masking.agree(state, survivors, json.loads(str(received[wire.DROPPED])), self.signer)
        self._keep(state, still_open=session_of(msg, next_round=True))  # the next round's keys, made at upload
        return RecordDict({wire.CONFIG: ConfigRecord({wire.AGREEMENT: signature})})

    def reveal(self, msg: Message) -> RecordDict:
        """Step 4b: the shares that unmask the survivors' sum, for the lists this node and t of its peers signed
        (once per round: then the secrets are erased); with the next round's shares when the server pipelines."""
        session = session_of(msg)
        state = self._secrets(session)
        received = msg.content.config_records[wire.CONFIG]
        del self._store()[_state_key(session)]
        survivors = json.loads(str(received[wire.SURVIVORS]))
        self._require_group(self._summed_with(state, survivors), "would be summed")
        agreements = {name: bytes.fromhex(sig) for name, sig in json.loads(str(received[wire.AGREEMENTS])).items()}
        dropped = json.loads(str(received[wire.DROPPED]))
        colluders = int(self.node_config.get("colluders", DEFAULT_COLLUDERS))
        revealed = masking.reveal_shares(state, survivors, dropped, agreements, colluders)
        content = RecordDict({wire.CONFIG: ConfigRecord({wire.REVEALED: json.dumps(revealed)})})
        if wire.BUNDLES in received:
            try:
                dealt = self._deal(session_of(msg, next_round=True), received)
            except (KeyError, ValueError) as error:  # ProtocolError included
                # This round's answer stands; the server sets the next round up in steps of their own.
                logger.warning("Round %s: not dealing the next round's shares: %s", session.server_round, error)
            else:
                for name in (wire.SEALED, wire.SHARE_COMMITMENTS):
                    content.config_records[name] = dealt.config_records[name]
                content.config_records[wire.CONFIG][wire.COMMITMENT] = dealt.config_records[wire.CONFIG][
                    wire.COMMITMENT
                ]
        return content

    def _upload_content(
        self, msg: Message, masked: np.ndarray, metrics: dict[str, float], excluded: list[str]
    ) -> RecordDict:
        visible = {k: v for k, v in metrics.items() if k != "num_examples"}  # the count travels masked
        content = RecordDict({wire.MASKED: ArrayRecord([masked]), wire.METRICS: MetricRecord(visible)})
        content.config_records[wire.CONFIG] = ConfigRecord({wire.EXCLUDED: json.dumps(excluded)})
        if msg.content.config_records[wire.CONFIG].get(wire.PREPARE_NEXT):  # the next round's keys ride along
            next_keys = self._round_keys(session_of(msg, next_round=True), still_open=session_of(msg))
            content.config_records[wire.CONFIG][wire.BUNDLE] = next_keys[wire.BUNDLE]
        return content

    def _reveal_ring(self, session: Session, received: ConfigRecord) -> RecordDict:
        state = self._secrets(session)
        bundles = self._bundles(received)
        reveal = masking.reveal_ring(
            state, bundles, self.peer_identities(received), self.signer, self.experiment.secure
        )
        self._rings().record(session.server_round, [b.client for b in bundles])  # before the secret leaves
        self._keep(state)
        return RecordDict({wire.CONFIG: ConfigRecord({wire.RING_REVEAL: reveal.to_json()})})

    def _deal(self, session: Session, received: ConfigRecord) -> RecordDict:
        state = self._secrets(session)
        bundles = self._bundles(received)
        self._rings().check(session.server_round, [b.client for b in bundles])  # no other set once a secret is out
        ring = None
        if wire.RING_REVEALS in received:
            ring = {
                name: RingReveal.from_json(text) for name, text in json.loads(str(received[wire.RING_REVEALS])).items()
            }
        identities = self.peer_identities(received)
        groups = self._groups(received, [b.client for b in bundles])
        sealed, commitment, committed = masking.share_keys(
            state, bundles, identities, self.experiment.secure, ring, groups
        )
        if groups is not None:  # before the shares leave: any other group later in the experiment is refused
            own = group_of(groups, self.name)
            GroupRecord(client_state.groups_file(self.node_config, self._scope(), self.name)).record(list(own))
        self._keep(state)
        return RecordDict(
            {
                wire.SEALED: ConfigRecord(sealed),
                wire.SHARE_COMMITMENTS: ConfigRecord(committed),
                wire.CONFIG: ConfigRecord({wire.COMMITMENT: commitment}),
            }
        )

    def _groups(self, received: ConfigRecord, round_clients: list[str]) -> Groups | None:
        """The fixed groups this node masks within: those the server sends when the experiment accounts
        contributions (None otherwise: the whole round), once they are what the experiment agreed to: a
        setting that may reveal group sums (``contribution.check``, run here too), groups of at least
        ``contribution.group_size`` nodes it knows (its own ``trusted-keys``, where it has them) that split the
        round, this node's own group the same as in every earlier round of the experiment (fedtune/secure/
        uploads.py ``GroupRecord``), and enough of it in the round. Each share is sealed under the grouping too
        (fedtune/secure/masking.py), so a peer shown other groups cannot open it.

        Raises:
            ProtocolError: Any of these does not hold, groups where the experiment has none, or none where it
                has them.
        """
        accounting = self.experiment.contribution
        if not accounting.enabled:
            if wire.GROUPS in received:
                raise ProtocolError(
                    "The server asks this node to mask within groups, but the experiment does not account "
                    "contributions (contribution=none): each group's sum would tell it more than the experiment "
                    "allows. Refused."
                )
            return None
        if wire.GROUPS not in received:
            raise ProtocolError(
                "The experiment masks within fixed groups (contribution accounting), but the server sent none; "
                "masking with other clients than its group would give the server another sum. Refused."
            )
        federation, secure = self.experiment.federation, self.experiment.secure
        organisation = self.experiment.privacy.organisation
        try:
            accounting.check(
                masked=True,
                num_clients=federation.num_clients,
                fraction_train=federation.fraction_train,
                ring=secure.neighbours is not None,
                noise_at_clients=organisation is not None and organisation.noise_at == "clients",
                min_round_clients=self._minimum(),
            )
            groups = check_partition(json.loads(str(received[wire.GROUPS])), round_clients, accounting.group_size)
            own = group_of(groups, self.name)
        except ValueError as error:
            raise ProtocolError(f"The groups the server sent are not the experiment's: {error}") from error
        known = set(self.peer_identities(received)) if "trusted-keys" in self.node_config else None
        unknown = sorted({name for group in groups for name in group} - known) if known is not None else []
        if unknown:
            raise ProtocolError(f"The groups the server sent name nodes this node does not know: {unknown}. Refused.")
        self._require_group(sorted(set(own) & set(round_clients)), "of this node's group sent round keys")
        return groups

    def _bundles(self, received: ConfigRecord) -> list[KeyBundle]:
        """The round keys the server forwards, once there are enough of them for this node."""
        bundles = [KeyBundle.from_json(text) for text in json.loads(str(received[wire.BUNDLES]))]
        self._require_group([b.client for b in bundles], "sent round keys")
        return bundles

    def _round_keys(self, session: Session, still_open: Session | None = None) -> ConfigRecord:
        """Keys for ``session``, kept; asked again in the same round, the same keys until this node has dealt its
        shares for them, fresh ones after (the server sets a round up again when a client is gone: the shares
        of the first keys are then never used, and the keys are never dealt twice). The ring secret stays the
        same: this node reveals it for one set of clients only."""
        if not 1 <= session.server_round <= self.experiment.federation.num_rounds:
            raise ProtocolError(
                f"Round {session.server_round} is not a round of this experiment "
                f"(federation.num_rounds={self.experiment.federation.num_rounds}). Refused."
            )
        kept = self._store().get(_state_key(session))
        if kept is not None and not ClientRound.from_json(str(kept)).view:
            bundle = masking.signed_bundle(ClientRound.from_json(str(kept)), self.signer)
        else:
            ring_secret = self._ring_secret(session.server_round)
            state, bundle = masking.advertise_keys(session, self.name, self.signer, ring_secret)
            self._keep(state, still_open)
        return ConfigRecord({wire.BUNDLE: bundle.to_json()})

    def _ring_secret(self, server_round: int) -> bytes:
        """This node's ring secret for ``server_round`` of its experiment: derived from its identity key (Ed25519
        signatures are deterministic and this one never leaves the node), so it is the same in every run of
        the round and a server that makes the node forget the round, or starts another run, draws no new ring."""
        message = DOMAIN + b"ring-secret" + f"{self._scope()}|{server_round}".encode()
        return hashlib.sha256(self.signer.sign(message)).digest()

    def _store(self) -> ConfigRecord:
        return self.context.state.config_records.setdefault(SECAGG_STATE, ConfigRecord())

    def _secrets(self, session: Session) -> ClientRound:
        text = self._store().get(_state_key(session))
        if text is None:
            raise ProtocolError(
                "No secure-aggregation keys for this run and round on this node; the server skipped a step."
            )
        return ClientRound.from_json(str(text))

    def _keep(self, state: ClientRound, still_open: Session | None = None) -> None:
        """Keep ``state`` (and the secrets of round ``still_open``); erase those of every other round, such as one
        abandoned or left by this node midway."""
        store, keep = self._store(), {_state_key(state.session)} | ({_state_key(still_open)} if still_open else set())
        for key in [k for k in store if k not in keep]:
            del store[key]
        store[_state_key(state.session)] = state.to_json()

    def _scope(self) -> str:
        """What "the same experiment" means for this node's per-round records (fedtune/secure/uploads.py)."""
        return client_state.record_scope(self.experiment.hash, self.experiment.cfg.run_dir, self.simulated)

    def _uploads(self) -> UploadRecord:
        """This node's record of the rounds it uploaded in."""
        return UploadRecord(client_state.uploads_file(self.node_config, self._scope(), self.name))

    def _rings(self) -> RingRecord:
        """This node's record of the clients it revealed its ring secret for, per round."""
        return RingRecord(client_state.rings_file(self.node_config, self._scope(), self.name))

    def _summed_with(self, state: ClientRound, names: list[str]) -> list[str]:
        """Those of ``names`` whose updates the server can only see summed with this node's: its peers (its whole
        round, or its fixed group), and once it has masked only the peers it masked with (whose valid shares
        it holds), itself included. On a SecAgg+ ring, where a node sees only its neighbourhood of the sum,
        all of ``names``."""
        if self.experiment.secure.uses_ring(state.round_size) and not state.grouped:
            return names
        tied = state.shares if state.uploaders else state.peers
        return sorted(set(names) & set(tied))

    def _minimum(self) -> int:
        """The smallest sum this node's update may be in (node config ``min-round-clients``)."""
        return int(self.node_config.get("min-round-clients", MIN_ROUND_CLIENTS))

    def _require_group(self, names: list[str], what: str) -> None:
        """Refuse a round of fewer clients than this node's own minimum (node config ``min-round-clients``)."""
        minimum = self._minimum()
        if len(set(names)) < minimum:
            raise ProtocolError(
                f"{len(set(names))} clients {what}, fewer than this node's minimum of {minimum} (node config "
                "min-round-clients): in so small a round the server and a colluding client could isolate its update."
            )


def session_of(msg: Message, next_round: bool = False) -> Session:
    """The run and round ``msg`` belongs to, or the round after it (for pipelined steps)."""
    received = msg.content.config_records[wire.CONFIG]
    return Session(str(received[wire.RUN_NONCE]), int(received[wire.SERVER_ROUND]) + next_round)


def _state_key(session: Session) -> str:
    return f"{session.run_nonce}/{session.server_round}"
