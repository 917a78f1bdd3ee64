"""What a curious or hostile aggregation server cannot do: each test is an attack on secure aggregation.

The server here is the test itself: it sends real nodes (the real ClientApp, in process) the messages it
likes, in the wire format, and tries to learn one hospital's individual update. Each attack recovered the
victim's update exactly, or corrupted the result, against the code before its fix; each test now shows the
nodes (or the real server) refusing. Read a test as the specification of what the server cannot do.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune import adapters, cli, client, config, engine, ranks, wire
from fedtune import experiment as experiment_module
from fedtune.client_settings import ClientSettings
from fedtune.experiment import Experiment, get_experiment
from fedtune.ledger import Ledger, audit
from fedtune.run_dir import RunDir
from fedtune.secure import fixed_point, graph, masking, primitives, shamir
from fedtune.secure.identity import Identity
from fedtune.secure.session import DOMAIN, KeyBundle, ProtocolError, RingReveal
from fedtune.seeding import noise_generator
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import HostileServer, InProcessGrid, make_nodes

VICTIM, A, B = "hospital-0", "hospital-1", "hospital-2"


def _checkpoint(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"round-{server_round:04d}.pt", weights_only=True)["adapter"]


def _train_metric(run_dir: Path, name: str) -> dict[int, float]:
    return {
        m["round"]: m["value"] for m in RunDir(run_dir).read_metrics() if m["scope"] == "train" and m["metric"] == name
    }


def _experiment(overrides: list[str]) -> Experiment:
    return get_experiment(config.compose(overrides))


def _honest_encoding(experiment: Experiment, partition: int, name: str, server_round: int, clients: int) -> np.ndarray:
    """The victim's encoded update as it computes it itself: what the server must never learn (the reference)."""
    data = experiment.client_data(partition)
    update, metrics = client.train_round(experiment, data, experiment.initial_adapter(), server_round, name, {})
    code = experiment.secure.fixed_point(clients, unit_weights=False)
    return code.encode(update, int(metrics["num_examples"]))


def test_a_node_masks_only_once_per_round_so_the_server_cannot_cancel_its_pairwise_masks(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The two-time pad. The server sends the victim `train` once with every peer among the survivors and once
    more per peer P with P left out. Each difference of two uploads is exactly the pairwise mask shared with P;
    the honest unmask step then gives the victim's self-mask seed, and its update falls out with no colluder.
    The victim must refuse the second masked upload of a round, whatever survivors list comes with it."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_clients=3", "secure=masking")
    experiment = _experiment(overrides)
    nodes = make_nodes(tmp_path, overrides, 3)
    server = HostileServer(nodes, experiment.hash)
    names = [VICTIM, A, B]
    setup = server.set_up(names, 1)
    adapter = experiment.initial_adapter()

    def upload(name: str, survivors: list[str]) -> np.ndarray:
        reply = server.train(name, 1, adapter, survivors, setup)
        return reply.array_records["masked"]["0"].numpy()

    full = upload(VICTIM, names)
    with pytest.raises(ProtocolError, match="already uploaded"):
        without = {peer: upload(VICTIM, [n for n in names if n != peer]) for peer in (A, B)}
        pairwise = {peer: full - without[peer] for peer in (A, B)}  # ±PRG(s_victim,peer), exactly
        for peer in (A, B):
            upload(peer, names)
        revealed = [server.unmask(peer, 1, names, []) for peer in (A, B)]
        seed = shamir.combine([bytes.fromhex(r["seed"][VICTIM]) for r in revealed], 2)
        recovered = full - primitives.keystream(seed, len(full)) - pairwise[A] - pairwise[B]
        assert not np.array_equal(recovered, _honest_encoding(experiment, 0, VICTIM, 1, 3))  # what the attack won


def _run(
    root: Path,
    overrides: list[str],
    count: int,
    failures: dict | None = None,
    tampering: dict | None = None,
    node_config: dict | None = None,
) -> Path:
    """The real server loop over ``count`` in-process nodes; returns the run directory."""
    nodes = make_nodes(root, overrides, count, failures=failures, tampering=tampering, node_config=node_config)
    run_federation(InProcessGrid(nodes), config.load_experiment(nodes[0].context.run_config))
    return root / "run"


