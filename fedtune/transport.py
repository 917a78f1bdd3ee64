"""The server's side of the wire: connect to nodes, send messages, accept only verified replies.

At connect every node presents its identity key and proves it holds it (the reply is signed). The key
must be in ``federation.trusted_keys`` when that list is set; otherwise it is pinned for the run in
``<run_dir>/node_keys.json`` (trust on first use) and a resumed run refuses a node whose key changed.
Afterwards a reply counts only if it is signed by its node's key for this run, round and step.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import wire
from fedtune.channel import Client, RoundFailedError
from fedtune.experiment import Experiment
from fedtune.run_dir import RunDir
from fedtune.secure import identity
from fedtune.secure.session import Session

logger = logging.getLogger("fedtune")

_MIN_POLL, _MAX_POLL = 0.005, 0.5  # seconds between polls for replies (see Transport.exchange)
WAITING_LOG_SECONDS = 60.0  # while a step waits longer, say every this often whom it still waits for


@dataclass(frozen=True)
class Reply:
    """A verified reply: who sent it, what it holds, and the digest its signature covers."""

    client: Client
    content: RecordDict
    digest: str
    signature: bytes  # the node's signature of the digest (bound to run, round and step): kept in the ledger


class Transport:
    """Sends one message type to a set of clients and returns their verified replies.

    Args:
        grid: Flower's Grid of the run.
        experiment: The experiment (its hash goes into every message; its timeouts apply).
    """

    def __init__(self, grid: Grid, experiment: Experiment) -> None:
        self.grid, self.experiment = grid, experiment
        self.run_nonce = secrets.token_hex(16)  # fresh per server start: replies from another run never verify

    def message(self, node_id: int, message_type: str, content: RecordDict, server_round: int) -> Message:
        """A message to ``node_id``, stamped with the experiment hash (and the base model, so that a node with
        other weights can say so), the run nonce and the round it must be bound to."""
        record = content.config_records.setdefault(wire.CONFIG, ConfigRecord())
        record[wire.EXPERIMENT_HASH], record[wire.BASE_MODEL] = self.experiment.hash, self.experiment.base_model
        record[wire.RUN_NONCE], record[wire.SERVER_ROUND] = self.run_nonce, server_round
        return Message(content=content, dst_node_id=node_id, message_type=message_type)

    def exchange(
        self, messages: list[Message], timeout: float, names: Mapping[int, str] | None = None
    ) -> list[Message]:
        """Push ``messages`` and collect their replies until all are in or ``timeout`` seconds have passed.

        Flower's ``Grid.send_and_receive`` polls at a fixed interval (0.1 s in simulation, 3 s in a
        deployment), which would dominate the short protocol steps of secure aggregation. This polls at a
        tenth of the time waited so far, between 5 ms and 0.5 s: a reply is seen at most ~10% late, and a
        long training step costs at most two polls a second. A step that waits long (a real model's
        training round) logs every ``WAITING_LOG_SECONDS`` whom it still waits for: ``names`` by node id.
        """
        ids = list(self.grid.push_messages(messages))
        node_of = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=False)}  # pushed in order
        pending, started, replies, told = set(ids), time.monotonic(), [], 1
        while True:
            for reply in self.grid.pull_messages(list(pending)):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            waited = time.monotonic() - started
            if not pending or waited >= timeout:
                return replies
            if waited >= told * WAITING_LOG_SECONDS:
                told += 1
                waiting = sorted((names or {}).get(node_of.get(i, -1), f"node {node_of.get(i, '?')}") for i in pending)
                step, done = messages[0].metadata.message_type, f"{len(replies)} of {len(messages)} replies in"
                logger.info("%s: %s after %.0f s; waiting for %s", step, done, waited, ", ".join(waiting))
            time.sleep(min(_MAX_POLL, max(_MIN_POLL, waited / 10), timeout - waited))

    def send(
        self,
        targets: Iterable[Client],
        message_type: str,
        content: RecordDict | Callable[[Client], RecordDict],
        server_round: int,
    ) -> list[Reply]:
        """Send to every target and return the verified replies, sorted by client name.

        Errors, timeouts and replies that fail verification are logged and left out.
        """
        by_node = {client.node_id: client for client in targets}
        messages = [
            self.message(client.node_id, message_type, content(client) if callable(content) else content, server_round)
            for client in by_node.values()
        ]
        timeout = self.experiment.federation.round_timeout
        replies = self.exchange(messages, timeout, {node_id: client.key for node_id, client in by_node.items()})
        session = Session(self.run_nonce, server_round)
        accepted = []
        for reply in replies:
            client = by_node.get(reply.metadata.src_node_id)
            if client is None:
                continue
            if reply.has_error():
                logger.warning(
                    "%s failed a %s message and is skipped: %s", client.key, message_type, reply.error.reason
                )
                continue
            try:
                digest, signature = wire.verify(reply.content, client.public_key, session, message_type, client.key)
            except wire.RejectedReply as error:
                logger.warning("Round %d: %s reply of %s rejected: %s", server_round, message_type, client.key, error)
                continue
            accepted.append(Reply(client, reply.content, digest, signature))
        if len(replies) < len(messages):
            logger.warning(
                "%d of %d nodes did not answer the %s message within %.0f s",
                len(messages) - len(replies),
                len(messages),
                message_type,
                timeout,
            )
        return sorted(accepted, key=lambda r: r.client.key)


def connect(transport: Transport, run_dir: RunDir, resume: bool) -> list[Client]:
    """Wait for the federation's nodes, learn each one's name, identity key and data description.

    Waits up to ``federation.connect_timeout`` for all ``num_clients`` nodes, then starts with whoever is
    connected if that is at least ``min_train_clients``. Nodes whose key is not trusted are left out.
    """
    grid, federation = transport.grid, transport.experiment.federation
    deadline = time.monotonic() + federation.connect_timeout
    while len(list(grid.get_node_ids())) < federation.num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
    connected = len(list(grid.get_node_ids()))
    _require(
        connected,
        f"{connected} nodes connected within federation.connect_timeout={federation.connect_timeout:.0f} s",
        federation.min_train_clients,
    )
    if connected < federation.num_clients:
        logger.warning("Starting with %d of federation.num_clients=%d nodes", connected, federation.num_clients)
    trusted = _trusted_keys(transport.experiment, run_dir, resume)
    clients = []
    queries = [transport.message(node_id, "query", RecordDict(), 0) for node_id in grid.get_node_ids()]
    for reply in transport.exchange(queries, federation.round_timeout):
        client = _introduce(transport, reply, trusted)
        if client is not None:
            clients.append(client)
    names = Counter(c.key for c in clients)
    for name in sorted(n for n, count in names.items() if count > 1):  # which one is genuine cannot be told
        logger.warning("%d nodes present the name %s; all of them are refused.", names[name], name)
    clients = [c for c in clients if names[c.key] == 1]
    if transport.experiment.federation.trusted_keys is None:
        run_dir.write_json("node_keys.json", {**trusted, **{c.key: c.public_key for c in clients}})
    _require(len(clients), f"{len(clients)} nodes were admitted", federation.min_train_clients)
    return sorted(clients, key=lambda c: c.key)


def _introduce(transport: Transport, reply: Message, trusted: dict[str, str]) -> Client | None:
    """The client behind a query reply, or None (logged) if it is malformed, its key unknown or its signature bad."""
    if reply.has_error():
        logger.warning("Node %s failed the query message: %s", reply.metadata.src_node_id, reply.error.reason)
        return None
    try:
        info = reply.content.config_records[wire.CONFIG]
        key, public_key = str(info[wire.CLIENT_KEY]), str(reply.content.config_records[wire.SIGNATURE][wire.NODE_KEY])
        description = json.loads(str(info[wire.DESCRIPTION]))
    except (KeyError, ValueError) as error:
        logger.warning("Node %s refused at connect: malformed reply (%s)", reply.metadata.src_node_id, error)
        return None
    expected = trusted.get(key)
    if expected is None and transport.experiment.federation.trusted_keys is not None:
        logger.warning(
            "Node %s presents identity key %s, not in federation.trusted_keys; refused.", key, public_key[:16]
        )
        return None
    if expected is not None and expected != public_key:
        logger.warning("Node %s presents a different identity key than the one trusted for it; refused.", key)
        return None
    try:
        wire.verify(reply.content, public_key, Session(transport.run_nonce, 0), "query", key)
    except wire.RejectedReply as error:
        logger.warning("Node %s refused at connect: %s", key, error)
        return None
    return Client(reply.metadata.src_node_id, key, public_key, description)


def _trusted_keys(experiment: Experiment, run_dir: RunDir, resume: bool) -> dict[str, str]:
    """The trusted list, else the keys pinned earlier in this run (resume), else none yet."""
    if experiment.federation.trusted_keys is not None:
        return identity.load_trusted_keys(experiment.federation.trusted_keys)
    pinned = run_dir.path / "node_keys.json"
    return json.loads(pinned.read_text()) if resume and pinned.is_file() else {}


def _require(count: int, what: str, minimum: int) -> None:
    if count < minimum:
        raise RoundFailedError(
            f"{what}, fewer than federation.min_train_clients={minimum}. Start more SuperNodes (with trusted "
            "identity keys) or lower the minimum."
        )
