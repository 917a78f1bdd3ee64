"""What does record-level DP cost per training step? The same LoRA training with and without DP-SGD.

For each model and batch size, times fedtune's local training loop without DP and with DP-SGD in each
Opacus per-sample gradient mode, side by side in one process, and writes the ratios DP / no-DP as JSON.
DP batches are Poisson-sampled with the same expected size.

    python benchmarks/dp_overhead.py                          # MiniLM (batch 8, 32) and SmolLM2 (batch 8), CPU
    python benchmarks/dp_overhead.py --models minilm --out benchmarks/results/dp_overhead_minilm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedtune import adapters, config
from fedtune.experiment import Experiment
from fedtune.privacy import NoPrivacy, PrivacyMechanism
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.training import local_train

MODELS = {  # name -> (overrides, batch sizes, steps per timing, repeats)
    "minilm": (["model=minilm", "data=icd10"], [8, 32], 10, 3),
    "smollm2": (["model=smollm2", "data=icd10_instructions"], [8], 3, 2),
}
MODES = ("hooks", "functorch", "ew", "ghost")


def seconds_per_step(
    experiment: Experiment, mechanism: PrivacyMechanism, batch_size: int, steps: int, repeats: int
) -> float:
    """Median over ``repeats`` of the mean step time of ``steps`` local training steps (after one warm-up step)."""
    model, initial = experiment.model(), experiment.initial_adapter()
    data = experiment.client_data(0).train
    train = experiment.train_config
    times = []
    for repeat in range(repeats + 1):
        adapters.set_adapter(model, initial)
        cfg = type(train)(**{**train.__dict__, "local_steps": 1 if repeat == 0 else steps, "batch_size": batch_size})
        started = time.perf_counter()
        local_train(model, data, experiment.corpus.task, experiment.tokenizer, experiment.model_spec.max_length, cfg,
                    torch.Generator().manual_seed(repeat), mechanism, total_steps=1000, privacy_state={})  # fmt: skip
        if repeat:  # the first call warms up (allocations, tokenizer caches)
            times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results/dp_overhead.json")
    args = parser.parse_args()
    results = []
    for name in args.models:
        overrides, batch_sizes, steps, repeats = MODELS[name]
        experiment = Experiment(config.compose([*overrides, f"run_dir={tempfile.mkdtemp()}"]))
        torch.set_num_threads(experiment.train_config.torch_threads)
        for batch_size in batch_sizes:
            baseline = seconds_per_step(experiment, NoPrivacy(), batch_size, steps, repeats)
            row = {"model": name, "batch_size": batch_size, "no_dp_seconds_per_step": baseline, "modes": {}}
            for mode in MODES:
                dp = seconds_per_step(experiment, DPSGD(target_epsilon=None, noise_multiplier=1.0, grad_sample_mode=mode),
                                      batch_size, steps, repeats)  # fmt: skip
                row["modes"][mode] = {"seconds_per_step": dp, "ratio": dp / baseline}
                print(
                    f"{name:8} batch {batch_size:3}: no DP {baseline:.3f} s/step | {mode:9} {dp:.3f} s/step ({dp / baseline:.2f}x)",
                    flush=True,
                )
            results.append(row)
    payload = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "device": "cpu"},
        "torch_threads": torch.get_num_threads(), "results": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
