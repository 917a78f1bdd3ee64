"""Is the federation worth joining? Centralized, local-only and federated training side by side.

Every arm starts from the same base model and seeded adapter, trains on rows of one data split, and is
evaluated on the same central test set (rows no hospital holds):

- centralized: one trainer on the union of the hospitals' training rows (the ceiling);
- local-only: each hospital alone on its own training rows (the alternative a hospital really has); the
  table gives the best hospital of each seed and the mean over hospitals;
- federated: the hospitals together, with the strategy the overrides compose (FedAvg by default); every
  arm trains what that method trains (``strategy=head_only``: the head alone, in each arm).

The budget is equal compute: a hospital alone takes the steps it takes in the federation (rounds x local
steps), the centralized trainer the federation's total (clients per round x rounds x local steps), all at
the same batch size and learning rate. Each ``--privacy`` entry runs every arm under that mechanism:
``privacy=dp_sgd privacy.target_epsilon=8`` gives each federated hospital and each hospital alone epsilon
8 over its own rows, and the centralized trainer epsilon 8 over the pooled rows (the reference that DP
federated training is compared with). The local-only arm without DP is the bar a DP federation must
clear: a hospital that trains alone needs no DP, as nothing leaves the building.

``--grid KEY=V1,V2 ...`` runs every arm at every combination of those settings, and the table shows each
arm (under each privacy setting) at its own best combination, by the mean over the seeds of the task's
headline metric on the central test set (``SCORINGS``: macro-F1; a causal LM's perplexity of the reference
answers, lower better, with exact match and, for a closed set of answers, answer accuracy beside it), and
names it. Choosing on the test set flatters every arm alike; the JSON keeps every combination, so the spread
over the grid can be read too. ``--best-of SEARCH.json --seeds 3,4,5`` then runs each arm
only at the combination that search found best for it, on other seeds (other partitions, initialisations and
noise), so that the numbers reported were not the ones chosen on; with ``--under PRIVACY ...`` it runs those
combinations under other privacy settings (e.g. other epsilons) that were not searched themselves.
``--combine A.json B.json ...`` trains nothing: it writes the table and the privacy-utility plot of runs made
under different privacy settings, each column with its own seeds (runs of one setting made on other seeds
at another time are pooled). ICD-10 is public data, so the search spends no hospital's privacy budget (the
issue's "grid searched on public data outside the accounting").

    python benchmarks/quality.py                                   # no DP and DP-SGD at epsilon 8, 3 seeds
    python benchmarks/quality.py --privacy privacy=none "privacy=dp_sgd privacy.target_epsilon=1" --seeds 0
    python benchmarks/quality.py --no-hospitals --extra model.pooling=mean --out /tmp/mean_pooling.json
    python benchmarks/quality.py --extra data=hpo_systems --out benchmarks/results/quality_hpo.json
    python benchmarks/quality.py --extra model=smollm2 data=icd10_instructions train.generation_examples=50 \
        --out benchmarks/results/quality_causal.json
    python benchmarks/quality.py --seeds 0 --extra train.batch_size=64 --grid strategy=fedavg,head_only \
        train.lr=0.01,0.05,0.2 --out /tmp/search.json
    python benchmarks/quality.py --best-of /tmp/search.json --seeds 1,2,3 --out benchmarks/results/quality_tuned.json

Writes JSON (every run, the summary, the machine), a markdown table beside it (``.md``) and a plot of the
headline metric against epsilon (``.png``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from compare_strategies import SCALE, run_one

from fedtune import adapters, client, config
from fedtune.data.partition import ClientData
from fedtune.experiment import Experiment, get_experiment

Summaries = dict[str, dict[str, dict[str, dict[str, float]]]]  # privacy -> grid point -> arm -> summary


@dataclass(frozen=True)
class Scoring:
    """What the arms of a task are compared by: the ``headline`` metric (``higher`` better, or lower), which picks
    the best grid point and the best hospital, and the ``others`` reported beside it (higher better), each
    recorded where the task has it."""

    headline: str
    higher: bool
    others: tuple[str, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics each arm records (where its evaluation gives them)."""
        return self.headline, *self.others

    def better(self, value: float) -> float:
        """A key that is larger the better ``value`` of the headline metric is (for max())."""
        return value if self.higher else -value

    def worst(self, metric: str, values: list[float]) -> float:
        """The worst of one metric's ``values`` over seeds."""
        return min(values, key=self.better) if metric == self.headline else min(values)


