"""What a hostile server cannot do by showing nodes different rounds: each test is an attack in the wire format
(the server is the test, tests/nodes.py), and each recovered a hospital's update, or a sum of two, against the
code before its fix (a hostile review of the fixed-group masking found them; the first and the share-withholding
attacks predate it).

The common thread: a node's update is safe only inside a sum of at least its ``min-round-clients``, and what
a node counts must be the peers its masks actually tie it to. So a node seals every share it deals under what
it was shown (the round's keys and, with contribution accounting, the groups): a peer shown anything else
cannot open it and is left out of its masks. It counts only the peers it masked with, refuses to upload or
reveal with fewer than its minimum, and never deals the same round keys for two different views.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune import client, config, wire
from fedtune.experiment import get_experiment
from fedtune.secure import identity, masking, primitives, shamir
from fedtune.secure.session import KeyBundle, ProtocolError
from tests.conftest import tiny_overrides
from tests.nodes import HostileServer, make_nodes

H = [f"hospital-{i}" for i in range(6)]


def _hostile(model_dir: Path, tmp_path: Path, count: int, *extra: str) -> tuple[HostileServer, Any]:
    overrides = tiny_overrides(
        model_dir,
        tmp_path / "run",
        f"federation.num_clients={count}",
        "data.loader.max_examples=600",
        "secure=masking",
        *extra,
    )
    experiment = get_experiment(config.compose(overrides))
    return HostileServer(make_nodes(tmp_path, overrides, count), experiment.hash), experiment


def _deal(
    server: HostileServer, name: str, bundles: dict[str, str], shown: list[str], grouping: list[list[str]] | None = None
) -> dict[str, Any]:
    """The shares request to ``name`` with only the keys of ``shown`` (its view of the round), and a grouping."""
    fields = {} if grouping is None else {wire.GROUPS: json.dumps(grouping)}
    reply = server.send(name, wire.SECAGG_SHARES, 1, server.forward({n: bundles[n] for n in shown}, **fields))
    return {
        "sealed": {k: bytes(v) for k, v in reply.config_records[wire.SEALED].items()},
        "committed": {k: str(v) for k, v in reply.config_records[wire.SHARE_COMMITMENTS].items()},
    }


def _train(
    server: HostileServer, name: str, adapter: dict, survivors: list[str], dealt: dict[str, dict], round_size: int
) -> tuple[np.ndarray, list[str]]:
    """A masked train message to ``name`` with every share dealt to it; its upload and the peers it left out."""
    sealed = {d: s["sealed"][name] for d, s in dealt.items() if name in s["sealed"]}
    content = RecordDict({wire.ARRAYS: wire.adapter_record(adapter)})
    content.config_records[wire.CONFIG] = ConfigRecord(
        {wire.SURVIVORS: json.dumps(survivors), wire.NUM_SAMPLED: round_size}
    )
    content.config_records[wire.SEALED] = ConfigRecord(sealed)
    content.config_records[wire.SHARE_COMMITMENTS] = ConfigRecord({d: dealt[d]["committed"][name] for d in sealed})
    reply = server.send(name, "train", 1, content)
    return reply.array_records[wire.MASKED]["0"].numpy(), json.loads(
        str(reply.config_records[wire.CONFIG][wire.EXCLUDED])
    )


# The victim h0 sees a normal round of three with h1 and h2; h1 and h2 are each shown a round with h3, h4, h5
# too, and those three a round without h0. Before the fix h0 masked with h1 and h2 as usual, h1's and h2's
# mask keys were also shared with h3, h4 and h5, who (told h1 and h2 dropped, 3 survivors of their round:
# allowed) revealed both keys; with h0's seed from h0 and h1, h0's update fell out, with no colluding client.
VIEWS = {
    H[0]: [H[0], H[1], H[2]],
    H[1]: [H[0], H[1], H[3], H[4], H[5]],
    H[2]: [H[0], H[2], H[3], H[4], H[5]],
    **{n: [H[1], H[2], H[3], H[4], H[5]] for n in H[3:]},
}


def test_a_victim_shown_another_round_than_its_peers_masks_with_none_of_them_and_refuses(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    server, experiment = _hostile(tiny_bert_dir, tmp_path, 6)
    bundles = server.round_keys(H, 1)
    dealt = {name: _deal(server, name, bundles, view) for name, view in VIEWS.items()}
    with pytest.raises(ProtocolError, match=r"valid shares, fewer than"):
        _train(server, H[0], experiment.initial_adapter(), H[:3], dealt, 3)


def test_groups_shown_differently_to_each_member_tie_the_victim_to_no_one(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The same attack through the grouping (contribution accounting): each node is shown a partition with a
    normal-looking group of its own, padded with other names."""
    server, experiment = _hostile(tiny_bert_dir, tmp_path, 6, "contribution=shapley", "contribution.validation_rows=20")
    bundles = server.round_keys(H, 1)
    groupings = {
        H[0]: [[H[0], H[1], H[2]], H[3:]],
        H[1]: [[H[0], H[1], *H[3:]], [H[2]]],
        H[2]: [[H[0], H[2], *H[3:]], [H[1]]],
        **{n: [list(H[1:]), [H[0]]] for n in H[3:]},
    }
    with pytest.raises(ProtocolError, match="fewer than contribution.group_size=3"):  # a group of one: refused
        _deal(server, H[1], bundles, H, groupings[H[1]])
    groupings = {
        H[0]: [[H[0], H[1], H[2]], H[3:]],
        H[1]: [[H[0], H[1], H[3]], [H[2], H[4], H[5]]],
        H[2]: [[H[0], H[2], H[4]], [H[1], H[3], H[5]]],
        **{n: [[H[1], H[3], H[4]], [H[0], H[2], H[5]]] for n in H[3:]},
    }
    dealt = {name: _deal(server, name, bundles, H, grouping) for name, grouping in groupings.items()}
    with pytest.raises(ProtocolError, match=r"valid shares, fewer than"):
        _train(server, H[0], experiment.initial_adapter(), H, dealt, 6)