@pytest.mark.parametrize("neighbours", ["null", "2"])
def test_the_masked_mean_equals_the_plaintext_mean_within_the_logged_bound(
    tiny_bert_dir: Path, tmp_path: Path, neighbours: str
) -> None:
    """Clients and server must decode with one fixed-point scale. With SecAgg+ rings the clients used their
    neighbourhood's size and the server the round's: with 5 clients and 2 neighbours the mean came out 1.67x
    too large. Here 5 hospitals, one lost after sharing its keys, on a complete graph and on a ring."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "federation.num_clients=5", "federation.num_rounds=1")
    lost = {"hospital-4": [(1, "train")]}
    plain = _run(tmp_path / "plain", overrides, 5, lost)
    # A ring neighbourhood of 3 that loses one cannot also outvote a colluder (node config colluders, default 1).
    nodes = {"colluders": 0} if neighbours == "2" else None
    masked = _run(
        tmp_path / "masked", [*overrides, "secure=masking", f"secure.neighbours={neighbours}"], 5, lost, None, nodes
    )
    bound = _train_metric(masked, "aggregation_error_bound")[1]
    assert 0 < bound < 1e-5 and _train_metric(masked, "clients") == {1: 4.0} == _train_metric(plain, "clients")
    initial, expected, got = _experiment(overrides).initial_adapter(), _checkpoint(plain, 1), _checkpoint(masked, 1)
    for key in expected:
        float32_rounding = 2 * torch.finfo(torch.float32).eps * expected[key].abs().max()
        assert (expected[key] - got[key]).abs().max() <= bound + float32_rounding
        assert (expected[key] - initial[key]).abs().max() > 100 * bound  # the round moved the adapter


@pytest.mark.parametrize("second_input", ["another adapter", "other settings"])
def test_a_node_trains_each_round_on_one_input_so_its_dp_noise_is_never_reused(
    tiny_bert_dir: Path, tmp_path: Path, second_input: str
) -> None:
    """DP noise is drawn from the node's secret and the round. The server sends `train` for round 1 twice, with
    two different global adapters, or one adapter and two different strategy settings (a proximal term):
    two updates carrying the same noise, whose difference is noise-free (within twice the clip norm here,
    where fresh noise would be hundreds of times larger). The node must refuse."""
    clip = 0.01
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path / "run",
        "federation.num_clients=3",
        "privacy=client_dp",
        "privacy.noise_at=clients",
        "privacy.noise_multiplier=50",
        f"privacy.clip_norm={clip}",
    )
    experiment = _experiment(overrides)
    server = HostileServer(make_nodes(tmp_path, overrides, 3), experiment.hash)
    first, plain = experiment.initial_adapter(), ClientSettings()
    second, settings = first, ClientSettings(proximal_mu=10.0)
    if second_input == "another adapter":
        second, settings = {key: value + 0.01 for key, value in first.items()}, plain

    def update(adapter: dict[str, torch.Tensor], settings: ClientSettings) -> dict[str, torch.Tensor]:
        fields = {wire.NUM_SAMPLED: 3, wire.SETTINGS: settings.to_json()}
        reply = server.train(VICTIM, 1, adapter, [VICTIM], {}, **fields)
        return wire.adapter_of(reply.array_records[wire.ARRAYS])

    one = update(first, plain)
    with pytest.raises(ProtocolError, match="already trained round 1"):
        two = update(second, settings)
        assert adapters.l2_norm(adapters.subtract(one, two)) > 100 * clip  # the noise did not cancel


def _masked_round(server: HostileServer, names: list[str], adapter: dict, experiment: Experiment) -> np.ndarray:
    """One honest masked round 1 over ``names``: the weighted sum an honest-but-curious server unmasks."""
    setup = server.set_up(names, 1)
    uploads = {
        name: server.train(name, 1, adapter, names, setup).array_records[wire.MASKED]["0"].numpy() for name in names
    }
    revealed = {name: server.unmask(name, 1, names, []) for name in names}
    bundles = {name: KeyBundle.from_json(text) for name, text in setup["bundles"].items()}
    commitments, committed = setup["commitments"], setup["share_commitments"]
    total, _ = masking.unmask(
        server.session(1), uploads, bundles, commitments, revealed, experiment.secure, committed, {}
    )
    summed, _ = experiment.secure.fixed_point(len(names), unit_weights=False).decode(total, adapter)
    return fixed_point.flatten(summed)


def test_a_round_is_never_summed_twice_over_different_clients(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Two sums of one round. Training is deterministic, so if round 1 is unmasked over S and later (a resume, a
    rerun of the same experiment with a new run) over S minus the victim, the difference is the victim's
    update, and an honest-but-curious server gets it without breaking any rule of one protocol run. A node
    that has uploaded in round 1 of this experiment never uploads in it again, whatever the run."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_clients=4", "secure=masking")
    experiment = _experiment(overrides)
    nodes = make_nodes(tmp_path, overrides, 4, simulated=False)
    adapter = experiment.initial_adapter()
    everyone = [node.name for node in nodes]
    first = _masked_round(HostileServer(nodes, experiment.hash, "first-run"), everyone, adapter, experiment)
    for node in nodes:
        node.new_run()  # a resumed or repeated run: Flower's Context.state starts empty, the node's disk does not
    with pytest.raises(ProtocolError, match="already uploaded"):
        second = _masked_round(HostileServer(nodes, experiment.hash, "second-run"), everyone[1:], adapter, experiment)
        data = experiment.client_data(0)
        update, metrics = client.train_round(experiment, data, adapter, 1, VICTIM, {})
        victim = fixed_point.flatten(update) * metrics["num_examples"]
        rounding = sum(n / (2 * experiment.secure.fixed_point(n, unit_weights=False).scale) for n in (4, 3))
        assert np.abs((first - second) - victim).max() > rounding  # the difference is the victim's update


def test_a_round_too_small_to_use_is_abandoned_before_anything_is_unmasked(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The server used to unmask a round and only then find fewer uploads than federation.min_train_clients,
    fail the round, and redo it after a resume with whoever was online: two sums of one round. Now every
    condition is checked first: 3 of 4 clients upload (t = 3, the run needs 4), so nobody is asked to unmask,
    the round is recorded as abandoned with the adapter unchanged, and the next round goes on."""
    overrides = tiny_overrides(
        tiny_bert_dir, tmp_path, "federation.num_clients=4", "federation.min_train_clients=4", "secure=masking"
    )
    nodes = make_nodes(tmp_path, overrides, 4, failures={"hospital-3": [(1, "train")]})
    run_federation(InProcessGrid(nodes), config.load_experiment(nodes[0].context.run_config))
    run = tmp_path / "run"
    assert not [node.name for node in nodes if (1, wire.SECAGG_UNMASK) in node.handled]
    initial = _experiment(overrides).initial_adapter()
    assert adapters.fingerprint(_checkpoint(run, 1)) == adapters.fingerprint(initial)
    assert _train_metric(run, "abandoned") == {1: 1.0} and _train_metric(run, "clients") == {2: 4.0}
    rounds = [entry for entry in Ledger(run).entries() if entry["kind"] == "round"]
    assert "3 clients uploaded a masked update, 4 are needed" in rounds[0]["abandoned"]
    assert "abandoned" not in rounds[1] and audit(run) == []


