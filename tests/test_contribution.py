"""Contribution accounting in the clear (fedtune/contribution/): who gets credit in a real in-process run, that
the credits are what the ledger's own numbers say, and that ``fedtune audit`` catches any that are not.

The federation of the main run: four hospitals reading their own files (ICD-10 code descriptions of three
chapters). Hospitals 0 and 1 hold the same file; hospital 2 is a free rider (it sends a zero update:
attack=free_rider); hospital 3's file has every label shifted to the next chapter (a label-flipping client).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from omegaconf import OmegaConf

from fedtune import cli, config, wire
from fedtune.assets import cache_dir
from fedtune.channel import RoundFailedError
from fedtune.contribution import reports
from fedtune.contribution.valuation import coalition_key
from fedtune.data.icd10 import icd10_chapters
from fedtune.experiment import Experiment, get_experiment
from fedtune.ledger import GENESIS, Ledger, audit, entry_hash
from fedtune.secure import identity
from fedtune.secure.session import Session
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import InProcessGrid, Node, make_nodes

CHAPTERS = (0, 1, 2)
FILES = {"hospital-0": "same.csv", "hospital-1": "same.csv", "hospital-2": "rider.csv", "hospital-3": "flipped.csv"}


@pytest.fixture(scope="module")
def clinic_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The server's file and the hospitals' own (see the module docstring), and the chapters' names."""
    corpus = icd10_chapters()
    rows = [row for row in corpus.dataset.shuffle(seed=0) if row["label"] in CHAPTERS][:1200]
    folder = tmp_path_factory.mktemp("clinics")

    def write(name: str, chosen: list[dict[str, Any]], shift: int = 0) -> None:
        with open(folder / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for row in chosen:
                label = CHAPTERS[(CHAPTERS.index(row["label"]) + shift) % len(CHAPTERS)]
                writer.writerow([row["text"], corpus.label_names[label]])

    write("server.csv", rows[:300])
    write("same.csv", rows[300:600])
    write("rider.csv", rows[600:900])
    write("flipped.csv", rows[900:1200], shift=1)
    return folder, [corpus.label_names[c] for c in CHAPTERS]


def clinic_overrides(model_dir: Path, clinic_files: tuple[Path, list[str]], *extra: str) -> list[str]:
    folder, label_names = clinic_files
    return [
        "model=local",
        f"model.path={model_dir}",
        "model.max_length=32",
        "data=local",
        f"data.loader.path={folder / 'server.csv'}",
        "data.loader.label_names=[" + ",".join(json.dumps(n) for n in label_names) + "]",
        "data.test_size=250",
        "partition=iid",
        "federation.num_clients=4",
        "federation.num_rounds=2",
        "train.local_steps=10",
        "train.batch_size=16",
        "train.lr=0.01",
        "train.eval_max_examples=200",
        "contribution=shapley",
        "contribution.validation_rows=150",
        "attack=free_rider",
        "attack.clients=[2]",
        *extra,
    ]


def run_clinics(
    root: Path, overrides: list[str], folder: Path, alter: Callable[[list[Node]], None] | None = None
) -> tuple[Path, Experiment]:
    """The four hospitals' run, in process (``alter`` may change nodes first); returns its directory and
    experiment."""
    run_config = config.to_run_config(overrides, str(root / "run"))
    own = {name: {"data-path": str(folder / file)} for name, file in FILES.items()}
    nodes = make_nodes(root, overrides, 4, own_config=own)
    if alter is not None:
        alter(nodes)
    experiment = get_experiment(config.load_experiment(run_config))
    run_federation(InProcessGrid(nodes), experiment.cfg, simulated=True)
    return root / "run", experiment


@pytest.fixture(scope="module")
def clinics_run(
    tiny_bert_dir: Path, clinic_files: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Experiment]:
    root = tmp_path_factory.mktemp("clinics-run")
    return run_clinics(root, clinic_overrides(tiny_bert_dir, clinic_files), clinic_files[0])


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in Ledger(run_dir).entries() if e["kind"] == "round"]