SCORINGS = {
    "classification": Scoring("macro_f1", higher=True, others=("accuracy",)),
    # the reference answers' perplexity, which every test row adds to; on the first train.generation_examples
    # rows, exact match of greedy answers (what a reader of the answers sees) and, for a corpus with a closed
    # set of answers, answer accuracy (which answer the model finds likeliest; fedtune/evaluation.py)
    "causal_lm": Scoring("perplexity", higher=False, others=("exact_match", "answer_accuracy")),
}


LABELS = {
    "macro_f1": "macro-F1",
    "accuracy": "accuracy",
    "perplexity": "perplexity",
    "exact_match": "exact match",
    "answer_accuracy": "answer accuracy",
}


def scoring_of(overrides: list[str]) -> Scoring:
    """The scoring of the task ``overrides`` compose (``model.task``).

    Raises:
        SystemExit: A task the benchmark has no central test metrics for (plain text: no held-out answers).
    """
    task = config.compose(overrides).model.task
    if task not in SCORINGS:
        raise SystemExit(f"model.task={task}: the quality benchmark compares {' and '.join(SCORINGS)} tasks")
    return SCORINGS[task]


@dataclass(frozen=True)
class SoloArm:
    """One trainer alone: its name, the rows it trains on and how many steps it takes."""

    name: str
    rows: ClientData
    steps: int


def solo_arms(experiment: Experiment) -> list[SoloArm]:
    """The centralized trainer and each hospital alone, on the federation's own split and at equal compute."""
    federation, local_steps = experiment.federation, experiment.train_config.local_steps
    clients = [experiment.client_data(partition) for partition in range(federation.num_clients)]
    per_round = federation.num_sampled(federation.num_clients, federation.fraction_train)
    union = ClientData(
        datasets.concatenate_datasets([data.train for data in clients]),
        datasets.concatenate_datasets([data.val for data in clients]),
    )
    alone = [
        SoloArm(f"hospital-{partition}", data, federation.num_rounds * local_steps)
        for partition, data in enumerate(clients)
    ]
    return [SoloArm("centralized", union, per_round * federation.num_rounds * local_steps), *alone]


def train_alone(overrides: list[str], arm: SoloArm, test_set: datasets.Dataset, scoring: Scoring) -> dict[str, float]:
    """Train ``arm`` as one client's single long round (``client.train_round``, so DP-SGD calibrates its
    noise for exactly these steps on these rows), training what the strategy has its clients train; its
    metrics on the federation's central ``test_set``."""
    solo = get_experiment(config.compose([*overrides, f"train.local_steps={arm.steps}", "federation.num_rounds=1"]))
    initial, settings = solo.initial_adapter(), solo.new_strategy().configure(1, arm.name)
    update, metrics = client.train_round(solo, arm.rows, initial, 1, arm.name, privacy_state={}, settings=settings)
    central = solo.evaluate(adapters.apply(initial, update), test_set)
    return {
        **{metric: central[metric] for metric in scoring.metrics if metric in central},
        "steps": float(arm.steps),
        "train_rows": float(len(arm.rows.train)),
        "trained_values": float(sum(tensor.numel() for tensor in update.values())),
        **({"epsilon": metrics["epsilon"]} if "epsilon" in metrics else {}),
    }


ARMS = ("centralized", "hospitals", "federated")  # what run_seed can run: the hospitals alone go together


