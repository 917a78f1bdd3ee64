"""Contribution accounting under secure aggregation: the server learns one sum per fixed group and nothing
finer, the groups' values are those of the same coalitions in the clear, and nodes refuse any grouping the
experiment did not agree to.

The security tests read what the server received, message by message (every reply of a real in-process
run), and work out from it alone which sums the server can compute; the node tests play a hostile server in
the wire format (tests/nodes.py), so they hold whatever the server's code becomes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedtune import client, config, wire
from fedtune.contribution import groups
from fedtune.contribution.valuation import coalition_mask
from fedtune.experiment import get_experiment
from fedtune.ledger import Ledger, audit
from fedtune.secure import primitives, shamir
from fedtune.secure.session import ProtocolError
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import HostileServer, InProcessGrid, Node, make_nodes
from tests.test_contribution import resign

NAMES = [f"hospital-{i}" for i in range(6)]


class RecordingGrid(InProcessGrid):
    """An in-process grid that keeps every reply the server received, with the message it answered."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(nodes)
        self.seen: list[tuple[Message, Message]] = []

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        ids = super().push_messages(messages)
        self.seen += [(m, self._replies[i]) for m, i in zip(messages, ids, strict=True)]
        return ids


def _overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        model_dir,
        run_dir,
        "federation.num_clients=6",
        "data.loader.max_examples=600",
        "train.local_steps=4",
        "train.lr=0.02",
        "contribution=shapley",
        "contribution.validation_rows=30",
        *extra,
    )


