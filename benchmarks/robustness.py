"""Malicious hospitals against robust aggregation: every attack x every rule, side by side on the demo task.

The demo task (MiniLM, ICD-10 chapters, Dirichlet 0.5 label skew) with 10 simulated hospitals, of which 0 or
``--malicious`` (default 2) attack from round 1, at a reduced scale (``--scale long``: six times the
examples). Each robust rule is configured for that many bad updates (``strategy.byzantine``); centered
clipping's radius and norm bounding's bound are set to the median honest update norm of the clean FedAvg run's
first round, as an operator would read it off the anomaly log. Reported after the last round: central
macro-F1, its ratio to the same rule without attackers and to clean FedAvg, and, for the backdoor, its success
rate (triggered test rows of other classes put in the target class).

The federation runs through the real ServerApp loop and ClientApp over in-process Flower nodes
(tests/nodes.py; bit-identical to a Ray simulation), two runs at a time, one thread each.

    python benchmarks/robustness.py                                    # 2 of 10 malicious, every attack and rule
    python benchmarks/robustness.py --malicious 1,2,3 --seeds 0,1      # the full grid (hours on two cores)
    python benchmarks/robustness.py --malicious 1,3 --merge benchmarks/results/robustness.json  # add to a report
    python benchmarks/robustness.py --attacks sign_flip --rules fedavg,median --out /tmp/r.json
    python benchmarks/robustness.py --scale long --attacks none --seeds 0,1,2 \
        --out benchmarks/results/robustness_clean_long.json       # what each rule costs when nobody attacks

Writes JSON (every run, the machine), a markdown table beside it (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/nodes.py: the in-process nodes

ATTACKS = ["sign_flip", "scaling", "noise", "free_rider", "label_flip", "backdoor", "alie", "ipm"]
RULES = ["fedavg", "median", "trimmed_mean", "multi_krum", "bulyan", "centered_clipping", "norm_bounding"]
BYZANTINE_RULES = ("median", "trimmed_mean", "multi_krum", "bulyan")  # configured with f = strategy.byzantine
CLIENTS = 10
FEDERATION = [
    f"federation.num_clients={CLIENTS}",
    "partition=dirichlet",
    "partition.alpha=0.5",
    "federation.fraction_evaluate=0",  # central evaluation only, after the last round
    "federation.evaluate_every=1000",
]
SCALES = {
    # every attack x rule x count in about a minute a run: each hospital sees under one epoch
    "reduced": [
        *FEDERATION,
        "federation.num_rounds=4",
        "train.local_steps=8",
        "train.batch_size=8",
        "data.loader.max_examples=4000",
        "data.test_size=300",
        "train.eval_max_examples=300",
    ],
    # what a rule costs when nobody attacks, trained long enough for that cost to show (6x the reduced scale's
    # examples: about 1.4 epochs of a hospital's 1,100 rows on average; 1,000 test rows)
    "long": [
        *FEDERATION,
        "federation.num_rounds=8",
        "train.local_steps=12",
        "train.batch_size=16",
        "data.loader.max_examples=12000",
        "data.test_size=1000",
        "train.eval_max_examples=1000",
    ],
}
# What each attack sends, strong enough to matter with 2 of 10 (sign flip: the reference's c = 4; scaling:
# an honest update boosted 30x, a tenfold-too-large server step for the mean).
ATTACK_SETTINGS = {"sign_flip": ["attack.scale=4"], "scaling": ["attack.factor=30"], "noise": ["attack.std=0.05"]}


@functools.cache
def min_clients(rule: str, byzantine: int) -> int:
    """The smallest round the rule's guarantee holds for, as the strategy itself declares it."""
    from fedtune import config

    strategy = config.instantiate(config.compose([f"strategy={rule}", f"strategy.byzantine={byzantine}"]).strategy)
    return strategy.min_clients


def rule_overrides(rule: str, malicious: int, bound: float) -> list[str]:
    """The rule, configured for ``malicious`` bad updates a round, with the smallest round it needs."""
    overrides = [f"strategy={rule}"]
    if rule in BYZANTINE_RULES:
        byzantine = max(malicious, 1)
        overrides.append(f"strategy.byzantine={byzantine}")
        overrides.append(f"federation.min_train_clients={min_clients(rule, byzantine)}")
    if rule == "centered_clipping":
        overrides.append(f"strategy.radius={bound}")
    if rule == "norm_bounding":
        overrides.append(f"strategy.max_norm={bound}")
    return overrides


