"""Where DP-SGD's signal goes: per-record gradient norms of the classifier head and of the LoRA matrices,
and each part's signal-to-noise ratio at the batch sizes and step counts a hospital could choose.

DP-SGD clips each record's whole gradient to ``C`` and adds ``N(0, (sigma C)^2)`` to every coordinate of
the sum. If one part of the adapter carries most of each record's gradient norm, the other parts get a
small share of the clipped signal but the full noise. For one hospital's training rows (the demo's split)
this measures, at the initial adapter and for each ``model.pooling``:

- the per-record gradient norm of the whole adapter, of the head alone and of the LoRA matrices alone;
- for each (batch size B, steps T) at epsilon 1 and 8: the noise multiplier sigma that spends that epsilon
  over T steps of Poisson rate B/n (fedtune's own calibration), and each part's signal-to-noise ratio over
  the run, ``sqrt(T) ||sum of B clipped gradients restricted to the part|| / (sigma C sqrt(d_part))``
  (the clipped sum estimated as B times the mean clipped gradient of 256 sampled records), and the noise
  multiplier the PRV accountant needs for the same guarantee (``privacy.accountant=prv``).

    python benchmarks/dp_signal.py                          # writes benchmarks/results/dp_signal.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import torch

from fedtune import adapters, config
from fedtune.experiment import get_experiment
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.privacy.flat import FlatPerRecordGradients
from fedtune.training import encode, sequence_loss

DEMO_SPLIT = ["federation.num_clients=4", "partition=dirichlet", "partition.alpha=0.5"]
# (batch, steps): the demo's; experiment=hospital_dp's; then larger batches over the same number of epochs
SETTINGS = [(16, 400), (64, 200), (256, 50), (1024, 13)]
RECORDS = 256


def per_record_gradients(overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each of ``RECORDS`` training records' gradient (records x adapter values) at the initial adapter, the
    mask of the head's columns, and the hospital's number of training rows."""
    experiment = get_experiment(config.compose(overrides))
    model = experiment.model()
    adapters.set_adapter(model, experiment.initial_adapter())
    adapters.set_trainable(model, ())
    rows = experiment.client_data(0).train
    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:RECORDS].tolist()
    names = {id(p): name for name, p in model.named_parameters()}
    gradients = FlatPerRecordGradients(model)
    head = torch.zeros(gradients.num_values, dtype=torch.bool)
    for parameter in gradients.parameters:
        start, end = gradients.columns_of(parameter)
        head[start:end] = "lora_" not in names[id(parameter)]
    model.train()
    try:
        batch = encode(rows[chosen], "classification", experiment.tokenizer, experiment.model_spec.max_length)
        labels = batch.pop("labels")
        sequence_loss(model(**batch).logits, labels, "classification").mean().backward()
        buffer = gradients.take_per_record()
        assert buffer is not None
        return buffer, head, len(rows)
    finally:
        gradients.close()
        model.eval()


def quantiles(values: torch.Tensor) -> dict[str, float]:
    """Median and the 10th and 90th percentiles."""
    return {f"p{q}": float(values.quantile(q / 100)) for q in (10, 50, 90)}


def measure(pooling: str, clip: float) -> dict:
    """Norms and signal-to-noise ratios for one pooling."""
    grads, head, rows = per_record_gradients([*DEMO_SPLIT, f"model.pooling={pooling}", "run_dir=/tmp/dp_signal"])
    norms = torch.linalg.vector_norm(grads, dim=1)
    clipped_mean = ((clip / (norms + 1e-6)).clamp(max=1.0)[:, None] * grads).mean(dim=0)
    parts = {"head": head, "lora": ~head}
    result: dict = {
        "hospital_rows": rows,
        "values": {part: int(mask.sum()) for part, mask in parts.items()},
        "norm": quantiles(norms),
        **{f"{part}_norm": quantiles(torch.linalg.vector_norm(grads[:, mask], dim=1)) for part, mask in parts.items()},
        "settings": [],
    }
    for batch, steps in SETTINGS:
        for epsilon in (1.0, 8.0):
            sigma = DPSGD(target_epsilon=epsilon).calibrate(rows, batch, steps)
            snr = {
                part: math.sqrt(steps)
                * batch
                * float(torch.linalg.vector_norm(clipped_mean[mask]))
                / (sigma * clip * math.sqrt(int(mask.sum())))
                for part, mask in parts.items()
            }
            prv = DPSGD(target_epsilon=epsilon, accountant="prv").calibrate(rows, batch, steps)
            result["settings"].append(
                {
                    "batch": batch,
                    "steps": steps,
                    "epsilon": epsilon,
                    "noise_multiplier": sigma,
                    "noise_multiplier_prv": prv,
                    "snr": snr,
                }
            )
    return result


def main() -> None:
    """Measure both poolings and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=float, default=1.0, help="privacy.max_grad_norm")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_signal.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {pooling: measure(pooling, args.clip) for pooling in ("cls", "mean")}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"clip": args.clip, "machine": machine, "results": results}, indent=2))
    for pooling, result in results.items():
        print(pooling, json.dumps({k: v for k, v in result.items() if k != "settings"}))
        for setting in result["settings"]:
            print("  ", json.dumps(setting))


if __name__ == "__main__":
    main()