def test_the_free_rider_earns_no_utility_the_flipper_loses_some_and_the_twins_earn_alike(
    clinics_run: tuple[Path, Experiment],
) -> None:
    run_dir, _ = clinics_run
    summary = Ledger(run_dir).entries()[-1]["contribution"]
    utility = {name: totals["utility"] for name, totals in summary["totals"].items()}
    twins = utility["hospital-0"], utility["hospital-1"]
    assert min(twins) > 0
    assert abs(twins[0] - twins[1]) <= 0.25 * max(twins)  # the same data; only their batch order differs
    assert abs(utility["hospital-2"]) <= 0.2 * min(twins)  # a zero update adds about nothing
    assert utility["hospital-3"] < 0  # wrong labels make the shared model worse
    shares = summary["shares"]
    assert shares["hospital-3"]["utility"] == 0.0  # a negative total counts as none in the shares...
    assert shares["hospital-2"]["utility"] < 0.1
    value = summary["value"]
    assert min(value["hospital-0"], value["hospital-1"]) > value["hospital-2"] > value["hospital-3"]
    # ... and the data and compute they report are credited as reported (the free rider says it trained).
    for name in FILES:
        assert summary["totals"][name]["data"] == 2 * 270  # 300 rows, 10% kept back for validation
        assert summary["totals"][name]["compute"] == 2 * 10 * 16


def test_each_round_values_its_own_models_on_the_servers_validation_rows(clinics_run: tuple[Path, Experiment]) -> None:
    """v(empty) and v(all) are minus the validation loss of the round's starting and final global adapters, as
    an independent evaluation of the checkpoints finds; the values add up to their difference; validation
    rows are not test rows."""
    run_dir, experiment = clinics_run
    validation, test = experiment.contribution_set, experiment.test_set
    assert len(validation) == 150 and len(test) == 100
    assert not set(validation["text"]) & set(test["text"])
    previous = experiment.initial_adapter()
    for entry in _rounds(run_dir):
        record = entry["contribution"]
        adapter = torch.load(run_dir / entry["checkpoint_file"], weights_only=True)["adapter"]
        everyone = coalition_key((1 << len(record["players"])) - 1)
        assert record["utilities"][""] == pytest.approx(-experiment.evaluate(previous, validation)["loss"], abs=1e-6)
        assert record["utilities"][everyone] == pytest.approx(
            -experiment.evaluate(adapter, validation)["loss"], abs=1e-6
        )
        assert len(record["utilities"]) == 16 and record["method"] == "exact"
        assert sum(record["values"]) == pytest.approx(
            record["utilities"][everyone] - record["utilities"][""], abs=1e-12
        )
        previous = adapter


def test_the_ledger_keeps_each_nodes_signed_report(clinics_run: tuple[Path, Experiment]) -> None:
    run_dir, _ = clinics_run
    for entry in _rounds(run_dir):
        session = Session(entry["run_nonce"], entry["round"])
        for name, kept in entry["contribution"]["reports"].items():
            key, signature = entry["received"][name]["key"], bytes.fromhex(kept["signature"])
            report = reports.verify(kept["report"], signature, key, session, name)
            assert report.examples == 270 and report.bucket == 1 and report.compute == 160
            with pytest.raises(ValueError, match="not signed"):  # bound to its run and round
                reports.verify(kept["report"], signature, key, Session("another-run", entry["round"]), name)