def _gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian releases without subsampling, from the closed-form RDP alpha / (2 sigma^2)
    and the RDP-to-DP conversion of Balle et al. 2020, over Opacus's default orders (an independent reference)."""
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = rounds * orders / (2 * noise_multiplier**2)
    epsilons = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(epsilons))


def test_organisation_epsilon_counts_the_noise_of_the_clients_who_actually_uploaded(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """With noise_at=clients each of the n round clients adds 1/n of the noise variance. When only k of them
    upload, the sum carries noise multiplier z * sqrt(k / n), but the accountant used to charge z. Here 10
    hospitals are sampled and 6 upload: the logged epsilon must be the one at z * sqrt(0.6)."""
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path,
        "federation.num_clients=10",
        "federation.num_rounds=1",
        "federation.fraction_evaluate=0",
        "secure=masking",
        "privacy=client_dp",
        "privacy.noise_at=clients",
        "privacy.noise_multiplier=1.0",
    )
    lost = {f"hospital-{i}": [(1, "train")] for i in range(6, 10)}
    run = _run(tmp_path, overrides, 10, lost)
    assert _train_metric(run, "clients") == {1: 6.0}
    logged = [m["value"] for m in RunDir(run).read_metrics() if m["metric"] == "client_dp_epsilon"]
    assert logged == [pytest.approx(_gaussian_epsilon(1.0 * np.sqrt(0.6), 1, 1e-3), rel=1e-9)]
    assert logged[0] > _gaussian_epsilon(1.0, 1, 1e-3) * 1.3  # what was charged before: far too little


