"""Contribution accounting measured: what it costs a round, and whom it credits when hospitals misbehave.

Part ``cost``: the demo (``make demo``'s federation: MiniLM, ICD-10 chapters, 4 hospitals, 40 local steps of
batch 16) for a few rounds, without and with ``contribution=shapley``, in interleaved pairs, as real Flower
simulations. Reported: each run's median round time and their ratio, and what accounting spent of it (the
2^4 coalition evaluations on the server's validation rows).

Part ``attribution``: the reduced demo (4 hospitals, Dirichlet 0.5) with ``contribution=shapley``, clean and
with one misbehaving hospital (a free rider that sends a zero update; a label flipper), over seeds.
Reported: each hospital's cumulative utility credit (Shapley, validation loss), its utility share and its
contribution value V, and where the misbehaving hospital ranks.

    python benchmarks/contribution.py                       # both parts
    python benchmarks/contribution.py --part cost --rounds 3 --pairs 2
    python benchmarks/contribution.py --part attribution --seeds 0,1,2

Writes JSON (every run and the summary) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from compare_strategies import SCALE

from fedtune import cli
from fedtune.ledger import Ledger
from fedtune.run_dir import RunDir

# compare_strategies.py's reduced demo, without federated evaluation (accounting happens before it)
REDUCED = [o for o in SCALE if not o.startswith("federation.fraction_evaluate")] + ["federation.fraction_evaluate=0"]
SCENARIOS = {
    "clean": [],
    "free rider (hospital 0)": ["attack=free_rider", "attack.clients=[0]"],
    "label flipper (hospital 1)": ["attack=label_flip", "attack.clients=[1]"],
}


def run(overrides: list[str], run_dir: Path) -> Path:
    """One simulation, as ``fedtune run`` would start it."""
    code = cli.main(["run", *overrides, f"run_dir={run_dir}"])
    if code != 0:
        raise RuntimeError(f"fedtune run {' '.join(overrides)} failed (exit {code})")
    return run_dir


def cost(rounds: int, pairs: int, root: Path) -> dict[str, Any]:
    """Median round time of the demo without and with accounting, in interleaved pairs."""
    demo = [f"federation.num_rounds={rounds}", "federation.fraction_evaluate=0"]
    runs = []
    for pair in range(pairs):
        for accounted in (False, True):
            extra = ["contribution=shapley"] if accounted else []
            run_dir = run([*demo, *extra], root / f"cost-{pair}-{int(accounted)}")
            lines = RunDir(run_dir).read_metrics()
            seconds = [m["value"] for m in lines if m["metric"] == "round_seconds"]
            entry = {"pair": pair, "accounted": accounted, "round_seconds": seconds}
            if accounted:
                records = [e["contribution"] for e in Ledger(run_dir).entries() if e["kind"] == "round"]
                entry["accounting_seconds"] = [r["seconds"] for r in records]
                entry["evaluations"] = [r["evaluations"] for r in records]
            runs.append(entry)
    plain = [s for r in runs if not r["accounted"] for s in r["round_seconds"]]
    accounted = [s for r in runs if r["accounted"] for s in r["round_seconds"]]
    spent = [s for r in runs if r["accounted"] for s in r["accounting_seconds"]]
    return {
        "settings": demo,
        "runs": runs,
        "median_round_seconds": {"none": statistics.median(plain), "shapley": statistics.median(accounted)},
        "ratio": statistics.median(accounted) / statistics.median(plain),
        "median_accounting_seconds": statistics.median(spent),
        "accounting_share_of_round": statistics.median(spent) / statistics.median(accounted),
    }


def attribution(seeds: list[int], root: Path) -> dict[str, Any]:
    """Each hospital's credits in each scenario and seed."""
    runs = []
    for name, extra in SCENARIOS.items():
        for seed in seeds:
            run_dir = run([*REDUCED, "contribution=shapley", *extra, f"seed={seed}"], root / f"{name[:5]}-{seed}")
            summary = Ledger(run_dir).entries()[-1]["contribution"]
            runs.append(
                {
                    "scenario": name,
                    "seed": seed,
                    "utility": {n: t["utility"] for n, t in summary["totals"].items()},
                    "utility_share": {n: s["utility"] for n, s in summary["shares"].items()},
                    "value": summary["value"],
                }
            )
    table = {}
    for name in SCENARIOS:
        chosen = [r for r in runs if r["scenario"] == name]
        hospitals = sorted(chosen[0]["utility"])
        table[name] = {
            h: {
                kind: (statistics.mean(r[kind][h] for r in chosen), _spread([r[kind][h] for r in chosen]))
                for kind in ("utility", "utility_share", "value")
            }
            for h in hospitals
        }
    return {"settings": REDUCED, "runs": runs, "table": table}


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(result: dict[str, Any]) -> str:
    lines = []
    if "cost" in result:
        c = result["cost"]
        lines += [
            "## Cost (the demo, median round)",
            "",
            "| contribution | round (s) | accounting (s) |",
            "|---|---|---|",
            f"| none | {c['median_round_seconds']['none']:.1f} | |",
            f"| shapley | {c['median_round_seconds']['shapley']:.1f} | {c['median_accounting_seconds']:.1f} |",
            "",
            f"Ratio {c['ratio']:.2f}x; accounting is {c['accounting_share_of_round']:.0%} of an accounted round.",
            "",
        ]
    if "attribution" in result:
        lines += ["## Attribution (reduced demo, mean ± sd over seeds)", ""]
        for name, rows in result["attribution"]["table"].items():
            lines += [f"### {name}", "", "| hospital | utility | utility share | V |", "|---|---|---|---|"]
            for hospital, kinds in rows.items():
                cells = [f"{kinds[k][0]:+.4f} ± {kinds[k][1]:.4f}" for k in ("utility", "utility_share", "value")]
                lines.append(f"| {hospital} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "attribution", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each cost run")
    parser.add_argument("--pairs", type=int, default=2, help="interleaved (none, shapley) pairs of cost runs")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the attribution runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/contribution.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    with tempfile.TemporaryDirectory() as folder:
        if args.part in ("cost", "both"):
            result["cost"] = cost(args.rounds, args.pairs, Path(folder))
        if args.part in ("attribution", "both"):
            result["attribution"] = attribution([int(s) for s in args.seeds.split(",")], Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
