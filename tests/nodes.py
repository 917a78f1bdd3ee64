"""In-process Flower nodes: the real ClientApp driven message by message, without Ray or a SuperLink.

:class:`Node` holds one node's Flower ``Context`` and hands it each message the way a SuperNode would.
:class:`InProcessGrid` is a Flower ``Grid`` over such nodes, so the real server loop
(``fedtune.server_app.run_federation``) runs against them in one process, in milliseconds per step;
:func:`federate` runs a whole experiment that way (with ``prefix="partition"`` its nodes have the names,
and so the seeds, of a Flower simulation's: results match a Ray run bit for bit).
Tests that play a hostile server skip the grid and send their own messages with :meth:`Node.receive`:
what those tests do is written in the wire format (``fedtune.wire``), the contract between server and node.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedtune import config, wire
from fedtune.client_app import make_client_app
from fedtune.secure import identity
from fedtune.secure.session import Session


def act_as_server() -> None:
    """Stamp messages built in this process as the server's (what Flower's ServerApp runtime sets up)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0


class Node:
    """One node: the ClientApp with its own Context (node config, state) for one run.

    Args:
        node_id: Flower's node id.
        node_config: The node's own settings (``--node-config`` of a SuperNode).
        run_config: The run config (overrides and run dir) the server's run carries.
        simulated: Bind the run config as fedtune's in-process simulation does (True), or read it from the
            Context as a deployed ClientApp does (False).
        failures: ``(round, message type)`` pairs at which this node fails (raises), as a crashed node would.
        tampering: ``(round, message type)`` -> a function that changes this node's reply content before it is
            signed and sent: a malicious node (its replies still verify, they are its own).
        app: The ClientApp to run instead of fedtune's (a wrapper that misbehaves in ways of its own).
    """

    def __init__(
        self,
        node_id: int,
        node_config: dict[str, Any],
        run_config: dict[str, str],
        simulated: bool = True,
        failures: Iterable[tuple[int, str]] = (),
        tampering: dict[tuple[int, str], Callable[[RecordDict], None]] | None = None,
        app: ClientApp | None = None,
    ) -> None:
        self.node_id = node_id
        self.name = str(node_config["name"])
        self.app = app if app is not None else make_client_app(run_config if simulated else None)
        self.context = Context(1, node_id, node_config, RecordDict(), run_config)
        self.failures = set(failures)
        self.tampering = tampering or {}
        self.handled: list[tuple[int, str]] = []  # (round, message type) of every message this node answered

    def receive(self, message: Message) -> Message:
        """The ClientApp's reply to ``message``; raises whatever the ClientApp raised."""
        server_round = int(message.content.config_records[wire.CONFIG].get(wire.SERVER_ROUND, 0))
        step = message.metadata.message_type
        if (server_round, step) in self.failures:
            raise RuntimeError(f"{self.name} is lost during {step} of round {server_round}")
        if not message.metadata.message_id:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a SuperLink stamps on push
        reply = self.app(message, self.context)
        self.handled.append((server_round, step))
        tamper = self.tampering.get((server_round, step))
        if tamper is not None:
            tamper(reply.content)
            signer = identity.load_or_create(Path(str(self.context.node_config["identity-key"])))
            nonce = str(message.content.config_records[wire.CONFIG][wire.RUN_NONCE])
            wire.sign(reply.content, signer, Session(nonce, server_round), step, self.name)
        return reply

    def new_run(self) -> None:
        """Forget what Flower keeps for a run (Context.state), as when the node joins a new run."""
        context = self.context
        self.context = Context(context.run_id + 1, self.node_id, context.node_config, RecordDict(), context.run_config)


class InProcessGrid(Grid):
    """A Flower Grid whose nodes answer in this process: a failing node answers with an error reply."""

    def __init__(self, nodes: list[Node]) -> None:
        act_as_server()
        self.nodes = {node.node_id: node for node in nodes}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        """Not needed in-process."""

    @property
    def run(self) -> Any:
        """Not needed in-process."""
        raise NotImplementedError

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """As Flower's Grid."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node of the grid."""
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now and keep the reply for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            try:
                reply = self.nodes[message.metadata.dst_node_id].receive(message)
            except Exception as error:  # a SuperNode turns any ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` (all of them are in: nodes answer on push)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull at once."""
        return list(self.pull_messages(self.push_messages(messages)))