def _masked_nodes(tiny_bert_dir: Path, tmp_path: Path, count: int, *extra: str, **node_config: object) -> tuple:
    overrides = tiny_overrides(
        tiny_bert_dir, tmp_path / "run", f"federation.num_clients={count}", "secure=masking", *extra
    )
    experiment = _experiment(overrides)
    nodes = make_nodes(tmp_path, overrides, count, simulated=False, node_config=node_config)
    return experiment, nodes, HostileServer(nodes, experiment.hash)


def test_a_node_refuses_a_round_smaller_than_its_own_minimum(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The threshold is a fraction of whatever client list the server forwards, at least 2: a round of the
    victim and one accomplice of the server has t = 2 and its sum, minus the accomplice's update, is the
    victim's. A node takes part only in rounds of at least its own node config's min-round-clients (3)."""
    _, _, server = _masked_nodes(tiny_bert_dir, tmp_path, 3)
    with pytest.raises(ProtocolError, match="2 clients sent round keys, fewer than this node's minimum of 3"):
        server.set_up([VICTIM, A], 1)


def test_a_deployed_node_takes_its_peers_identity_keys_only_from_its_own_list(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """By default a node took its peers' identity keys from the server, which could then invent every peer of
    the victim (keys it holds itself) and unmask the victim alone. A node with its own trusted-keys list
    refuses such peers; a deployed node without one refuses to join a masked run at all."""
    experiment, nodes, server = _masked_nodes(tiny_bert_dir, tmp_path, 3)
    victim_bundle = str(server.send(VICTIM, wire.SECAGG_KEYS, 1).config_records[wire.CONFIG][wire.BUNDLE])
    sybils = {f"sybil-{i}": Identity.generate() for i in range(2)}
    forged = [masking.advertise_keys(server.session(1), name, key)[1].to_json() for name, key in sybils.items()]
    request = ConfigRecord(
        {
            wire.BUNDLES: json.dumps([victim_bundle, *forged]),
            wire.IDENTITIES: json.dumps({name: key.public_hex for name, key in sybils.items()}),
        }
    )
    with pytest.raises(ProtocolError, match="not signed by its known identity key"):
        server.send(VICTIM, wire.SECAGG_SHARES, 1, RecordDict({wire.CONFIG: request}))
    del nodes[0].context.node_config["trusted-keys"]
    with pytest.raises(ProtocolError, match="needs this node's own list of its peers' identity keys"):
        server.send(VICTIM, "query", 0)
    assert experiment.secure.masked


def test_a_node_sizes_its_noise_share_by_the_round_it_verified(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """With noise_at=clients each client adds the noise share for n clients, and n came from the server
    unchecked: n = 10^6 would cut every client's noise a thousandfold. A masked node refuses any n other
    than the number of clients whose round keys it verified."""
    extra = ("privacy=client_dp", "privacy.noise_at=clients")
    experiment, _, server = _masked_nodes(tiny_bert_dir, tmp_path, 3, *extra)
    setup = server.set_up([VICTIM, A, B], 1)
    with pytest.raises(
        ProtocolError, match="says 1000000 clients take part in round 1, but this node verified the keys of 3"
    ):
        server.train(VICTIM, 1, experiment.initial_adapter(), [VICTIM, A, B], setup, **{wire.NUM_SAMPLED: 10**6})


def _garbage_shares(content: RecordDict) -> None:
    sealed = content.config_records[wire.SEALED]
    for peer in list(sealed):
        sealed[peer] = bytes(len(bytes(sealed[peer])))


def _lie_about_a_share(content: RecordDict) -> None:
    record = content.config_records[wire.CONFIG]
    revealed = json.loads(str(record[wire.REVEALED]))
    name = sorted(revealed["seed"])[0]
    share = bytearray.fromhex(revealed["seed"][name])
    share[-1] ^= 1
    revealed["seed"][name] = share.hex()
    record[wire.REVEALED] = json.dumps(revealed)


def _inflate_weight(content: RecordDict) -> None:
    array = content.array_records[wire.MASKED]["0"].numpy().copy()
    array[-1] += np.uint32(10**6)  # masks cancel in the sum whatever a client adds: the weight slot grows by 10^6
    content.array_records[wire.MASKED] = ArrayRecord([array])


def _push_values(content: RecordDict) -> None:
    array = content.array_records[wire.MASKED]["0"].numpy().copy()
    array[:-1] += np.uint32(2**30)  # every coordinate of the sum far outside what the others' values can reach
    content.array_records[wire.MASKED] = ArrayRecord([array])


@pytest.mark.parametrize(
    "step, tamper, lost_in_plaintext",
    [(wire.SECAGG_SHARES, _garbage_shares, True), (wire.SECAGG_UNMASK, _lie_about_a_share, False)],
    ids=["garbage-shares", "wrong-revealed-share"],
)
def test_one_malicious_client_cannot_stop_a_masked_round(
    tiny_bert_dir: Path, tmp_path: Path, step: str, tamper: object, lost_in_plaintext: bool
) -> None:
    """One malicious client of 4 (t = 3). Garbage encrypted shares used to make every recipient drop out, and one
    wrong revealed share failed the whole round. Now a recipient that cannot open (or check) a share treats its
    dealer as dropped, and a revealed share is checked against the dealer's commitment, so the liar is left out
    and the others unmask. The round is the plaintext round without the dealer of garbage (who is left out), or
    with the liar (whose own update was honest)."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "federation.num_clients=4", "federation.num_rounds=1")
    plain = _run(tmp_path / "plain", overrides, 4, {A: [(1, "train")]} if lost_in_plaintext else None)
    masked = _run(tmp_path / "masked", [*overrides, "secure=masking"], 4, tampering={A: {(1, step): tamper}})
    assert _train_metric(masked, "clients") == _train_metric(plain, "clients")
    bound = _train_metric(masked, "aggregation_error_bound")[1]
    expected, got = _checkpoint(plain, 1), _checkpoint(masked, 1)
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= bound + 2 * torch.finfo(torch.float32).eps * expected[
            key
        ].abs().max()


@pytest.mark.parametrize(
    "extra, tamper, reason",
    [
        ((), _inflate_weight, "total weight"),
        ((), _push_values, "outside"),
        (("privacy=client_dp", "privacy.clip_norm=0.05"), _push_values, "L2 norm"),
    ],
    ids=["weight", "range", "dp-norm"],
)
def test_a_masked_sum_no_honest_clients_could_produce_is_not_applied(
    tiny_bert_dir: Path, tmp_path: Path, extra: tuple, tamper: object, reason: str
) -> None:
    """After unmasking the server checked nothing: one client could claim any weight (the server divides by it)
    or push the sum far outside what clipped or range-checked updates add up to. Now the sum is checked, and a
    round that fails is abandoned with the adapter unchanged; the run goes on."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "federation.num_clients=4", "secure=masking", *extra)
    run = _run(tmp_path, overrides, 4, tampering={A: {(1, "train"): tamper}})
    rounds = [entry for entry in Ledger(run).entries() if entry["kind"] == "round"]
    assert reason in rounds[0]["abandoned"] and "abandoned" not in rounds[1]
    assert adapters.fingerprint(_checkpoint(run, 1)) == adapters.fingerprint(_experiment(overrides).initial_adapter())


@pytest.mark.parametrize("reproducible", [False, True])
def test_organisation_level_dp_does_not_give_away_who_took_part(
    tiny_bert_dir: Path, tmp_path: Path, reproducible: bool
) -> None:
    """Organisation-level DP is meant to hide whether a hospital took part. The exported model card listed every
    participant with its record-level epsilon, and clients were sampled from the public config seed while the
    accountant claimed amplification by that sampling. Now the card names nobody, the sample comes from the
    server's secret (a private file, in no checkpoint), and a fixed-size sample is charged for the sampled place
    one organisation can take from another (tests/test_client_dp.py)."""
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path,
        "federation.num_clients=4",
        "federation.fraction_train=0.5",
        "privacy=dp_sgd_client_dp",
        f"privacy.organisation.reproducible_noise={str(reproducible).lower()}",
        f"privacy.record.reproducible_noise={str(reproducible).lower()}",
    )
    run = _run(tmp_path, overrides, 4)
    card = (run / "README.md").read_text()
    assert "participants not named" in card and not any(f"hospital-{i}" in card for i in range(4))
    secrets_file = run / "private" / "secrets.json"
    assert secrets_file.stat().st_mode & 0o077 == 0
    secret = json.loads(secrets_file.read_text())["noise_secret"]
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        assert secret.encode() not in checkpoint.read_bytes()
    seed = 0 if reproducible else None
    for entry in (e for e in Ledger(run).entries() if e["kind"] == "round"):
        generator = noise_generator({"noise_secret": secret}, seed, "sample", entry["round"])
        assert entry["participants"] == [
            f"hospital-{i}" for i in sorted(torch.randperm(4, generator=generator)[:2].tolist())
        ]
    epsilon = [m["value"] for m in RunDir(run).read_metrics() if m["metric"] == "client_dp_epsilon"][-1]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # 2 of 4 sampled: rate 1/2 at z/2
    reference, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=0.5, noise_multiplier=0.5, steps=2, orders=orders), delta=1e-3
    )
    assert epsilon == pytest.approx(reference, rel=1e-9)


def test_two_nodes_with_the_same_name_are_both_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Without a trusted-keys list the server pins each node's key when the run starts. Two nodes that
    present one name (one of them an impostor: which one cannot be told) are both left out."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "federation.num_clients=3", "federation.num_rounds=1")
    nodes = make_nodes(tmp_path, overrides, 3)
    impostor = make_nodes(tmp_path / "impostor", overrides, 3)[1]  # hospital-1 again, with a key of its own
    impostor.node_id = 99
    run_federation(InProcessGrid([*nodes, impostor]), config.load_experiment(nodes[0].context.run_config))
    participants = [e["participants"] for e in Ledger(tmp_path / "run").entries() if e["kind"] == "round"]
    assert participants == [[VICTIM, B]]


def _ring_from_forwarded_keys(bundles: dict[str, KeyBundle], neighbours: int) -> dict[str, frozenset[str]]:
    """The ring as the protocol ordered it before the ring step: by a hash of the round keys the server forwards."""
    digest = hashlib.sha256(DOMAIN + b"ring")
    for name in sorted(bundles):
        bundle = bundles[name]
        digest.update(len(name.encode()).to_bytes(4, "big") + name.encode() + bundle.encryption_key + bundle.mask_key)
    return graph.ring_neighbourhoods(bundles, neighbours, digest.digest())


def test_a_secagg_plus_server_cannot_choose_the_victims_neighbours(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """SecAgg+ with 2 neighbours: a client masks with, and deals its shares to, its two ring neighbours only, so
    if both are the server's accomplices its update is theirs to unmask. The server holds every node's round
    keys before it picks which of them make the round (U1), and the ring was a hash of the keys it forwards:
    it searched the subsets of honest clients offline for one that seats its accomplices A and B on either
    side of the victim, in every round it liked. Now each client reveals a secret committed in its keys once
    U1 is fixed, and the ring follows those secrets: the server's pick is a blind guess (right in about 1 of
    10 rounds here), and the victim deals to the neighbours the revealed secrets give it."""
    count, neighbours = 12, 2
    experiment, nodes, server = _masked_nodes(
        tiny_bert_dir,
        tmp_path,
        count,
        f"secure.neighbours={neighbours}",
        "federation.num_rounds=5",
        **{"min-round-clients": 6},
    )
    names = [node.name for node in nodes]
    honest = [name for name in names if name not in (VICTIM, A, B)]
    planned_and_got = []
    for server_round in range(1, 6):
        bundles = server.round_keys(names, server_round)
        parsed = {name: KeyBundle.from_json(text) for name, text in bundles.items()}
        plan = next(  # the smallest round a node accepts (6) whose ring seats A and B around the victim
            {n: bundles[n] for n in (VICTIM, A, B, *others)}
            for size in range(3, len(honest) + 1)
            for others in itertools.combinations(honest, size)
            if _ring_from_forwarded_keys({n: parsed[n] for n in (VICTIM, A, B, *others)}, neighbours)[VICTIM] == {A, B}
        )
        ring = {name: server.ring(name, server_round, plan) for name in plan}
        content = server.forward(plan, **{wire.RING_REVEALS: json.dumps(ring)})
        dealt_to = set(server.send(VICTIM, wire.SECAGG_SHARES, server_round, content).config_records[wire.SEALED])
        revealed = {name: RingReveal.from_json(text) for name, text in ring.items()}
        assert dealt_to == experiment.secure.peers({n: parsed[n] for n in plan}, revealed)[VICTIM]
        planned_and_got.append(dealt_to == {A, B})
    assert not all(planned_and_got)  # the old ring gave the server its plan in every round


def test_a_node_reveals_its_ring_secret_for_one_set_of_clients_per_round(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Having seen the secrets of a round's clients, the server would like another draw: another U1 in the same
    round, the same round again after making the node forget it (keys asked for another round erase a round's
    secrets from memory), or the same round in a run of its own. A node reveals one secret per round of its
    experiment, for one set of clients, whatever the run: the set is on its disk, the secret derives from its
    identity key. Shown the same set again it answers the same, so an honest resume still works."""
    _, nodes, server = _masked_nodes(tiny_bert_dir, tmp_path, 8, "secure.neighbours=2", **{"min-round-clients": 6})
    names = [node.name for node in nodes]
    bundles = server.round_keys(names, 1)
    six, seven = ({n: bundles[n] for n in names[:size]} for size in (6, 7))
    first = RingReveal.from_json(server.ring(VICTIM, 1, six))
    with pytest.raises(ProtocolError, match="already revealed its ring secret"):
        server.ring(VICTIM, 1, seven)  # another U1, now that its secret is out
    server.round_keys([VICTIM], 2)  # the node forgets round 1's keys and secret
    forgotten = server.round_keys(names, 1)
    with pytest.raises(ProtocolError, match="already revealed its ring secret for round 1"):
        server.ring(VICTIM, 1, {n: forgotten[n] for n in names[:7]})
    other_run = HostileServer(nodes, server.experiment_hash, run_nonce="another-run")
    fresh = other_run.round_keys(names, 1)
    with pytest.raises(ProtocolError, match="already revealed its ring secret for round 1"):
        other_run.ring(VICTIM, 1, {n: fresh[n] for n in names[:7]})
    again = RingReveal.from_json(other_run.ring(VICTIM, 1, {n: fresh[n] for n in names[:6]}))
    assert again.secret == first.secret  # the same clients: the same secret, the same ring
    with pytest.raises(ProtocolError, match="not a round of this experiment"):
        server.round_keys([VICTIM], 10**6)  # nor an endless supply of round numbers