def _run(root: Path, overrides: list[str], count: int, **options: Any) -> tuple[Path, RecordingGrid]:
    run_config = config.to_run_config(overrides, str(root / "run"))
    grid = RecordingGrid(make_nodes(root, overrides, count, **options))
    run_federation(grid, config.load_experiment(run_config), simulated=True)
    return root / "run", grid


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same six hospitals in the clear and masked within groups of three."""
    plain_root, masked_root = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("masked")
    plain, _ = _run(plain_root, _overrides(tiny_bert_dir, plain_root / "run"), 6)
    masked_overrides = _overrides(tiny_bert_dir, masked_root / "run", "secure=masking")
    masked, grid = _run(masked_root, masked_overrides, 6)
    return {"plain": plain, "masked": masked, "grid": grid, "overrides": masked_overrides}


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in Ledger(run_dir).entries() if e["kind"] == "round"]


def test_a_groups_value_is_its_members_coalition_value_in_the_clear(runs: dict[str, Any]) -> None:
    """The masked run's game has the two groups as players; each of its coalition utilities equals the plaintext
    run's utility of the coalition of the same members (fixed-point rounding aside), so grouping loses
    resolution, not correctness; the audit (which redraws the groups from the revealed seed) passes."""
    opening = Ledger(runs["masked"]).entries()[0]["contribution"]
    committed = [tuple(g) for g in opening["groups"]]
    assert len(committed) == 2 and all(len(g) == 3 for g in committed)
    for plain, masked in zip(_rounds(runs["plain"]), _rounds(runs["masked"]), strict=True):
        clear, grouped = plain["contribution"], masked["contribution"]
        assert [tuple(p) for p in grouped["players"]] == committed
        index = {player[0]: i for i, player in enumerate(clear["players"])}
        for key, value in grouped["utilities"].items():
            members = [name for g in (committed[i] for i in range(2) if coalition_mask(key) >> i & 1) for name in g]
            same = "+".join(str(i) for i in sorted(index[name] for name in members))
            assert value == pytest.approx(clear["utilities"][same], abs=1e-5)
        for g, total in zip(committed, grouped["group_weights"], strict=True):
            assert total == sum(clear["data"][name] for name in g)  # the masked total weight: the group's examples
            assert sum(grouped["data"][name] for name in g) == pytest.approx(total)
        assert grouped["data_checked"] == [True, True]
        for g, value in zip(committed, grouped["values"], strict=True):
            assert all(grouped["utility"][name] == pytest.approx(value / 3) for name in g)
    assert audit(runs["masked"]) == []


def test_the_server_can_compute_one_sum_per_group_and_no_finer_one(runs: dict[str, Any]) -> None:
    """From the replies alone: every node dealt shares only to its group, so its pairwise masks cancel only in
    its group's sum; survivors revealed self-mask seeds, never a mask key, and only of their own group. The
    sums the server can unmask are unions of the mask graph's components: their indicator matrix has rank 2
    (the groups), below the 6 updates. With every seed it holds, one client's upload minus its self-mask is
    still not its update; its group's uploads minus their self-masks add up to the group's updates exactly."""
    replies = [(m.metadata.message_type, m, r) for m, r in runs["grid"].seen if not r.has_error()]
    committed = [tuple(g) for g in Ledger(runs["masked"]).entries()[0]["contribution"]["groups"]]
    round_one = [
        (step, m, r) for step, m, r in replies if int(m.content.config_records[wire.CONFIG][wire.SERVER_ROUND]) == 1
    ]
    peers = {}
    for step, message, reply in round_one:
        if step == wire.SECAGG_SHARES:
            name = next(n for n in NAMES if message.metadata.dst_node_id == NAMES.index(n) + 1)
            peers[name] = set(reply.content.config_records[wire.SEALED])
    assert all(peers[n] == set(groups.group_of(tuple(committed), n)) - {n} for n in NAMES)
    revealed = {}
    for step, message, reply in round_one:
        if step == wire.SECAGG_UNMASK:
            name = NAMES[message.metadata.dst_node_id - 1]
            revealed[name] = json.loads(str(reply.content.config_records[wire.CONFIG][wire.REVEALED]))
            assert revealed[name]["mask_key"] == {}
            assert set(revealed[name]["seed"]) <= set(groups.group_of(tuple(committed), name))
    components = _components(NAMES, peers)
    indicator = np.array([[float(n in c) for n in NAMES] for c in components])
    assert sorted(map(sorted, components)) == sorted(map(list, committed))
    assert np.linalg.matrix_rank(indicator) == 2 < len(NAMES)

    uploads = {
        NAMES[m.metadata.dst_node_id - 1]: r.content.array_records[wire.MASKED]["0"].numpy()
        for step, m, r in round_one
        if step == "train"
    }
    unmasked = {}
    for name, upload in uploads.items():
        shares = [bytes.fromhex(r["seed"][name]) for r in revealed.values() if name in r["seed"]]
        seed = shamir.combine(shares, 2)
        unmasked[name] = upload - primitives.keystream(seed, len(upload))
    experiment = get_experiment(config.compose(runs["overrides"]))
    honest = {name: _honest_encoding(experiment, NAMES.index(name), name) for name in NAMES}
    for name in NAMES:
        assert not np.array_equal(unmasked[name], honest[name])  # pairwise masks still on it
    for group in committed:
        assert np.array_equal(
            np.sum([unmasked[n] for n in group], axis=0, dtype=np.uint32),
            np.sum([honest[n] for n in group], axis=0, dtype=np.uint32),
        )


def _components(names: list[str], peers: dict[str, set[str]]) -> list[set[str]]:
    left, found = set(names), []
    while left:
        stack, component = [left.pop()], set()
        while stack:
            name = stack.pop()
            component.add(name)
            stack += [p for p in peers[name] if p not in component and p in left]
            left -= peers[name]
        found.append(component)
    return found


def _honest_encoding(experiment: Any, partition: int, name: str) -> np.ndarray:
    """The client's encoded round-1 update as it computes it itself: what the server must never see alone."""
    data = experiment.client_data(partition)
    update, metrics = client.train_round(experiment, data, experiment.initial_adapter(), 1, name, {})
    code = experiment.secure.fixed_point(len(NAMES), unit_weights=False)
    return code.encode(update, int(metrics["num_examples"]))


def _hostile(tiny_bert_dir: Path, tmp_path: Path, accounted: bool = True) -> tuple[HostileServer, dict[str, str], Any]:
    overrides = _overrides(tiny_bert_dir, tmp_path / "run", "secure=masking")
    if not accounted:
        overrides = [o for o in overrides if not o.startswith("contribution")]
    experiment = get_experiment(config.compose(overrides))
    server = HostileServer(make_nodes(tmp_path, overrides, 6), experiment.hash)
    return server, server.round_keys(NAMES, 1), experiment


def _shares(
    server: HostileServer, name: str, server_round: int, bundles: dict[str, str], grouping: list[list[str]]
) -> Any:
    return server.send(
        name, wire.SECAGG_SHARES, server_round, server.forward(bundles, **{wire.GROUPS: json.dumps(grouping)})
    )


