"""What does record-level DP cost per training step? The same LoRA steps with and without DP-SGD, side by side.

For each model and batch size, every engine (no DP, then each ``privacy.grad_sample_mode``) runs fedtune's
training step (``fedtune.training.train_step``: forward, per-record losses, the engine's backward, clip,
noise, AdamW) on the same fixed batches, in interleaved rounds so that drift in machine speed hits all
of them alike. Writes median seconds per step, the ratio DP / no DP, and (CUDA) peak memory as JSON.

Models: ``minilm`` and ``smollm2`` are the built-ins on real data (ICD-10 chapters / instructions);
``smollm2-all`` puts LoRA on all its linear layers; ``deep`` is a random 22-layer Llama only 64 wide with
LoRA on all linear layers (hundreds of tiny adapter tensors, so it shows the per-tensor cost an engine
pays, which we expect to dominate for a 1B model on a GPU too); ``llama1b`` is a random Llama with TinyLlama-1.1B's shape, LoRA r=16
on all linear layers, 512-token sequences (GPU).

    python benchmarks/dp_overhead.py                                    # CPU: minilm, smollm2, smollm2-all, deep
    python benchmarks/dp_overhead.py --models deep --out /tmp/deep.json
    python benchmarks/dp_overhead.py --device cuda --precision bf16 --models llama1b   # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune import adapters, devices
from fedtune.models import ModelSpec, build_model
from fedtune.privacy import NoPrivacy, PlanRequest, PrivacyMechanism
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.privacy.engines import MODES
from fedtune.tasks import Task
from fedtune.training import encode, train_step


@dataclass(frozen=True)
class RandomLlama:
    """A Llama built from a config (random weights) and fed random token sequences of ``seq_len``."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    lora_r: int


BUILTINS = {  # name -> (overrides, batch sizes, steps per round)
    "minilm": (["model=minilm", "data=icd10"], (8, 32), 8),
    "smollm2": (["model=smollm2", "data=icd10_instructions"], (8,), 3),
    "smollm2-all": (["model=smollm2", "data=icd10_instructions", "lora.target_modules=all-linear"], (8,), 3),
}
RANDOM = {  # name -> (shape, batch sizes, steps per round)
    "deep": (RandomLlama(64, 176, 22, 1, 1, 1000, 32, 16), (8,), 8),
    "llama1b": (RandomLlama(2048, 5632, 22, 32, 4, 32000, 512, 16), (8, 32), 8),
}
CPU_DEFAULT = ("minilm", "smollm2", "smollm2-all", "deep")


@dataclass
class Case:
    """A model on its device with the batches every engine trains on."""

    model: torch.nn.Module
    initial: adapters.AdapterState
    task: Task
    batches: list[dict[str, torch.Tensor]]
    num_examples: int


def builtin_case(name: str, batch_size: int, steps: int, device: torch.device, precision: str) -> Case:
    """A built-in model and the first ``steps`` batches of client 0's data, encoded once."""
    from fedtune import config  # deferred: Hydra and the data libraries are needed only for the built-ins
    from fedtune.experiment import Experiment

    overrides = [*BUILTINS[name][0], f"train.device={device}", f"train.precision={precision}"]
    experiment = Experiment(config.compose([*overrides, f"run_dir={tempfile.mkdtemp()}"]))
    data = experiment.client_data(0).train
    spec = experiment.model_spec
    batches = [
        encode(data[i * batch_size : (i + 1) * batch_size], spec.task, experiment.tokenizer, spec.max_length, device)
        for i in range(steps)
    ]
    return Case(experiment.model(), experiment.initial_adapter(), spec.task, batches, len(data))


def random_case(name: str, batch_size: int, steps: int, device: torch.device, precision: str) -> Case:
    """A random Llama saved like a user's model, loaded through fedtune, with random token batches."""
    shape = RANDOM[name][0]
    lora = LoraConfig(r=shape.lora_r, lora_alpha=2 * shape.lora_r, target_modules="all-linear")
    spec = ModelSpec(str(_random_llama_dir(name, device, precision)), "causal_lm", shape.seq_len)
    model, initial = build_model(spec, lora, None, 0, device, precision)  # cached: one copy for all batch sizes
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, shape.vocab, (batch_size, shape.seq_len), generator=generator).to(device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return Case(model, initial, "causal_lm", batches, 100_000)


@functools.cache
def _random_llama_dir(name: str, device: torch.device, precision: str) -> Path:
    shape = RANDOM[name][0]
    target = Path(tempfile.mkdtemp()) / name
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):  # initialising a 1B model takes a second on a GPU, a minute on a CPU
        base = LlamaForCausalLM(llama_config).to(devices.weights_dtype(precision))
    base.save_pretrained(target)
    return target