def test_every_secret_of_a_ring_is_checked_against_the_set_its_client_was_shown(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The server shows the victim one U1 and the others a U1 without it (so their rings would differ): what
    the others revealed was signed for their set, and the victim deals no shares with it."""
    _, nodes, server = _masked_nodes(tiny_bert_dir, tmp_path, 8, "secure.neighbours=2", **{"min-round-clients": 6})
    names = [node.name for node in nodes]
    bundles = server.round_keys(names, 1)
    six, without_victim = {n: bundles[n] for n in names[:6]}, {n: bundles[n] for n in names[1:8]}
    ring = {name: server.ring(name, 1, without_victim) for name in without_victim}
    ring[VICTIM] = server.ring(VICTIM, 1, six)
    forged = json.dumps({name: ring[name] for name in six})
    with pytest.raises(ProtocolError, match="was not revealed by it for the clients this node was shown"):
        server.send(VICTIM, wire.SECAGG_SHARES, 1, server.forward(six, **{wire.RING_REVEALS: forged}))


def test_a_resumed_run_completes_an_unmasked_round_instead_of_summing_it_again(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops after round 1 was unmasked and checkpointed, while it evaluates. The resumed run used to
    train round 1 again with whoever was online: a second sum of that round. Now it completes round 1 from its
    checkpoint, asks no node to train or unmask it again, and ends where an uninterrupted run ends."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "federation.num_clients=3", "secure=masking")
    uninterrupted = _run(tmp_path / "uninterrupted", overrides, 3)
    real = engine._log_central

    def crash_in_round_1(run_dir: RunDir, experiment: Experiment, adapter: dict, server_round: int) -> dict:
        if server_round == 1:
            raise KeyboardInterrupt("the server stops")
        return real(run_dir, experiment, adapter, server_round)

    nodes = make_nodes(tmp_path / "crashed", overrides, 3)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(engine, "_log_central", crash_in_round_1)
        run_federation(InProcessGrid(nodes), config.load_experiment(nodes[0].context.run_config))
    resumed_nodes = make_nodes(tmp_path / "crashed", [*overrides, "resume=true"], 3)
    run_federation(InProcessGrid(resumed_nodes), config.load_experiment(resumed_nodes[0].context.run_config))
    assert not [step for node in resumed_nodes for r, step in node.handled if r == 1 and step != "evaluate"]
    run = tmp_path / "crashed" / "run"
    rounds = [e for e in Ledger(run).entries() if e["kind"] == "round"]
    assert [(e["round"], len(e["participants"]), "abandoned" in e) for e in rounds] == [(1, 3, False), (2, 3, False)]
    assert adapters.fingerprint(_checkpoint(run, 2)) == adapters.fingerprint(_checkpoint(uninterrupted, 2))
    assert audit(run) == []


def test_a_masked_simulation_with_rounds_too_small_for_the_nodes_is_refused_at_start(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_clients=2", "secure=masking")
    assert cli.main(["run", *overrides]) == 2
    assert "samples 2 clients a round here, and a node refuses masked rounds of fewer than 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_server_cannot_rewrite_a_nodes_base_model_with_a_residual(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """FedEx-LoRA's dense residuals are folded into the frozen weights a node trains and evaluates. A server
    running FedAvg that slipped one into the global adapter would set the node's base weights to whatever it
    chose (a full-rank rewrite, far beyond what the LoRA factors can express). A node accepts residuals only
    from the strategy its own experiment composes: here it refuses, and its model is left as it was."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_clients=3")
    experiment = _experiment(overrides)
    server = HostileServer(make_nodes(tmp_path, overrides, 3), experiment.hash)
    adapter = experiment.initial_adapter()
    module = next(iter(ranks.lora_pairs(adapter)))
    layer = experiment.model().get_submodule(module).base_layer
    rewrite = {**adapter, module + adapters.RESIDUAL: torch.randn(layer.weight.shape) * 10}
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="folds none"):
        server.train(VICTIM, 1, rewrite, [VICTIM], {}, **{wire.NUM_SAMPLED: 3})
    request = RecordDict({wire.ARRAYS: wire.adapter_record(rewrite)})
    with pytest.raises(ValueError, match="folds none"):
        server.send(VICTIM, "evaluate", 1, request)
    assert torch.equal(layer.weight, before)