HALVES = [NAMES[:3], NAMES[3:]]


def test_a_node_refuses_groups_its_experiment_did_not_agree_to(tiny_bert_dir: Path, tmp_path: Path) -> None:
    server, bundles, _ = _hostile(tiny_bert_dir, tmp_path, accounted=False)
    with pytest.raises(ProtocolError, match="does not account contributions"):
        _shares(server, NAMES[0], 1, bundles, HALVES)


def test_a_node_refuses_groups_smaller_than_agreed_or_that_leave_it_too_few_peers(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    server, bundles, _ = _hostile(tiny_bert_dir, tmp_path)
    with pytest.raises(ProtocolError, match="fewer than contribution.group_size=3"):
        _shares(server, NAMES[0], 1, bundles, [NAMES[:2], NAMES[2:]])  # the victim and one accomplice
    with pytest.raises(ProtocolError, match="in no group"):
        _shares(server, NAMES[0], 1, bundles, [NAMES[:3], NAMES[3:5]])
    # A group of three whose other members the server leaves out of the round: a sum of one.
    few = {n: bundles[n] for n in NAMES if n not in NAMES[1:3]}
    with pytest.raises(ProtocolError, match="fewer than this node's minimum of 3"):
        _shares(server, NAMES[0], 1, few, HALVES)


def test_a_node_keeps_its_group_for_the_whole_experiment(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Regrouping in a later round would reveal a sum over another set of clients: refused, and the record
    of the first group is on the node's disk, so another run of the experiment cannot regroup either."""
    server, bundles, _ = _hostile(tiny_bert_dir, tmp_path)
    reply = _shares(server, NAMES[0], 1, bundles, HALVES)
    assert set(reply.config_records[wire.SEALED]) == set(NAMES[1:3])  # shares only for its group
    regrouped = [[NAMES[0], *NAMES[3:5]], [*NAMES[1:3], NAMES[5]]]
    later = server.round_keys(NAMES, 2)
    with pytest.raises(ProtocolError, match="masks within the group"):
        _shares(server, NAMES[0], 2, later, regrouped)
    assert set(_shares(server, NAMES[0], 2, later, HALVES).config_records[wire.SEALED]) == set(NAMES[1:3])
    server.nodes[NAMES[0]].new_run()  # the node forgets the run; its disk does not
    with pytest.raises(ProtocolError, match="masks within the group"):
        _shares(server, NAMES[0], 2, server.round_keys(NAMES, 2), regrouped)


def test_a_group_survives_a_dropout_and_the_run_goes_on(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Eight hospitals in two groups of four (t = 3): one is lost at training in round 1. Its group's sum is
    of the three others, the round is applied, and the audit checks every number."""
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path / "run",
        "federation.num_clients=8",
        "data.loader.max_examples=600",
        "secure=masking",
        "contribution=shapley",
        "contribution.validation_rows=30",
        "contribution.group_size=4",
    )
    run_dir, _ = _run(tmp_path, overrides, 8, failures={"hospital-5": [(1, "train")]})
    first, second = _rounds(run_dir)
    assert "abandoned" not in first and sorted(first["participants"]) == sorted(
        set(f"hospital-{i}" for i in range(8)) - {"hospital-5"}
    )
    sizes = sorted(len(p) for p in first["contribution"]["players"])
    assert sizes == [3, 4] and sorted(len(p) for p in second["contribution"]["players"]) == [4, 4]
    assert "hospital-5" not in first["contribution"]["utility"]
    assert audit(run_dir) == []
    checkpoint = torch.load(run_dir / first["checkpoint_file"], weights_only=True)["adapter"]
    assert all(torch.isfinite(t).all() for t in checkpoint.values())


def test_audit_refuses_a_masked_round_valued_by_finer_sums_than_the_groups(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    """A ledger whose masked round has each hospital as its own player admits that the server obtained sums
    finer than the committed groups': the audit names it, even signed again by the server."""
    copy = tmp_path / "run"
    shutil.copytree(runs["masked"], copy)

    def singletons(entries: list[dict[str, Any]]) -> None:
        record = entries[1]["contribution"]
        record["players"] = [[name] for player in record["players"] for name in player]

    resign(copy, singletons)
    assert audit(copy) == [
        "entry 1 (round 1): the players are not the committed groups' members in the round (the server valued "
        "finer sums)"
    ]