def run_one(job: dict) -> dict:
    """One federation in its own directory; returns its final central metrics (and backdoor success rate)."""
    torch.set_num_threads(1)
    from fedtune import config
    from fedtune.attacks.data import Backdoor
    from fedtune.experiment import get_experiment
    from fedtune.run_dir import RunDir
    from tests.nodes import federate

    root = Path(job["root"]) / job["name"]
    overrides = [*SCALES[job["scale"]], *job["overrides"], f"seed={job['seed']}", f"run_dir={root / 'run'}"]
    started = time.perf_counter()
    run = RunDir(federate(root, overrides, CLIENTS, prefix="partition"))
    lines = run.read_metrics()
    last = max(line["round"] for line in lines)
    central = {m["metric"]: m["value"] for m in lines if m["scope"] == "central" and m["round"] == last}
    first = [m["value"] for m in lines if m["metric"] == "update_norm" and m["round"] == 1]
    result = {
        **job,
        "macro_f1": central["macro_f1"],
        "accuracy": central["accuracy"],
        "median_update_norm_round1": statistics.median(first),
        "abandoned_rounds": sum(1 for m in lines if m["metric"] == "abandoned"),
        "wall_seconds": time.perf_counter() - started,
    }
    experiment = get_experiment(config.compose(overrides))
    backdoor = config.instantiate(config.compose(["attack=backdoor"]).attack)
    assert isinstance(backdoor, Backdoor)
    adapter = torch.load(run.checkpoints / f"round-{last:04d}.pt", weights_only=True)["adapter"]
    probe = backdoor.probe(experiment.test_set, experiment.num_labels)
    result["backdoor_success"] = experiment.evaluate(adapter, probe)["accuracy"]
    return result


def defended(overrides: list[str]) -> int | None:
    """How many bad updates a run's rule was set for (None: a rule without that setting, clean at any count)."""
    for override in overrides:
        if override.startswith("strategy.byzantine="):
            return int(override.split("=", 1)[1])
    return None


def fits(rule: str, malicious: int) -> bool:
    """Whether the rule, set for ``malicious`` bad updates, can run with the benchmark's hospitals."""
    return rule not in BYZANTINE_RULES or min_clients(rule, max(malicious, 1)) <= CLIENTS


def jobs(
    attacks: list[str], rules: list[str], counts: list[int], seeds: list[int], scale: str, root: str, bound: float
) -> list:
    """Every (rule, attack, malicious count, seed), with a clean run of each rule as set for each count; a rule
    is left out at a count it needs more hospitals for (Bulyan set for 2 needs 11)."""
    found = []
    for seed in seeds:
        for rule in rules:
            runnable = [count for count in counts if fits(rule, count)]
            for overrides in {tuple(rule_overrides(rule, count, bound)) for count in runnable}:
                byzantine = defended(list(overrides))
                suffix = f"-f{byzantine}" if byzantine is not None else ""
                found.append(
                    {"name": f"{rule}-clean{suffix}-s{seed}", "rule": rule, "attack": "none", "malicious": 0,
                     "seed": seed, "overrides": list(overrides), "scale": scale, "root": root}
                )  # fmt: skip
            for attack in attacks:
                for count in runnable:
                    attackers = "[" + ",".join(str(i) for i in range(count)) + "]"
                    overrides = [
                        *rule_overrides(rule, count, bound),
                        f"attack={attack}",
                        f"attack.clients={attackers}",
                        *ATTACK_SETTINGS.get(attack, []),
                    ]
                    found.append(
                        {"name": f"{rule}-{attack}-{count}-s{seed}", "rule": rule, "attack": attack,
                         "malicious": count, "seed": seed, "overrides": overrides, "scale": scale, "root": root}
                    )  # fmt: skip
    return sorted(found, key=lambda job: job["attack"] != "none")  # clean runs first


def ratio(f1: float, reference: list[dict] | None) -> float:
    """``f1`` over the mean macro-F1 of the reference runs (NaN without them)."""
    return f1 / statistics.mean(r["macro_f1"] for r in reference) if reference else float("nan")