def make_nodes(
    root: Path,
    overrides: list[str],
    count: int,
    simulated: bool = True,
    failures: dict[str, Iterable[tuple[int, str]]] | None = None,
    node_config: dict[str, Any] | None = None,
    tampering: dict[str, dict[tuple[int, str], Callable[[RecordDict], None]]] | None = None,
    prefix: str = "hospital",
    app: ClientApp | None = None,
    own_config: dict[str, dict[str, Any]] | None = None,
) -> list[Node]:
    """``count`` nodes named <prefix>-0.. on partitions 0.., with their own state dirs and identity keys, all of
    whom trust each other's keys (``trusted-keys``); the run's config is ``overrides`` with run dir ``root/run``.
    With ``prefix="partition"`` they have the names (and so the seeds) of Flower simulation's nodes.
    ``node_config`` goes to every node's node config, ``own_config[name]`` to that node's only."""
    run_config = config.to_run_config(overrides, str(root / "run"))
    trusted = root / "trusted_keys.json"
    names = [f"{prefix}-{i}" for i in range(count)]
    for name in names:
        identity.add_trusted_key(trusted, name, identity.load_or_create(root / "keys" / f"{name}.pem").public_hex)
    return [
        Node(
            i + 1,
            {
                "name": name,
                "partition-id": i,
                "num-partitions": count,
                "state-dir": str(root / "state" / name),
                "identity-key": str(root / "keys" / f"{name}.pem"),
                "trusted-keys": str(trusted),
                **(node_config or {}),
                **(own_config or {}).get(name, {}),
            },
            run_config,
            simulated,
            (failures or {}).get(name, ()),
            (tampering or {}).get(name),
            app,
        )
        for i, name in enumerate(names)
    ]