def run_seed(seed: int, privacy: str, base: list[str], root: Path, arms: tuple[str, ...] = ARMS) -> dict[str, dict]:
    """The ``arms`` for one seed under one privacy setting (``root``: this setting's own directory)."""
    overrides = [*base, *shlex.split(privacy), f"seed={seed}", f"run_dir={root / 'solo'}"]
    experiment, scoring = get_experiment(config.compose(overrides)), scoring_of(overrides)
    central, *alone = solo_arms(experiment)
    solo = ([central] if "centralized" in arms else []) + (alone if "hospitals" in arms else [])
    results: dict[str, dict] = {arm.name: train_alone(overrides, arm, experiment.test_set, scoring) for arm in solo}
    if "federated" in arms:
        strategy = strategy_of(base)
        federated = run_one(strategy, seed, [*base, *shlex.split(privacy)], root)
        recorded = {metric: federated[metric] for metric in scoring.metrics if metric in federated}
        results["federated"] = {"strategy": strategy, **recorded}
    return results


def arms_at_best(best: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Grid point -> the arms to run there: each arm where a search found it best (``best``: arm -> point;
    the hospitals alone where the best of them did best)."""
    chosen = {"centralized": best["centralized"], "federated": best["federated"]}
    if "best hospital alone" in best:
        chosen["hospitals"] = best["best hospital alone"]
    plan: dict[str, tuple[str, ...]] = {}
    for arm in ARMS:
        if arm in chosen:
            plan[chosen[arm]] = (*plan.get(chosen[arm], ()), arm)
    return plan


def strategy_of(overrides: list[str]) -> str:
    """The conf/strategy name ``overrides`` choose (the last one wins, as in Hydra; FedAvg without one)."""
    chosen = [override.split("=", 1)[1] for override in overrides if override.startswith("strategy=")]
    return chosen[-1] if chosen else "fedavg"


def merge_searches(searches: list[dict]) -> tuple[list[str], list[str], Summaries]:
    """The common overrides, the grids and the summaries of several ``--grid`` runs' JSON (one search split
    into parts); a point run by two of them keeps the later one's summary.

    Raises:
        SystemExit: The searches ran on different overrides (their points would not compare).
    """
    if any(search["overrides"] != searches[0]["overrides"] for search in searches):
        raise SystemExit("--best-of: the searches ran with different --extra overrides; their points do not compare")
    summaries: Summaries = {}
    for search in searches:
        for privacy, by_point in search["summary"].items():
            summaries.setdefault(privacy, {}).update(by_point)
    return searches[0]["overrides"], [setting for search in searches for setting in search["grid"]], summaries


def grid_points(grid: list[str]) -> list[list[str]]:
    """Every combination of the ``KEY=V1,V2`` settings of ``grid``, as override lists (one empty one without)."""
    axes = []
    for setting in grid:
        key, _, values = setting.partition("=")
        if not values:
            raise SystemExit(f"--grid {setting!r}: write KEY=V1,V2")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def best_points(summaries: dict[str, dict[str, dict]], scoring: Scoring) -> dict[str, str]:
    """For each arm, the grid point (a key of ``summaries``) with its best mean headline metric."""
    arms = {arm for summary in summaries.values() for arm in summary}
    mean = f"{scoring.headline}_mean"
    return {
        arm: max((p for p in summaries if arm in summaries[p]), key=lambda p: scoring.better(summaries[p][arm][mean]))
        for arm in arms
    }


def summarise(runs: list[dict[str, dict]], scoring: Scoring) -> dict[str, dict[str, float]]:
    """Per arm: mean, sample standard deviation and worst seed; for the hospitals alone also the best one of
    each seed by the headline metric (the partition changes with the seed, so hospital-0 of two seeds are
    different hospitals) and the mean over hospitals."""
    arms: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        for arm, values in run.items():
            arms.setdefault(arm, []).append(values)
    hospitals = sorted(arm for arm in arms if arm.startswith("hospital-"))
    if hospitals:
        arms["best hospital alone"] = [
            max((run[h] for h in hospitals), key=lambda v: scoring.better(v[scoring.headline])) for run in runs
        ]
        arms["hospitals alone (mean)"] = [
            {metric: statistics.mean(arms[h][i][metric] for h in hospitals) for metric in recorded(runs, scoring)}
            for i in range(len(runs))
        ]
    summary: dict[str, dict] = {}
    for arm, values in arms.items():
        summary[arm] = {"seeds": len(values)}
        for metric in recorded(runs, scoring):
            column = [v[metric] for v in values]
            summary[arm][f"{metric}_mean"] = statistics.mean(column)
            summary[arm][f"{metric}_std"] = statistics.stdev(column) if len(column) > 1 else 0.0
            summary[arm][f"{metric}_worst"] = scoring.worst(metric, column)
    return summary


def recorded(runs: list[dict[str, dict]], scoring: Scoring) -> list[str]:
    """The scoring's metrics that every arm of every run recorded (answer accuracy only for a closed answer set)."""
    return [m for m in scoring.metrics if all(m in values for run in runs for values in run.values())]