def summarise(results: list[dict], counts: list[int]) -> list[dict]:
    """One block per malicious count, over the seeds its attacked runs have (the clean runs' without attacks):
    each rule's clean run as set for that count and every attack, as mean and sample sd over those seeds, with
    ratios to the same rule's clean run and to clean FedAvg over the same seeds."""
    rows = []
    for count in sorted(set(counts) | {r["malicious"] for r in results if r["malicious"]}):
        seeds = {r["seed"] for r in results if r["malicious"] == count} or {r["seed"] for r in results}
        groups: dict[tuple, list[dict]] = {}
        for r in results:
            byzantine = defended(r["overrides"])
            if r["seed"] in seeds and (
                r["malicious"] == count
                or (
                    r["malicious"] == 0
                    and fits(r["rule"], count)
                    and byzantine == defended(rule_overrides(r["rule"], count, 0.0))
                )
            ):
                groups.setdefault((r["rule"], r["attack"], byzantine), []).append(r)
        clean = {(rule, byzantine): group for (rule, attack, byzantine), group in groups.items() if attack == "none"}

        for (rule, attack, byzantine), group in sorted(groups.items(), key=lambda item: str(item[0])):
            f1 = [r["macro_f1"] for r in group]
            rows.append(
                {
                    "table_malicious": count,
                    "rule": rule,
                    "attack": attack,
                    "malicious": group[0]["malicious"],
                    "byzantine": byzantine,
                    "seeds": sorted(r["seed"] for r in group),
                    "macro_f1_mean": statistics.mean(f1),
                    "macro_f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
                    "vs_rule_clean": ratio(statistics.mean(f1), clean.get((rule, byzantine))),
                    "vs_fedavg_clean": ratio(statistics.mean(f1), clean.get(("fedavg", None))),
                    "backdoor_success": statistics.mean(r["backdoor_success"] for r in group),
                    "abandoned_rounds": sum(r["abandoned_rounds"] for r in group),
                }
            )
    return rows


def cell(row: dict | None, rule: str, count: int) -> str:
    """Macro-F1 (± its sample sd when there are several seeds) and its share of clean FedAvg's; the backdoor's
    success rate; or why the rule did not run."""
    if row is None:
        return "" if fits(rule, count) else f"needs {min_clients(rule, count)} hospitals"
    spread = f" ± {row['macro_f1_std']:.3f}" if len(row["seeds"]) > 1 else ""
    text = f"{row['macro_f1_mean']:.3f}{spread} ({row['vs_fedavg_clean']:.2f}x)"
    return text + (f", bd {row['backdoor_success']:.2f}" if row["attack"] == "backdoor" else "")


