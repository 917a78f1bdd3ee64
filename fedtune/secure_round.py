"""The server's side of one securely aggregated training round (protocol: fedtune/secure/masking.py).

Four exchanges with the sampled clients: round keys, encrypted shares, training with masked upload,
unmasking. The server only ever holds masked uploads and their unmasked sum; clients that drop out
before the upload or before unmasking are handled while at least t of them remain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedtune import wire
from fedtune.adapters import AdapterState
from fedtune.secure import fixed_point, primitives
from fedtune.secure.masking import SecureAggregation, unmask
from fedtune.secure.session import KeyBundle, ProtocolError, Session
from fedtune.transport import Client, Reply, RoundFailedError, Transport

logger = logging.getLogger("fedtune")

T = TypeVar("T")


@dataclass(frozen=True)
class MaskedSum:
    """What the server learns from a secure round: the sum, the total weight, and who contributed."""

    weighted_sum: AdapterState  # float64: sum of weight * update over the contributors
    total_weight: int
    error_bound: float  # per coordinate, of weighted_sum / total_weight against the plaintext mean
    uploads: list[Reply]  # the contributors' masked uploads (metrics in the clear, update masked)
    upload_bytes: float  # mean bytes a contributor sent over all four steps


def collect(
    transport: Transport,
    sampled: list[Client],
    train_content: Callable[[Client], RecordDict],
    global_adapter: AdapterState,
    server_round: int,
    unit_weights: bool,
) -> MaskedSum:
    """Run the four steps with ``sampled``; ``train_content`` builds each client's train message.

    Raises:
        RoundFailedError: Fewer than t clients are left at some step, or unmasking fails.
    """
    secure: SecureAggregation = transport.experiment.secure
    session = Session(transport.run_nonce, server_round)
    sent: dict[str, int] = {}

    def step(targets: list[Client], message_type: str, content: Callable[[Client], RecordDict]) -> list[Reply]:
        replies = transport.send(targets, message_type, content, server_round)
        for reply in replies:
            sent[reply.client.key] = sent.get(reply.client.key, 0) + wire.payload_bytes(reply.content)
        return replies

    def read_bundle(reply: Reply) -> KeyBundle:
        bundle = KeyBundle.from_json(str(reply.content.config_records[wire.CONFIG][wire.BUNDLE]))
        if bundle.client != reply.client.key:
            raise ProtocolError(f"keys announced for {bundle.client}")
        bundle.verify(session, reply.client.public_key)
        return bundle

    bundles = _accepted(step(sampled, wire.SECAGG_KEYS, lambda c: RecordDict()), read_bundle, server_round)
    threshold = secure.round_minimum(len(bundles))
    round_clients = [c for c in sampled if c.key in bundles]
    _require(len(bundles), threshold, server_round, "sent round keys")
    identities = {c.key: c.public_key for c in round_clients}
    peers = secure.peers(session, bundles)
    key_list = json.dumps([bundles[name].to_json() for name in sorted(bundles)])

    def read_shares(reply: Reply) -> tuple[dict[str, bytes], bytes]:
        shares = {name: bytes(value) for name, value in reply.content.config_records[wire.SEALED].items()}
        commitment = reply.content.config_records[wire.CONFIG][wire.COMMITMENT]
        if set(shares) != peers[reply.client.key] or not isinstance(commitment, bytes) or len(commitment) != 32:
            raise ProtocolError("not one encrypted share per peer and a 32-byte commitment")
        return shares, commitment

    shares_config = ConfigRecord({wire.BUNDLES: key_list, wire.IDENTITIES: json.dumps(identities)})
    shared = _accepted(
        step(round_clients, wire.SECAGG_SHARES, lambda c: RecordDict({wire.CONFIG: shares_config})),
        read_shares,
        server_round,
    )
    sealed = {name: shares for name, (shares, _) in shared.items()}
    commitments = {name: commitment for name, (_, commitment) in shared.items()}
    _require(len(sealed), threshold, server_round, "shared their keys")
    survivors = sorted(sealed)

    def masked_train(client: Client) -> RecordDict:
        content = train_content(client)
        content.config_records[wire.CONFIG][wire.SURVIVORS] = json.dumps(survivors)
        content.config_records[wire.SEALED] = ConfigRecord(
            {v: sealed[v][client.key] for v in survivors if client.key in sealed[v]}
        )
        return content

    length = fixed_point.num_slots(global_adapter)

    def read_upload(reply: Reply) -> tuple[Reply, np.ndarray]:
        array = reply.content.array_records[wire.MASKED]["0"].numpy()
        if array.dtype != np.uint32 or array.shape != (length,):
            raise ProtocolError(f"a masked upload must be {length} uint32 values, got {array.dtype} {array.shape}")
        dict(reply.content.metric_records[wire.METRICS])  # present, or the reply is malformed
        return reply, array

    accepted = _accepted(
        step([c for c in round_clients if c.key in sealed], "train", masked_train), read_upload, server_round
    )
    uploads = [reply for reply, _ in accepted.values()]
    masked = {name: array for name, (_, array) in accepted.items()}
    _require(len(uploads), threshold, server_round, "uploaded a masked update")
    uploaders = sorted(masked)
    dropped = sorted(set(survivors) - set(uploaders))
    unmask_config = ConfigRecord({wire.SURVIVORS: json.dumps(uploaders), wire.DROPPED: json.dumps(dropped)})
    revealed = list(
        _accepted(
            step([r.client for r in uploads], wire.SECAGG_UNMASK, lambda c: RecordDict({wire.CONFIG: unmask_config})),
            _read_revealed,
            server_round,
        ).values()
    )
    _require(len(revealed), threshold, server_round, "revealed their shares")
    try:
        total = unmask(session, masked, bundles, commitments, revealed, secure)
    except (ProtocolError, primitives.AuthenticationError, KeyError, ValueError) as error:
        raise RoundFailedError(f"Round {server_round}: unmasking failed ({error}) Resume with resume=true.") from error
    if dropped:
        logger.warning("Round %d: removed the masks of %s, who dropped out before uploading", server_round, dropped)
    code = secure.fixed_point(len(bundles), unit_weights)
    weighted_sum, total_weight = code.decode(total, global_adapter)
    return MaskedSum(
        weighted_sum,
        total_weight,
        code.error_bound(len(uploads), total_weight),
        uploads,
        sum(sent[key] for key in uploaders) / len(uploaders),
    )


def _accepted(replies: list[Reply], read: Callable[[Reply], T], server_round: int) -> dict[str, T]:
    """``read`` applied to each reply; a reply it cannot read is logged and left out (the round goes on)."""
    accepted = {}
    for reply in replies:
        try:
            accepted[reply.client.key] = read(reply)
        except (KeyError, TypeError, ValueError, ProtocolError) as error:  # ProtocolError is a ValueError
            logger.warning("Round %d: reply of %s rejected: %s", server_round, reply.client.key, error)
    return accepted


def _read_revealed(reply: Reply) -> dict[str, dict[str, str]]:
    revealed = json.loads(str(reply.content.config_records[wire.CONFIG][wire.REVEALED]))
    if set(revealed) != {"seed", "mask_key"} or not all(
        isinstance(shares, dict) and all(isinstance(v, str) for v in shares.values()) for shares in revealed.values()
    ):
        raise ProtocolError("revealed shares must be two maps of client name to hex share")
    return revealed


def _require(count: int, threshold: int, server_round: int, what: str) -> None:
    if count < threshold:
        raise RoundFailedError(
            f"Round {server_round}: {count} clients {what}, fewer than the secure-aggregation threshold t={threshold}; "
            "the round is abandoned without revealing anything. Resume with resume=true once nodes are back."
        )
