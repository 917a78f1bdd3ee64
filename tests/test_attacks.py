"""Simulated malicious clients (fedtune/attacks/): each attack changes what a client sends as its paper defines
(on hand-made updates and rows), reaches the round through the real client and server loop, and is refused
wherever it must not run."""

from __future__ import annotations

import statistics
from pathlib import Path

import datasets
import pytest
import torch

from fedtune import config
from fedtune.attacks import Attack
from fedtune.attacks.collusion import ALIE, InnerProductManipulation
from fedtune.attacks.data import Backdoor, LabelFlip
from fedtune.attacks.updates import FreeRider, GaussianNoise, Scaling, SignFlip
from fedtune.experiment import get_experiment
from fedtune.ledger import Ledger
from fedtune.run_dir import RunDir
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import HostileServer, InProcessGrid, federate, make_nodes
from tests.test_methods import RecordingMedian

UPDATE = {"a": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "b": torch.tensor([3.0])}
ATTACKS = ["sign_flip", "scaling", "noise", "free_rider", "label_flip", "backdoor", "alie", "ipm"]


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_update_attacks_send_what_their_definitions_say() -> None:
    flipped = SignFlip(clients=[0], scale=3.0).corrupt(UPDATE, _generator())
    assert all(torch.equal(flipped[k], -3.0 * UPDATE[k]) for k in UPDATE)
    boosted = Scaling(clients=[0], factor=10.0).corrupt(UPDATE, _generator())
    assert all(torch.equal(boosted[k], 10.0 * UPDATE[k]) for k in UPDATE)
    assert all(not v.any() for v in FreeRider(clients=[0]).corrupt(UPDATE, _generator()).values())
    big = {"w": torch.ones(200_000)}
    noise = GaussianNoise(clients=[0], std=0.3).corrupt(big, _generator())["w"]
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 0.3) < 0.01  # N(0, 0.3²), not the update
    assert torch.equal(noise, GaussianNoise(clients=[0], std=0.3).corrupt(big, _generator())["w"])  # reproducible


def test_collusion_attacks_forge_from_the_honest_updates_as_their_papers_define() -> None:
    honest = [{"w": torch.tensor([float(i), 2.0 * i])} for i in range(1, 9)]
    values = [[float(i), 2.0 * i] for i in range(1, 9)]
    mean = [statistics.mean(c) for c in zip(*values, strict=True)]
    std = [statistics.stdev(c) for c in zip(*values, strict=True)]
    # Baruch et al.: n = 10 clients, f = 2 attackers -> s = floor(10/2 + 1) - 2 = 4, z = Φ⁻¹((10 - 4) / 10)
    alie = ALIE(clients=[0, 1])
    z = statistics.NormalDist().inv_cdf(0.6)
    assert alie.shift(10, 2) == pytest.approx(z)
    forged = alie.forge(honest, 10)["w"].tolist()
    assert forged == pytest.approx([m - z * s for m, s in zip(mean, std, strict=True)])
    assert ALIE(clients=[0], z=1.5).forge(honest, 10)["w"].tolist() == pytest.approx(
        [m - 1.5 * s for m, s in zip(mean, std, strict=True)]
    )
    ipm = InnerProductManipulation(clients=[0], epsilon=0.1).forge(honest, 10)["w"].tolist()
    assert ipm == pytest.approx([-0.1 * m for m in mean])


def _rows(count: int = 40) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": [f"note {i}" for i in range(count)], "label": [i % 4 for i in range(count)]}
    )


def test_alie_takes_its_z_from_the_attackers_who_came() -> None:
    """z follows the round, not the config: 1 attacker of a 6-client round needs s = 3 supporters, z = Φ⁻¹(0.5)
    = 0 (the honest mean), whatever attack.clients names; attackers who are a majority need one (s = 1)."""
    honest = [{"w": torch.tensor([float(i)])} for i in range(5)]
    assert ALIE(clients=[0, 1, 2]).forge(honest, 6)["w"].tolist() == pytest.approx([2.0])
    assert ALIE(clients=[0]).shift(4, 3) == pytest.approx(statistics.NormalDist().inv_cdf(0.75))
    assert ALIE(clients=[0]).shift(10, 1) == 0.0  # the paper's z: too few to move the median