def table(rows: list[dict], rules: list[str]) -> str:
    """Rules as columns; per malicious count (and the seeds it ran), each rule's clean run as set for that count,
    then every attack.

    Attacked cells give macro-F1 and its share of clean FedAvg's (backdoor: also its success rate); clean cells
    give macro-F1 and its share of clean FedAvg's, which is what the rule costs when nobody attacks.
    """
    lines = [
        "| attack | malicious | seeds | " + " | ".join(f"`{rule}`" for rule in rules) + " |",
        "|---|---|---|" + "---|" * len(rules),
    ]
    for count in sorted({r["table_malicious"] for r in rows}):
        block = {(r["rule"], r["attack"]): r for r in rows if r["table_malicious"] == count}
        seeds = ",".join(str(s) for s in max((r["seeds"] for r in block.values()), key=len))
        for attack in ["none", *sorted({attack for _, attack in block} - {"none"})]:
            label = f"none (rules set for {count})" if attack == "none" else attack
            cells = [cell(block.get((rule, attack)), rule, count) for rule in rules]
            lines.append(f"| {label} | {0 if attack == 'none' else count} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], rules: list[str], path: Path) -> None:
    """Macro-F1 per attack (groups) and rule (bars, with the sd over seeds), one panel per malicious count
    (none: each rule's clean run as set for that count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["table_malicious"] for r in rows})
    attacks = ["none", *sorted({r["attack"] for r in rows} - {"none"})]
    figure, panels = plt.subplots(len(counts), 1, figsize=(11, 3.6 * len(counts)), squeeze=False)
    width = 0.8 / len(rules)
    for axes, count in zip(panels[:, 0], counts, strict=True):
        block = {(r["rule"], r["attack"]): r for r in rows if r["table_malicious"] == count}
        for i, rule in enumerate(rules):
            cells = [block.get((rule, attack)) for attack in attacks]
            axes.bar(
                [a + i * width for a in range(len(attacks))],
                [c["macro_f1_mean"] if c else 0.0 for c in cells],
                width,
                yerr=[c["macro_f1_std"] if c else 0.0 for c in cells],
                label=rule,
            )
        seeds = max((r["seeds"] for r in block.values()), key=len)
        axes.set_xticks([a + 0.4 - width / 2 for a in range(len(attacks))], attacks, fontsize=8)
        axes.set_ylabel("central macro-F1")
        axes.set_title(f"{count} of {CLIENTS} hospitals malicious, {len(seeds)} seed(s) (none: clean run)", fontsize=9)
        axes.grid(axis="y", alpha=0.3)
    # one legend above the panels: inside the first one it hid the tallest bars
    figure.legend(*panels[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(rules), fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))
    figure.savefig(path, dpi=120)


def main() -> None:
    """Calibrate the clipping bound on clean FedAvg, run the grid, write JSON, table and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, or none: clean runs only")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--malicious", default="2", help="comma-separated numbers of malicious hospitals")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--scale", choices=sorted(SCALES), default="reduced", help="rounds, steps and data (SCALES)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "robustness.json"))
    parser.add_argument("--merge", help="an earlier run's JSON (same scale): its runs join this one's report")
    args = parser.parse_args()
    attacks, rules = [] if args.attacks == "none" else args.attacks.split(","), args.rules.split(",")
    counts, seeds = [int(c) for c in args.malicious.split(",")], [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else None
    if earlier is not None and sorted(earlier["scale"]) != sorted(SCALES[args.scale]):
        raise SystemExit(f"--merge {args.merge}: it ran at another scale ({earlier['scale']}), not comparable")
    with tempfile.TemporaryDirectory() as root:
        if earlier is not None:  # its bound, so that its centered clipping and norm bounding runs are these
            bound, results = earlier["clipping_bound"], list(earlier["runs"])
        else:
            calibration = run_one(
                {"name": "calibration", "rule": "fedavg", "attack": "none", "malicious": 0, "seed": seeds[0],
                 "overrides": rule_overrides("fedavg", max(counts), 0.0), "scale": args.scale, "root": root}
            )  # fmt: skip
            bound = round(calibration["median_update_norm_round1"], 4)
            results = [{**calibration, "name": f"fedavg-clean-s{seeds[0]}"}] if "fedavg" in rules else []
        print(f"clipping bound (median honest update norm, round 1): {bound}", flush=True)
        done = {(r["attack"], r["malicious"], r["seed"], tuple(r["overrides"])) for r in results}
        grid = [
            job
            for job in jobs(attacks, rules, counts, seeds, args.scale, root, bound)
            if (job["attack"], job["malicious"], job["seed"], tuple(job["overrides"])) not in done
        ]
        counts = sorted(set(counts) | set(earlier.get("counts", ()) if earlier else ()))
        spent = earlier["seconds"] if earlier else 0.0

        def report() -> dict:
            return {
                "scale": SCALES[args.scale],
                "counts": counts,
                "attack_settings": ATTACK_SETTINGS,
                "clipping_bound": bound,
                "runs": results,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
                "seconds": time.perf_counter() - started + spent,
            }

        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, not a fork of torch's
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=spawn) as pool:
            for result in pool.map(run_one, grid):
                results.append(result)
                print(
                    f"{result['name']}: macro-F1 {result['macro_f1']:.3f} ({result['wall_seconds']:.0f} s)", flush=True
                )
                write(Path(args.out), report())  # after each run: a grid cut short keeps what it has
    print(write(Path(args.out), report()))


def write(out: Path, report: dict) -> str:
    """The report as JSON (with its summary), its markdown table (``.md``, returned) and its plot (``.png``);
    the columns are the rules that ran, in ``RULES`` order."""
    rows = summarise(report["runs"], report["counts"])
    ran = {r["rule"] for r in report["runs"]}
    rules = [rule for rule in RULES if rule in ran]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "summary": rows}, indent=2))
    markdown = table(rows, rules)
    out.with_suffix(".md").write_text(markdown + "\n")
    plot(rows, rules, out.with_suffix(".png"))
    return markdown


if __name__ == "__main__":
    main()