def engines(modes: list[str]) -> Iterator[tuple[str, PrivacyMechanism]]:
    """No DP first, then DP-SGD (noise multiplier 1, clip 1) with each engine."""
    yield "none", NoPrivacy()
    for mode in modes:
        yield mode, DPSGD(target_epsilon=None, noise_multiplier=1.0, grad_sample_mode=mode)  # type: ignore[arg-type]


def timed_round(case: Case, mechanism: PrivacyMechanism, precision: str) -> list[float]:
    """Seconds of each of the case's steps under ``mechanism``, after one warm-up step."""
    model = case.model
    adapters.set_adapter(model, case.initial)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch_size = len(case.batches[0]["input_ids"])
    request = PlanRequest(model, optimizer, case.num_examples, batch_size, len(case.batches) + 1, 1000,
                          torch.Generator().manual_seed(0), {})  # fmt: skip
    plan = mechanism.plan(request)  # its batches are ignored: every engine trains on the same fixed ones
    device = devices.of(model)
    model.train()
    times = []
    try:
        for index, batch in enumerate([case.batches[0], *case.batches]):
            _synchronize(device)
            started = time.perf_counter()
            train_step(plan, [batch], case.task, precision)
            _synchronize(device)
            if index:
                times.append(time.perf_counter() - started)
    finally:
        plan.close()
        model.eval()
    return times


def measure(case: Case, modes: list[str], precision: str, rounds: int) -> dict[str, dict[str, float]]:
    """Median step time (and CUDA peak memory) of each engine over ``rounds`` interleaved rounds."""
    device = devices.of(case.model)
    times: dict[str, list[float]] = {name: [] for name, _ in engines(modes)}
    peak: dict[str, int] = {}
    for _ in range(rounds):
        for name, mechanism in engines(modes):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name] += timed_round(case, mechanism, precision)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    baseline = statistics.median(times["none"])
    results = {}
    for name, values in times.items():
        seconds = statistics.median(values)
        results[name] = {"seconds_per_step": seconds, "ratio": seconds / baseline}
        if name in peak:
            results[name]["peak_memory_gib"] = peak[name] / 2**30
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=[*BUILTINS, *RANDOM], help=f"default: {' '.join(CPU_DEFAULT)}")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batch-sizes", nargs="*", type=int, help="instead of each model's own")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=devices.PRECISIONS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of steps per engine")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (as one simulated client has)")
    parser.add_argument("--out", default="benchmarks/results/dp_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = devices.resolve(args.device)  # deterministic kernels on CUDA, as fedtune trains by default
    rows = []
    for name in args.models or CPU_DEFAULT:
        builder, (_, batch_sizes, steps) = (
            (builtin_case, BUILTINS[name]) if name in BUILTINS else (random_case, RANDOM[name])
        )
        for batch_size in args.batch_sizes or batch_sizes:
            case = builder(name, batch_size, steps, device, args.precision)
            modes = [m for m in args.modes if not (m == "ew" and args.precision == "bf16")]  # ew refuses bf16
            results = measure(case, modes, args.precision, args.rounds)
            trainable = [p for p in case.model.parameters() if p.requires_grad]
            rows.append({
                "model": name, "batch_size": batch_size, "tokens_per_record": int(case.batches[0]["input_ids"].shape[1]),
                "trainable_parameters": sum(p.numel() for p in trainable), "trainable_tensors": len(trainable),
                "engines": results,
            })  # fmt: skip
            line = " | ".join(f"{m} {r['ratio']:.2f}x" for m, r in results.items() if m != "none")
            print(
                f"{name:11} batch {batch_size:3}: no DP {results['none']['seconds_per_step']:.4f} s/step | {line}",
                flush=True,
            )
            del case
    machine = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
    }  # fmt: skip
    payload = {
        "machine": machine,
        "precision": args.precision,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