def at_best(summaries: Summaries, scoring: Scoring) -> dict[str, dict[str, tuple[str, dict[str, float]]]]:
    """privacy -> arm -> (its best grid point, its summary there)."""
    return {
        privacy: {arm: (point, by_point[point][arm]) for arm, point in best_points(by_point, scoring).items()}
        for privacy, by_point in summaries.items()
    }


def table(summaries: Summaries, named: bool, scoring: Scoring) -> str:
    """Markdown: one row per arm, one column per privacy setting (the headline metric's mean ± sd with the worst
    seed, then each other recorded metric's mean ± sd, at the arm's best grid point, ``named`` or not; the header
    says over how many seeds)."""
    best, settings, headline = at_best(summaries, scoring), list(summaries), scoring.headline
    arms = best[settings[0]]
    order = [a for a in ("centralized", "federated", "best hospital alone", "hospitals alone (mean)") if a in arms]
    seeds = [int(best[s]["centralized"][1]["seeds"]) for s in settings]
    others = [m for m in scoring.others if all(f"{m}_mean" in best[s][a][1] for s in settings for a in order)]
    names = " / ".join(LABELS[metric] for metric in (headline, *others))
    rows = [
        "| arm | " + " | ".join(f"{names}, {s} ({n} seeds)" for s, n in zip(settings, seeds, strict=True)) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for arm in order:
        cells = []
        for setting in settings:
            point, s = best[setting][arm]
            values = [f"{s[f'{headline}_mean']:.3f} ± {s[f'{headline}_std']:.3f} ({s[f'{headline}_worst']:.3f})"]
            values += [f"{s[f'{metric}_mean']:.3f} ± {s[f'{metric}_std']:.3f}" for metric in others]
            cells.append(" / ".join(values) + (f" at `{point}`" if named else ""))
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def epsilon_of(privacy: str) -> float:
    """The epsilon a privacy setting names (infinity without DP), for the plot's axis."""
    for token in shlex.split(privacy):
        if token.startswith("privacy.target_epsilon="):
            return float(token.split("=", 1)[1])
    return float("inf")


def plot(summaries: Summaries, path: Path, scoring: Scoring) -> None:
    """The headline metric against epsilon (no DP drawn at the right), one line per arm at its best grid point
    under each setting, one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, headline = at_best(summaries, scoring), scoring.headline
    settings = sorted(summaries, key=epsilon_of)
    finite = [epsilon_of(s) for s in settings if epsilon_of(s) != float("inf")]
    no_dp_at = 2 * max(finite) if finite else 1.0
    xs = [epsilon_of(s) if epsilon_of(s) != float("inf") else no_dp_at for s in settings]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm in best[settings[0]]:
        if arm.startswith("hospital-"):
            continue
        means = [best[s][arm][1][f"{headline}_mean"] for s in settings]
        spreads = [best[s][arm][1][f"{headline}_std"] for s in settings]
        axes.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=arm)
    axes.set_xscale("log")
    axes.set_xticks(xs, [f"{x:g}" if x != no_dp_at else "no DP" for x in xs])
    axes.set_xlabel("epsilon per hospital (record-level DP-SGD)")
    axes.set_ylabel(f"central test {LABELS[headline]}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    """Run every arm for every seed, privacy setting and grid point; write JSON, the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--privacy", nargs="+", default=["privacy=none", "privacy=dp_sgd privacy.target_epsilon=8"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, applied to every arm")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="settings searched for each arm")
    parser.add_argument(
        "--best-of", type=Path, nargs="+", help="--grid runs' JSON: each arm at the point they found best for it"
    )
    parser.add_argument("--under", nargs="+", help="with --best-of: run its points under these privacy settings")
    parser.add_argument("--no-hospitals", action="store_true", help="skip the hospitals alone (a quicker comparison)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    parser.add_argument("--combine", type=Path, nargs="+", help="runs' JSON of other privacy settings: one table")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.out)
        return
    seeds, grid = [int(s) for s in args.seeds.split(",")], args.grid
    arms = tuple(arm for arm in ARMS if not (args.no_hospitals and arm == "hospitals"))
    if args.best_of:  # each arm only where the searches found it best, on other seeds than theirs
        base, grid, searched = merge_searches([json.loads(path.read_text()) for path in args.best_of])
        scoring = scoring_of(base)
        plans = {privacy: arms_at_best(best_points(by_point, scoring)) for privacy, by_point in searched.items()}
        if args.under:  # the points found under one privacy setting, run under others (not searched there)
            if len(plans) != 1:
                raise SystemExit("--under: give --best-of searches of one privacy setting")
            plans = {privacy: next(iter(plans.values())) for privacy in args.under}
    else:
        base = [*SCALE, *args.extra]
        plans = {privacy: {" ".join(point): arms for point in grid_points(grid)} for privacy in args.privacy}
    runs: dict[str, dict[str, list[dict[str, dict]]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:  # seeds outermost, results written after each: a cut-short run keeps what it has
            for index, (privacy, plan) in enumerate(plans.items()):
                for number, (point, point_arms) in enumerate(plan.items()):
                    directory = Path(root) / f"privacy-{index}" / f"point-{number}"  # a run dir per point
                    results = run_seed(seed, privacy, [*base, *point.split()], directory, point_arms)
                    runs.setdefault(privacy, {}).setdefault(point, []).append(results)
                    write(args.out, base, grid, seeds, runs)


def combine(paths: list[Path], out: Path) -> None:
    """Trains nothing: the table and plot of several runs' JSON, each privacy setting over its own seeds; runs of
    one setting on other seeds (seeds added later) are pooled.

    Raises:
        SystemExit: Two runs of one privacy setting share a seed, or were made on different overrides.
    """
    records = [json.loads(path.read_text()) for path in paths]
    runs: dict[str, dict[str, list[dict]]] = {}
    pooled: dict[str, tuple[set[int], list[str]]] = {}  # privacy -> its seeds so far, the overrides they ran on
    for record in records:
        for privacy, by_point in record["runs"].items():
            seeds, overrides = pooled.setdefault(privacy, (set(), record["overrides"]))
            if seeds & set(record["seeds"]) or overrides != record["overrides"]:
                raise SystemExit(
                    f"--combine: two of the runs of {privacy!r} have a seed in common or other --extra overrides"
                )
            seeds.update(record["seeds"])
            for point, results in by_point.items():
                runs.setdefault(privacy, {}).setdefault(point, []).extend(results)
    seeds = sorted({seed for record in records for seed in record["seeds"]})
    write(out, records[0]["overrides"], [setting for record in records for setting in record["grid"]], seeds, runs)


def write(
    out: Path, overrides: list[str], grid: list[str], seeds: list[int], runs: dict[str, dict[str, list[dict]]]
) -> None:
    """The JSON, the markdown table and the plot of the runs so far (each summary says over how many seeds)."""
    scoring = scoring_of(overrides)
    summaries = {
        privacy: {point: summarise(r, scoring) for point, r in by_point.items()} for privacy, by_point in runs.items()
    }
    best = {privacy: best_points(by_point, scoring) for privacy, by_point in summaries.items()}
    markdown = table(summaries, bool(grid), scoring)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    record = {
        "overrides": overrides, "grid": grid, "seeds": seeds, "machine": machine,
        "best": best, "summary": summaries, "runs": runs,
    }  # fmt: skip
    out.write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text(markdown + "\n")
    plot(summaries, out.with_suffix(".png"), scoring)
    print(markdown, flush=True)


if __name__ == "__main__":
    main()