def test_a_new_run_dir_gives_a_deployed_node_neither_a_fresh_budget_nor_fresh_noise(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record-level DP in the clear. A deployed node kept its privacy state (accountant, noise secret, the rounds
    it trained) per run dir, which the server names: a server that ran the same experiment again under a new run
    dir got each round trained again from a fresh budget, as many times as it liked. Now a deployed node keeps
    it per experiment: round 1 again on another adapter is refused, and round 2 is charged on top of round 1."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_clients=2", "privacy=dp_sgd")
    experiment = _experiment(overrides)
    node = make_nodes(tmp_path, overrides, 2, simulated=False)[0]
    server = HostileServer([node], experiment.hash)
    adapter = experiment.initial_adapter()
    first = server.train(VICTIM, 1, adapter, [VICTIM, A], {})
    node.new_run()  # the next run, in a new ClientApp process (nothing cached), under a run dir of its own
    monkeypatch.setattr(experiment_module, "_EXPERIMENTS", {})
    node.context.run_config.update(config.to_run_config(overrides, str(tmp_path / "another-run")))
    other = {k: v + 0.01 for k, v in adapter.items()}
    with pytest.raises(ProtocolError, match="already trained round 1"):
        server.train(VICTIM, 1, other, [VICTIM, A], {})
    second = server.train(VICTIM, 2, other, [VICTIM, A], {})
    spent = [dict(reply.metric_records[wire.METRICS])["epsilon"] for reply in (first, second)]
    assert spent[1] > spent[0]  # the budget goes on from round 1, not from zero
