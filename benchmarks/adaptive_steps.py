"""Why the adaptive server optimizers (FedAdagrad, FedAdam, FedYogi) lag FedAvg in the strategy comparison:
how large and in which direction their steps are, next to FedAvg's, on a real round's mean update.

One FedAvg round of the comparison's setting (``compare_strategies.SCALE``, seed 0) gives the clients'
mean update Δ. Each optimizer, built from its YAML with ``strategy.eta`` set to each value of a grid, then
steps from the initial adapter with that same Δ for several rounds, as if the clients kept sending it.
Reported per optimizer and eta: the root-mean-square of its per-coordinate step relative to FedAvg's
(which is Δ itself) in rounds 1, 3, 6 and 20, the cosine between its first step and Δ, and the central
test loss and macro-F1 after that one step (FedAvg's after Δ beside it). Reddi et al.'s rule
``x += eta m / (sqrt(v) + tau)`` without bias correction, with ``m`` from 0 and ``v`` from tau^2, makes the
step about ``eta (1 - beta1^t) / sqrt(1 - beta2^t)`` per coordinate wherever ``|Δ| >> tau``, whatever Δ's
own size: the numbers show how that compares with the update the clients actually made.

    python benchmarks/adaptive_steps.py                      # writes benchmarks/results/adaptive_steps.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from compare_strategies import SCALE

from fedtune import cli, config
from fedtune.adapters import AdapterState, subtract
from fedtune.experiment import get_experiment
from fedtune.run_dir import RunDir

ROUNDS = (1, 3, 6, 20)


def _rms(adapter: AdapterState) -> float:
    squares = sum(float((t.double() ** 2).sum()) for t in adapter.values())
    return math.sqrt(squares / sum(t.numel() for t in adapter.values()))


def _cosine(a: AdapterState, b: AdapterState) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / (_rms(a) * _rms(b) * sum(t.numel() for t in a.values()))


def main() -> None:
    """One FedAvg round, then each optimizer's steps on its mean update; JSON and a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--etas", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_steps.json"))
    args = parser.parse_args()
    scale = [*(s for s in SCALE if "evaluate" not in s), "federation.num_rounds=1", "federation.fraction_evaluate=0"]
    with tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "fedavg"
        if cli.main(["run", *scale, "strategy=fedavg", "seed=0", f"run_dir={run_dir}"]) != 0:
            raise RuntimeError("the FedAvg round failed; see the log above")
        after = torch.load(RunDir(run_dir).checkpoints / "round-0001.pt", weights_only=True)["adapter"]
        cfg = config.compose([*scale, "seed=0", f"run_dir={run_dir}"])
    experiment = get_experiment(cfg)
    initial = experiment.initial_adapter()
    delta = subtract(after, initial)
    fedavg = experiment.evaluate(after, experiment.test_set)
    rows = []
    for name in ("fedadagrad", "fedadam", "fedyogi"):
        for eta in (float(e) for e in args.etas.split(",")):
            strategy = config.instantiate(config.compose([f"strategy={name}", f"strategy.eta={eta}"]).strategy)
            adapter, ratios, first = initial, {}, None
            for server_round in range(1, max(ROUNDS) + 1):
                stepped = strategy.step(adapter, delta, server_round)
                step = subtract(stepped, adapter)
                first = first or (stepped, step)
                if server_round in ROUNDS:
                    ratios[f"step_rms_over_fedavg_round{server_round}"] = _rms(step) / _rms(delta)
                adapter = stepped
            metrics = experiment.evaluate(first[0], experiment.test_set)
            rows.append(
                {
                    "strategy": name,
                    "eta": eta,
                    **ratios,
                    "cosine_first_step_with_fedavg": _cosine(first[1], delta),
                    "loss_after_first_step": metrics["loss"],
                    "macro_f1_after_first_step": metrics["macro_f1"],
                }
            )
    untrained = experiment.evaluate(initial, experiment.test_set)
    result = {
        "overrides": scale,
        "delta_rms": _rms(delta),
        "untrained": untrained,
        "fedavg_after_one_round": fedavg,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    header = (
        f"FedAvg's round-1 update: per-coordinate RMS {result['delta_rms']:.4f}; test loss {untrained['loss']:.3f} "
        f"untrained, {fedavg['loss']:.3f} after FedAvg's step.\n\n"
        "| strategy | eta | step / FedAvg's, round 1 | round 3 | round 6 | round 20 | cosine | loss after step 1 |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| `{r['strategy']}` | {r['eta']} | {r['step_rms_over_fedavg_round1']:.2f} | {r['step_rms_over_fedavg_round3']:.2f} "
        f"| {r['step_rms_over_fedavg_round6']:.2f} | {r['step_rms_over_fedavg_round20']:.2f} "
        f"| {r['cosine_first_step_with_fedavg']:.3f} | {r['loss_after_first_step']:.3f} |"
        for r in rows
    ]
    markdown = "\n".join([header, *lines])
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