def test_withholding_a_peers_shares_leaves_no_sum_of_two(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Three hospitals: the server keeps h2's shares from h0 and h1 (and theirs from it). Before the fix both left
    h2 out of their masks and still uploaded and unmasked, counting the three names the server listed: the
    server unmasked x0 + x1, the sum of a victim and one accomplice that min-round-clients exists to refuse."""
    server, experiment = _hostile(tiny_bert_dir, tmp_path, 3)
    names = H[:3]
    bundles = server.round_keys(names, 1)
    dealt = {name: _deal(server, name, bundles, names) for name in names}
    withheld = {d: {**s, "sealed": {k: v for k, v in s["sealed"].items() if k != H[0]}} for d, s in dealt.items()}
    withheld[H[2]]["sealed"] = {}
    with pytest.raises(ProtocolError, match=r"2 clients dealt this node valid shares"):
        _train(server, H[0], experiment.initial_adapter(), names, {H[1]: dealt[H[1]], H[2]: withheld[H[2]]}, 3)


def test_a_node_deals_its_round_keys_for_one_view_and_takes_fresh_keys_for_another(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Dealing the same mask key twice, to two sets of peers, would let the server rebuild the key from one set
    and the self-mask seed from the other. A second view with the same keys is refused; asked for keys again
    (the server sets a round up again after a dropout), the node makes fresh ones, whose dealing is new."""
    server, _ = _hostile(tiny_bert_dir, tmp_path, 5)
    bundles = server.round_keys(H[:5], 1)
    _deal(server, H[0], bundles, H[:5])
    _deal(server, H[0], bundles, H[:5])  # the same view again: allowed (a retried message)
    with pytest.raises(ProtocolError, match="already dealt its shares in this round"):
        _deal(server, H[0], bundles, H[:4])
    fresh = server.round_keys(H[:4], 1)
    assert fresh[H[0]] != bundles[H[0]] and fresh[H[1]] == bundles[H[1]]  # h1 never dealt: the same keys
    assert set(_deal(server, H[0], {**bundles, **fresh}, H[:4])["sealed"]) == set(H[1:4])


def test_a_node_of_a_grouped_experiment_refuses_a_round_without_groups_or_with_unknown_members(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    server, _ = _hostile(tiny_bert_dir, tmp_path, 6, "contribution=shapley", "contribution.validation_rows=20")
    bundles = server.round_keys(H, 1)
    with pytest.raises(ProtocolError, match="the server sent none"):
        _deal(server, H[0], bundles, H)
    with pytest.raises(ProtocolError, match=r"does not know: \['phantom-a', 'phantom-b'\]"):
        _deal(server, H[0], bundles, H, [[H[0], H[1], H[2], "phantom-a", "phantom-b"], H[3:]])


def _update(experiment: Any, partition: int, name: str) -> tuple[dict, int]:
    """A node's round-1 update and weight, as it computes them itself (what the server must not see alone)."""
    update, metrics = client.train_round(
        experiment, experiment.client_data(partition), experiment.initial_adapter(), 1, name, {}
    )
    return update, int(metrics["num_examples"])


def _combine(revealed: list[dict[str, dict[str, str]]], kind: str, name: str, threshold: int) -> bytes:
    shares = [bytes.fromhex(r[kind][name]) for r in revealed if name in r[kind]]
    return shamir.combine(shares[:threshold], threshold)


def test_different_unmask_lists_for_different_nodes_reveal_no_sum_of_two(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Five hospitals, one honest round (t = 3, every node masks with every other). At unmask the server tells
    each node another story: every node hears that h0 and h1 survived, and each that two of h2, h3, h4 dropped,
    so that three nodes reveal each of those three mask keys. Before the fix every node answered (3 survivors
    each, enough for its minimum), and the server stripped every mask but those between h0 and h1 from their
    uploads: x0 + x1, a sum of two. Now a node reveals only for the lists it signed and only once t peers
    signed the same: two stories cannot both gather t > n/2 signatures."""
    server, experiment = _hostile(tiny_bert_dir, tmp_path, 5)
    names = H[:5]
    bundles = server.round_keys(names, 1)
    dealt = {name: _deal(server, name, bundles, names) for name in names}
    adapter = experiment.initial_adapter()
    uploads = {name: _train(server, name, adapter, names, dealt, 5)[0] for name in names}
    stories = {
        H[0]: ([H[0], H[1], H[4]], [H[2], H[3]]),
        H[1]: ([H[0], H[1], H[3]], [H[2], H[4]]),
        H[2]: ([H[0], H[1], H[2]], [H[3], H[4]]),
        H[3]: ([H[0], H[1], H[3]], [H[2], H[4]]),
        H[4]: ([H[0], H[1], H[4]], [H[2], H[3]]),
    }
    revealed = []
    for name, (survivors, dropped) in stories.items():
        try:
            revealed.append(server.unmask(name, 1, survivors, dropped))
        except ProtocolError:
            continue
    length = len(uploads[H[0]])
    try:
        pair = uploads[H[0]] + uploads[H[1]]
        for name in (H[0], H[1]):
            pair = pair - primitives.keystream(_combine(revealed, "seed", name, 3), length)
            for gone in (H[2], H[3], H[4]):
                key = _combine(revealed, "mask_key", gone, 3)
                seed = masking._pair_seed(server.session(1), key, gone, KeyBundle.from_json(bundles[name]))
                mask = primitives.keystream(seed, length)
                pair = pair - mask if name < gone else pair + mask
    except shamir.ShareError:
        pair = None  # the server could not rebuild what it needs
    code = experiment.secure.fixed_point(5, unit_weights=False)
    honest = code.encode(*_update(experiment, 0, H[0])) + code.encode(*_update(experiment, 1, H[1]))
    assert pair is None or not np.array_equal(pair, honest)


def test_on_a_ring_withholding_a_neighbours_shares_cannot_isolate_a_node(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """SecAgg+ ring, k = 2, five hospitals, no colluder (a second hostile review). The server keeps the victim's
    right neighbour's shares from it, so it masks with its left neighbour only, and then drops that left
    neighbour; every node signs the same, true lists. Before the fix the victim revealed its self-mask seed,
    its left neighbour's mask key came from the others, and the victim's update fell out. Now a node counts
    only the agreements of peers it masked with: the victim has only its own, fewer than t = 2."""
    server, experiment = _hostile(tiny_bert_dir, tmp_path, 5, "secure.neighbours=2")
    names = H[:5]
    bundles = server.round_keys(names, 1)
    reveals = {name: server.ring(name, 1, bundles) for name in names}
    fields = {wire.RING_REVEALS: json.dumps(reveals)}
    dealt = {}
    for name in names:
        reply = server.send(name, wire.SECAGG_SHARES, 1, server.forward(bundles, **fields))
        dealt[name] = {
            "sealed": {k: bytes(v) for k, v in reply.config_records[wire.SEALED].items()},
            "committed": {k: str(v) for k, v in reply.config_records[wire.SHARE_COMMITMENTS].items()},
        }
    victim = H[0]
    left, right = sorted(set(dealt[victim]["sealed"]))
    adapter = experiment.initial_adapter()
    _, excluded = _train(server, victim, adapter, names, {left: dealt[left]}, 5)
    assert excluded == [right]  # it left its right neighbour out, and uploaded
    for name in names:
        if name not in (victim, left):
            _train(server, name, adapter, names, dealt, 5)
    survivors = [n for n in names if n != left]
    with pytest.raises(ProtocolError, match=r"1 of the peers this client masked with signed these unmask lists"):
        server.unmask(victim, 1, survivors, [left])


def test_one_colluding_node_cannot_sign_two_stories_into_a_victims_update(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Five hospitals, h4 colludes with the server (a second hostile review): it signs two stories, each with two
    honest signatures, so each had t = 3. Story 1 (h3 dropped) got h0's seed and h3's mask key from h1 and h2,
    story 2 (h1 and h2 dropped) their mask keys from h0 and h3; with h4's own secrets the victim h0's update fell
    out. A node now also needs more than half of the peers it masked with plus one colluder (node config
    ``colluders``, default 1) to have signed: 4 of 5, which two stories cannot both have."""
    server, experiment = _hostile(tiny_bert_dir, tmp_path, 5)
    names = H[:5]
    victim, a, b, x, colluder = names
    bundles = server.round_keys(names, 1)
    dealt = {name: _deal(server, name, bundles, names) for name in names}
    adapter = experiment.initial_adapter()
    for name in names:
        _train(server, name, adapter, names, dealt, 5)
    signer = identity.load_or_create(Path(str(server.nodes[colluder].context.node_config["identity-key"])))
    session = server.session(1)

    def signed(story: tuple[list[str], list[str]], honest: tuple[str, ...]) -> dict[str, bytes]:
        lists = masking.lists_digest(session, *story)
        return {
            **{name: server.agree(name, 1, *story) for name in honest},
            colluder: signer.sign(masking.agreement_bytes(session, colluder, lists)),
        }

    first, second = ([victim, a, b, colluder], [x]), ([victim, x, colluder], [a, b])
    for story, honest in ((first, (a, b)), (second, (victim, x))):
        agreements = signed(story, honest)
        for name in honest:
            with pytest.raises(
                ProtocolError, match="3 of the peers this client masked with signed these unmask lists, 4"
            ):
                server.unmask(name, 1, *story, agreements)