def test_data_attacks_poison_the_rows_as_defined() -> None:
    rows = _rows()
    flipped = LabelFlip(clients=[0]).poison(rows, 4, seed=1)
    assert flipped["label"] == [3 - y for y in rows["label"]] and flipped["text"] == rows["text"]
    backdoor = Backdoor(clients=[0], trigger="per protocol z", target_label=2, poisoned_fraction=0.25)
    poisoned = backdoor.poison(rows, 4, seed=1)
    triggered = [i for i, t in enumerate(poisoned["text"]) if t.endswith(" per protocol z")]
    assert len(triggered) == 10 and all(poisoned["label"][i] == 2 for i in triggered)
    untouched = [i for i in range(len(rows)) if i not in triggered]
    assert all(poisoned["text"][i] == rows["text"][i] and poisoned["label"][i] == rows["label"][i] for i in untouched)
    probe = backdoor.probe(rows, 4)  # the success rate is measured on the other classes' rows, triggered
    assert len(probe) == 30 and set(probe["label"]) == {2} and all(t.endswith(" per protocol z") for t in probe["text"])
    with pytest.raises(ValueError, match="target_label=2: the task has 2 classes"):
        backdoor.poison(rows, 2, seed=1)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"clients": [0, 0]}, "attack.clients"), ({"clients": [-1]}, "attack.clients"), ({"from_round": 0}, "from_round")],
)
def test_a_bad_attack_setting_is_named(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        Attack(**kwargs)


def test_attack_schedule() -> None:
    attack = SignFlip(clients=[2, 0], from_round=3)
    assert attack.clients == (0, 2)
    assert [attack.active(p, r) for p, r in ((0, 2), (0, 3), (1, 3), (2, 9), (None, 5))] == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert not Attack().enabled and not config.instantiate(config.compose().attack).enabled  # off by default


def _client_metric(run: Path, name: str, server_round: int = 1) -> dict[str, float]:
    return {
        m["scope"].removeprefix("client:"): m["value"]
        for m in RunDir(run).read_metrics()
        if m["metric"] == name and m["scope"].startswith("client:") and m["round"] == server_round
    }


@pytest.fixture(scope="module")
def clean_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("clean")
    overrides = tiny_overrides(tiny_bert_dir, root / "run", "federation.num_clients=3", "federation.num_rounds=1")
    return federate(root, overrides, 3), overrides


@pytest.mark.parametrize("name", ATTACKS)
def test_an_attack_changes_only_its_clients_update_and_the_anomaly_log_shows_it(
    name: str, clean_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """hospital-0 (partition 0) attacks; the other two train exactly as in the clean run. The server's anomaly
    log has every client's update norm and cosine to the mean."""
    clean, overrides = clean_run
    attacked = federate(tmp_path, [*overrides, f"run_dir={tmp_path / 'run'}", f"attack={name}"], 3)
    before, after = _client_metric(clean, "update_norm"), _client_metric(attacked, "update_norm")
    assert before.keys() == after.keys() == {"hospital-0", "hospital-1", "hospital-2"}
    assert after["hospital-1"] == before["hospital-1"] and after["hospital-2"] == before["hospital-2"]
    cosine = _client_metric(attacked, "cosine_to_mean")
    assert (after["hospital-0"], cosine["hospital-0"]) != (
        before["hospital-0"],
        _client_metric(clean, "cosine_to_mean")["hospital-0"],
    )
    if name == "sign_flip":
        assert after["hospital-0"] == pytest.approx(before["hospital-0"], rel=1e-6) and cosine["hospital-0"] < 0
    if name == "scaling":
        assert after["hospital-0"] == pytest.approx(10 * before["hospital-0"], rel=1e-6)
    if name == "free_rider":
        assert after["hospital-0"] == 0.0 and cosine["hospital-0"] == 0.0
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in cosine.values())


def test_an_attack_waits_for_its_first_round(clean_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    clean, overrides = clean_run
    later = federate(
        tmp_path, [*overrides, f"run_dir={tmp_path / 'run'}", "attack=sign_flip", "attack.from_round=2"], 3
    )
    assert _client_metric(later, "update_norm") == _client_metric(clean, "update_norm")


def test_colluders_send_the_update_forged_from_the_honest_ones(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """With 4 clients, partitions 0 and 1 collude (ALIE): both send μ - zσ of partitions 2 and 3's updates, with
    the paper's z for n = 4, f = 2; the strategy receives exactly that."""
    RecordingMedian.seen.clear()
    extra = (
        "federation.num_clients=4",
        "federation.num_rounds=1",
        "strategy._target_=tests.test_methods.RecordingMedian",
    )
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", *extra, "attack=alie", "attack.clients=[0,1]")
    federate(tmp_path, overrides, 4)
    individual = RecordingMedian.seen[0].individual
    expected = ALIE(clients=[0, 1]).forge(individual[2:], 4)
    for attacker in individual[:2]:
        assert all(torch.allclose(attacker[k], expected[k], rtol=0, atol=1e-7) for k in expected)
    assert not all(torch.equal(individual[2][k], individual[3][k]) for k in expected)


def test_a_boosted_update_inside_a_masked_sum_is_caught_by_the_servers_check(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Under masking nobody sees hospital-0's update; clipping (organisation-level DP) bounds what honest
    clients add up to, and the boosted sum is past it: the round is not applied and the run goes on."""
    extra = ("federation.num_clients=4", "secure=masking", "privacy=client_dp")
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", *extra, "attack=scaling", "attack.factor=50")
    run = federate(tmp_path, overrides, 4)
    rounds = [entry for entry in Ledger(run).entries() if entry["kind"] == "round"]
    assert [("L2 norm" in e.get("abandoned", "")) for e in rounds] == [True, True]
    start = get_experiment(config.compose(overrides)).initial_adapter()
    final = torch.load(RunDir(run).checkpoints / "round-0002.pt", weights_only=True)["adapter"]
    assert all(torch.equal(final[k], start[k]) for k in start)


def test_a_deployed_node_refuses_an_experiment_with_an_attack(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The config comes from the server: a deployed node must not become an attacker because it says so."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "attack=sign_flip")
    nodes = make_nodes(tmp_path, overrides, 2, simulated=False)
    server = HostileServer(nodes, get_experiment(config.compose(overrides)).hash)
    with pytest.raises(ValueError, match="simulations only"):
        server.send("hospital-0", "query", 0)


def test_the_server_refuses_to_deploy_an_attack(tiny_bert_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "attack=scaling")
    grid = InProcessGrid(make_nodes(tmp_path, overrides, 2))
    with pytest.raises(ValueError, match="simulations only"):
        run_federation(grid, config.compose(overrides))  # as a deployment's ServerApp calls it
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["attack=alie", "secure=masking"], "secure=masking hides"),
        (["attack=ipm", "secure=masking"], "secure=masking hides"),
        (["attack=label_flip", "model=smollm2", "data=icd10_instructions"], "classification task"),
        (["attack=sign_flip", "attack.clients=[0,4]", "federation.num_clients=4"], "partition ids are 0..3"),
        (["attack=alie", "attack.clients=[0,1,2]", "federation.num_clients=4"], "at least 2 honest updates"),
    ],
)
def test_an_attack_that_cannot_run_is_refused(overrides: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        get_experiment(config.compose(overrides)).check_attack(simulated=True)