def test_fedtune_contributions_shows_what_the_ledger_holds(
    clinics_run: tuple[Path, Experiment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = clinics_run
    assert cli.main(["contributions", str(run_dir), "--out", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "audited: every number follows from the ledger" in shown
    summary = Ledger(run_dir).entries()[-1]["contribution"]
    board = [line.split(",") for line in (tmp_path / "contributions.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in board] == sorted(summary["value"], key=lambda n: -summary["value"][n])
    for row in board:
        assert float(row[-1]) == pytest.approx(summary["value"][row[0]], abs=5e-4)
        assert float(row[4]) == pytest.approx(summary["totals"][row[0]]["utility"], abs=5e-6)
    assert (tmp_path / "contributions.png").stat().st_size > 0
    assert "## Contributions" in (run_dir / "README.md").read_text()
    assert cli.main(["contributions", str(tmp_path)]) == 2  # no ledger there


def resign(run_dir: Path, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Apply ``edit`` to the ledger's entries and sign the chain again with the server's own key: a server that
    writes numbers which do not add up (the chain itself then verifies)."""
    signer = identity.load_or_create(cache_dir() / "server-identity.pem")
    entries = Ledger(run_dir).entries()
    edit(entries)
    previous = GENESIS
    for entry in entries:
        entry["prev"] = previous
        entry["hash"] = entry_hash(entry)
        entry["signature"] = signer.sign(bytes.fromhex(entry["hash"])).hex()
        previous = entry["hash"]
    (run_dir / "ledger.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _shift_utility(entries: list[dict[str, Any]]) -> None:
    entries[1]["contribution"]["utilities"]["0+1"] += 0.01


def _raise_value(entries: list[dict[str, Any]]) -> None:
    entries[2]["contribution"]["values"][2] += 0.01


def _credit_data(entries: list[dict[str, Any]]) -> None:
    entries[1]["contribution"]["data"]["hospital-2"] += 100


def _raise_v(entries: list[dict[str, Any]]) -> None:
    entries[-1]["contribution"]["value"]["hospital-3"] = 0.5


def _forge_report(entries: list[dict[str, Any]]) -> None:
    wire = entries[2]["contribution"]["reports"]["hospital-1"]
    wire["report"] = wire["report"].replace('"examples":270', '"examples":2700')


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_shift_utility, "entry 1 (round 1): the Shapley values do not follow"),
        (_raise_value, "entry 2 (round 2): the Shapley values do not follow"),
        (_credit_data, "entry 1 (round 1): the data or compute credits do not follow"),
        (_raise_v, "entry 3 (export): the summary's value do not follow"),
        (_forge_report, "entry 2 (round 2): the contribution report of hospital-1 does not verify"),
    ],
)
def test_audit_names_the_round_whose_numbers_do_not_add_up(
    clinics_run: tuple[Path, Experiment], tmp_path: Path, edit: Callable[[list[dict[str, Any]]], None], named: str
) -> None:
    run_dir, _ = clinics_run
    copy = tmp_path / "run"
    _copy_run(run_dir, copy)
    assert audit(copy) == []
    lines = (copy / "ledger.jsonl").read_text().splitlines()
    edited = json.loads(lines[1])
    edited["contribution"]["utilities"]["0"] += 0.01  # an edit without signing again breaks the chain itself
    (copy / "ledger.jsonl").write_text("\n".join([lines[0], json.dumps(edited, sort_keys=True), *lines[2:]]) + "\n")
    assert audit(copy) == ["entry 1 (round round 1): its content does not match its hash (the entry was edited)"]
    _copy_run(run_dir, copy)
    resign(copy, edit)
    problems = audit(copy)
    assert len(problems) == 1 and problems[0].startswith(named)


def test_audit_refuses_other_weights_than_the_config_committed_to(
    clinics_run: tuple[Path, Experiment], tmp_path: Path
) -> None:
    run_dir, _ = clinics_run
    copy = tmp_path / "run"
    _copy_run(run_dir, copy)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("data: 0.25", "data: 0.5").replace("utility: 0.5", "utility: 0.25"))
    assert audit(copy) == ["entry 0 (start round 0): config.yaml was changed"]


def _copy_run(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def test_a_node_that_misreports_its_examples_gets_no_data_or_compute_credit(
    tiny_bert_dir: Path, clinic_files: tuple[Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hospital 3 signs a report of ten times the rows its update was trained on (a valid signature: it is its
    own report). The server refuses the report (the update itself stands), credits it no data or compute
    that round, and the audit agrees."""
    overrides = clinic_overrides(tiny_bert_dir, clinic_files, "federation.num_rounds=1")

    def misreport(nodes: list[Node]) -> None:
        liar = nodes[3]
        honest, signer = liar.app, identity.load_or_create(Path(str(liar.context.node_config["identity-key"])))

        def app(message: Message, context: Context) -> Message:
            reply = honest(message, context)
            if message.metadata.message_type != "train":
                return reply
            received = message.content.config_records[wire.CONFIG]
            session = Session(str(received[wire.RUN_NONCE]), int(received[wire.SERVER_ROUND]))
            stated = reports.Report.from_json(str(reply.content.config_records[reports.RECORD][reports.REPORT]))
            inflated = reports.Report(stated.examples * 10, 1, stated.steps, stated.batch_size)  # type: ignore[operator]
            text, signature = reports.sign(inflated, signer, session, liar.name)
            reply.content.config_records[reports.RECORD] = ConfigRecord(
                {reports.REPORT: text, reports.SIGNATURE: signature}
            )
            wire.sign(reply.content, signer, session, "train", liar.name)
            return reply

        liar.app = app  # type: ignore[assignment]

    run_dir, _ = run_clinics(tmp_path, overrides, clinic_files[0], misreport)
    record = _rounds(run_dir)[0]["contribution"]
    assert record["data"]["hospital-3"] == 0.0 and record["compute"]["hospital-3"] == 0.0
    assert record["data"]["hospital-0"] == 270.0
    assert "hospital-3" not in record["reports"] and "hospital-3" in record["utility"]
    assert "contribution report of hospital-3 refused: it reports 2700 examples, but its update says 270" in caplog.text
    assert audit(run_dir) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("secure=masking", "federation.num_clients=4"), "federation.num_clients=4 makes only one"),
        (("secure=masking", "federation.num_clients=6", "contribution.group_size=2"), "set it to at least 3"),
        (
            ("secure=masking", "federation.num_clients=6", "federation.fraction_train=0.5"),
            "federation.fraction_train=1",
        ),
        (("secure=masking", "federation.num_clients=6", "secure.neighbours=2"), "secure.neighbours=null"),
        (
            ("secure=masking", "federation.num_clients=6", "privacy=client_dp", "privacy.noise_at=clients"),
            "Use privacy.noise_at=server",
        ),
        (("contribution.weights.data=0.5",), "adding up to 1"),
        (("+contribution.weights.reputation=0",), "unknown kind(s) ['reputation']"),
        (("contribution.validation_rows=60",), "would take every row of the central test set (60"),
    ],
)
def test_settings_that_would_reveal_more_or_measure_nothing_are_refused_before_anything_runs(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    overrides = tiny_overrides(
        tiny_bert_dir, tmp_path / "run", "contribution=shapley", "contribution.validation_rows=20", *extra
    )
    assert cli.main(["run", *overrides]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedtune: config error:") and message in error
    assert not (tmp_path / "run").exists()


def test_contribution_none_leaves_the_experiment_hash_as_it_was_and_shapley_changes_it(tiny_bert_dir: Path) -> None:
    """Nodes pin and key their records on the experiment hash: an experiment without contribution accounting
    hashes as before the config group existed, and one with it is another experiment."""
    overrides = tiny_overrides(tiny_bert_dir, Path("unused"))
    plain = config.compose(overrides)
    without = OmegaConf.to_container(plain)
    del without["contribution"]  # type: ignore[union-attr, arg-type]
    assert config.experiment_hash(plain) == config.experiment_hash(OmegaConf.create(without))
    assert config.experiment_hash(config.compose([*overrides, "contribution=shapley"])) != config.experiment_hash(plain)


def test_a_resumed_run_credits_every_round_once_as_an_uninterrupted_one(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A round that fails (a node lost) and a resume: the ledger's contribution records and summary are those
    of the uninterrupted run, and the audit passes."""
    extra = ("contribution=shapley", "contribution.validation_rows=20", "federation.num_rounds=3")
    whole = tiny_overrides(tiny_bert_dir, tmp_path / "a" / "run", *extra)
    uninterrupted = _federate(tmp_path / "a", whole, 2)
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "b" / "run", *extra)
    with pytest.raises(RoundFailedError):
        _federate(tmp_path / "b", overrides, 2, failures={"hospital-1": [(3, "train")]})
    resumed = _federate(tmp_path / "b", [*overrides, "resume=true"], 2)
    assert audit(resumed) == []
    records = [[e["contribution"]["utilities"] for e in _rounds(run)] for run in (uninterrupted, resumed)]
    assert records[0] == records[1]
    summaries = [Ledger(run).entries()[-1]["contribution"] for run in (uninterrupted, resumed)]
    assert summaries[0] == summaries[1]


def _federate(root: Path, overrides: list[str], count: int, **options: Any) -> Path:
    run_config = config.to_run_config(overrides, str(root / "run"))
    run_federation(InProcessGrid(make_nodes(root, overrides, count, **options)), config.load_experiment(run_config))
    return root / "run"


def test_a_sampled_round_is_replayed_by_the_audit_from_its_seed(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Above ``exact_up_to`` players GTG-Shapley samples, seeded per round: the ledger records only the
    coalitions it evaluated, and the audit draws the same permutations and gets the same values."""
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path / "run",
        "federation.num_clients=4",
        "contribution=shapley",
        "contribution.validation_rows=20",
        "contribution.exact_up_to=2",
    )
    run_dir = _federate(tmp_path, overrides, 4)
    records = [e["contribution"] for e in _rounds(run_dir)]
    assert all(r["method"] == "gtg" and 4 <= r["permutations"] <= 50 for r in records)
    assert all(len(r["utilities"]) <= 16 for r in records)
    assert audit(run_dir) == []

    def fewer_permutations(entries: list[dict[str, Any]]) -> None:
        entries[1]["contribution"]["permutations"] -= 1

    resign(run_dir, fewer_permutations)
    assert audit(run_dir)[0].startswith("entry 1 (round 1): GTG-Shapley draws")