class HostileServer:
    """A server that sends nodes whatever messages it likes, stamped like the real server's (wire format).

    Args:
        nodes: The nodes it talks to.
        experiment_hash: The hash the nodes must see to accept the experiment.
        run_nonce: The run it claims (a fresh one per server start).
    """

    def __init__(self, nodes: list[Node], experiment_hash: str, run_nonce: str = "hostile-run") -> None:
        act_as_server()
        self.nodes = {node.name: node for node in nodes}
        self.experiment_hash, self.run_nonce = experiment_hash, run_nonce
        self.agreements: dict[tuple[Any, ...], dict[str, bytes]] = {}  # per round and unmask lists

    def send(self, name: str, message_type: str, server_round: int, content: RecordDict | None = None) -> RecordDict:
        """Send one message to node ``name`` and return its reply's content (raises what the node raised)."""
        content = content if content is not None else RecordDict()
        record = content.config_records.setdefault(wire.CONFIG, ConfigRecord())
        record[wire.EXPERIMENT_HASH], record[wire.RUN_NONCE] = self.experiment_hash, self.run_nonce
        record[wire.SERVER_ROUND] = server_round
        node = self.nodes[name]
        return node.receive(Message(content, node.node_id, message_type)).content

    def session(self, server_round: int) -> Session:
        """The protocol session of ``server_round`` in this server's run."""
        return Session(self.run_nonce, server_round)

    def round_keys(self, names: list[str], server_round: int) -> dict[str, str]:
        """Step 1 with ``names``: each one's signed round keys (wire form)."""
        return {
            name: str(self.send(name, wire.SECAGG_KEYS, server_round).config_records[wire.CONFIG][wire.BUNDLE])
            for name in names
        }

    def forward(self, bundles: dict[str, str], **fields: str) -> RecordDict:
        """A request carrying ``bundles`` as the round's keys (U1); identities empty: nodes hold their own."""
        listed = json.dumps([bundles[n] for n in sorted(bundles)])
        return RecordDict({wire.CONFIG: ConfigRecord({wire.BUNDLES: listed, wire.IDENTITIES: "{}", **fields})})

    def ring(self, name: str, server_round: int, bundles: dict[str, str]) -> str:
        """The ring step: ``name`` shown ``bundles`` as U1; returns the ring secret it reveals (wire form)."""
        reply = self.send(name, wire.SECAGG_RING, server_round, self.forward(bundles))
        return str(reply.config_records[wire.CONFIG][wire.RING_REVEAL])

    def set_up(self, names: list[str], server_round: int, ring: bool = False) -> dict[str, Any]:
        """Steps 1 and 2 with ``names``: their round keys, (``ring``: their ring secrets,) then their encrypted
        shares and commitments."""
        bundles = self.round_keys(names, server_round)
        fields = {}
        if ring:
            fields[wire.RING_REVEALS] = json.dumps({name: self.ring(name, server_round, bundles) for name in names})
        sealed, commitments, committed = {}, {}, {}
        for name in names:
            reply = self.send(name, wire.SECAGG_SHARES, server_round, self.forward(bundles, **fields))
            sealed[name] = {k: bytes(v) for k, v in reply.config_records[wire.SEALED].items()}
            commitments[name] = bytes(reply.config_records[wire.CONFIG][wire.COMMITMENT])
            committed[name] = {k: str(v) for k, v in reply.config_records[wire.SHARE_COMMITMENTS].items()}
        return {"bundles": bundles, "sealed": sealed, "commitments": commitments, "share_commitments": committed}

    def train(
        self, name: str, server_round: int, adapter: dict, survivors: list[str], setup: dict[str, Any], **fields: Any
    ) -> RecordDict:
        """A masked ``train`` message: the global adapter, the survivors list and the shares dealt to ``name``
        (from ``setup``, what :meth:`set_up` returned; ``{}`` for a plaintext round)."""
        sealed, committed = setup.get("sealed", {}), setup.get("share_commitments", {})
        content = RecordDict({wire.ARRAYS: wire.adapter_record(adapter)})
        content.config_records[wire.CONFIG] = ConfigRecord(
            {wire.SURVIVORS: json.dumps(survivors), wire.NUM_SAMPLED: len(survivors), **fields}
        )
        dealers = [dealer for dealer, shares in sealed.items() if dealer in survivors and name in shares]
        content.config_records[wire.SEALED] = ConfigRecord({dealer: sealed[dealer][name] for dealer in dealers})
        content.config_records[wire.SHARE_COMMITMENTS] = ConfigRecord({d: committed[d][name] for d in dealers})
        return self.send(name, "train", server_round, content)

    def agree(self, name: str, server_round: int, survivors: list[str], dropped: list[str]) -> bytes:
        """The consistency step: ``name``'s signature on these unmask lists (raises what it raised)."""
        request = ConfigRecord({wire.SURVIVORS: json.dumps(survivors), wire.DROPPED: json.dumps(dropped)})
        reply = self.send(name, wire.SECAGG_AGREE, server_round, RecordDict({wire.CONFIG: request}))
        return bytes(reply.config_records[wire.CONFIG][wire.AGREEMENT])

    def unmask(
        self,
        name: str,
        server_round: int,
        survivors: list[str],
        dropped: list[str],
        agreements: dict[str, bytes] | None = None,
    ) -> dict[str, dict[str, str]]:
        """An unmask request with ``agreements`` (default: the signatures on these lists of every survivor who
        gives one, asked once per round and lists); returns the shares ``name`` reveals."""
        if agreements is None:
            asked = (server_round, tuple(survivors), tuple(dropped))
            if asked not in self.agreements:
                self.agreements[asked] = {}
                for survivor in survivors:
                    try:
                        self.agreements[asked][survivor] = self.agree(survivor, server_round, survivors, dropped)
                    except (KeyError, ValueError, RuntimeError):  # a node that refuses (or left) does not sign
                        continue
            agreements = self.agreements[asked]
        request = ConfigRecord(
            {
                wire.SURVIVORS: json.dumps(survivors),
                wire.DROPPED: json.dumps(dropped),
                wire.AGREEMENTS: json.dumps({n: signature.hex() for n, signature in agreements.items()}),
            }
        )
        reply = self.send(name, wire.SECAGG_UNMASK, server_round, RecordDict({wire.CONFIG: request}))
        return json.loads(str(reply.config_records[wire.CONFIG][wire.REVEALED]))


def federate(
    root: Path,
    overrides: list[str],
    count: int,
    app: Callable[[dict[str, str]], ClientApp] | None = None,
    **options: Any,
) -> Path:
    """Run the experiment ``overrides`` with the real server loop over ``count`` in-process nodes (see
    :func:`make_nodes`, which ``options`` go to), each running ``app(run_config)`` if given; returns the run
    directory, ``root / "run"``."""
    from fedtune.server_app import run_federation  # deferred: the server side is not needed to play a server

    run_config = config.to_run_config(overrides, str(root / "run"))
    nodes = make_nodes(root, overrides, count, app=app(run_config) if app is not None else None, **options)
    simulated = options.get("simulated", True)  # the nodes' and the server's view agree
    run_federation(InProcessGrid(nodes), config.load_experiment(run_config), simulated=simulated)
    return root / "run"
