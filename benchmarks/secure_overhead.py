"""What does secure aggregation cost per round? fedtune's masking protocol vs plaintext vs Flower's SecAgg+.

Part A, protocol cost (in-process, synthetic float32 updates ~N(0, 0.01) shaped like LoRA r=32 matrices),
for adapters of 1M, 4M and 16M parameters and 4, 10 and 50 clients:
  - fedtune (fedtune/secure/masking.py): every client goes through one whole round (keys, shares,
    fixed-point encoding, masking, revealing) and each step is timed; the server unmasks and decodes
    with no dropout and with one client dropping after key sharing; both sums are checked against the
    float64 weighted sum within FixedPoint.error_bound. Bytes per client vs the float32 upload (4 bytes
    per parameter).
  - Flower SecAgg+ (flwr 1.41): the stage functions of flwr's own client mod (secaggplus_mod's _setup,
    _share_keys, _collect_masked_vectors, _unmask) called in protocol order on the same updates, with
    SecAggPlusWorkflow's default quantisation, fedtune's threshold (0.6) and every sampled client a
    neighbour (num_shares=1.0), as in fedtune.
Part B, whole rounds (Flower simulations, Ray): a tiny random Llama (hidden 512, 4 layers, LoRA on all
linear layers: r=32 gives 1.1M adapter parameters, r=128 4.5M), ICD-10 instructions, the same local
training (fedtune.client.train_round) in four variants: (1) fedtune plaintext, (2) fedtune secure=masking,
(3) Flower legacy FedAvg, (4) the same under Flower's SecAggPlusWorkflow (secaggplus_mod on the clients).
Round time is the median of the rounds between the first (start-up) and the last (final evaluation);
with masking those rounds are pipelined (three exchanges: masked upload, agreement on the unmask lists,
unmask; round 1 takes five; the results on file were measured before the agreement step, with two and four).

    python benchmarks/secure_overhead.py                                   # both parts, about 20 min on 2 cores
    python benchmarks/secure_overhead.py --part a --sizes 1m 4m --clients 4 10
    python benchmarks/secure_overhead.py --part b --points 1m:10 1m:10:30 --rounds 6 --out /tmp/secure_b.json
    python benchmarks/secure_overhead.py --part b --points 1m:10 --repeats 4 --no-flower  # paired, interleaved
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedtune import adapters, config
from fedtune.adapters import AdapterState
from fedtune.assets import minilm_dir
from fedtune.client import train_round
from fedtune.experiment import get_experiment
from fedtune.run_dir import RunDir
from fedtune.secure import masking
from fedtune.secure.fixed_point import flatten
from fedtune.secure.identity import Identity
from fedtune.secure.masking import SecureAggregation
from fedtune.secure.session import Session
from fedtune.simulation import simulate

SIZES = {"1m": 2**20, "4m": 2**22, "16m": 2**24}  # Part A adapter parameters
CLIENTS = (4, 10, 50)
RANKS = {"1m": 32, "4m": 128}  # Part B: LoRA rank on the benchmark Llama -> 1,114,112 / 4,456,448 parameters
LORA_SHAPES = ((32, 512), (512, 32))  # Part A: A and B of LoRA r=32 on a 512-wide layer
# SecAggPlusWorkflow's default quantisation; fedtune's threshold; num_shares=1.0: every sampled client is a neighbour.
FLOWER = {
    "num_shares": 1.0,
    "reconstruction_threshold": 0.6,
    "clipping_range": 8.0,
    "quantization_range": 2**22,
    "modulus_range": 2**32,
    "max_weight": 1000.0,
}
# The module itself (the package re-exports its function under the same name).
flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


def synthetic_update(num_params: int, seed: int) -> AdapterState:
    """A float32 update of ``num_params`` values ~N(0, 0.01) in LoRA-shaped tensors (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    count = num_params // (LORA_SHAPES[0][0] * LORA_SHAPES[0][1])
    return {
        f"layer{i // 2:04d}.lora_{'AB'[i % 2]}": torch.randn(LORA_SHAPES[i % 2], generator=generator) * 0.01
        for i in range(count)
    }


def weight(index: int) -> int:
    """Training example count of client ``index`` (unequal, so the weighting is exercised)."""
    return 100 + 7 * index


def _timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def ours(protocol: SecureAggregation, num_params: int, num_clients: int) -> dict[str, Any]:
    """One round of fedtune's protocol in-process: per-client step times, server times, bytes, correctness."""
    session = Session("secure-overhead", 1)
    names = [f"client-{i:02d}" for i in range(num_clients)]
    identities = {name: Identity.generate() for name in names}
    public = {name: identity.public_hex for name, identity in identities.items()}
    steps: dict[str, list[float]] = {step: [] for step in ("keys", "shares", "encode", "mask", "reveal")}
    states, bundles = {}, []
    for name in names:
        (states[name], bundle), seconds = _timed(masking.advertise_keys, session, name, identities[name])
        bundles.append(bundle)
        steps["keys"].append(seconds)
    sealed, commitments, committed = {}, {}, {}
    for name in names:
        dealt, seconds = _timed(masking.share_keys, states[name], bundles, public, protocol)
        sealed[name], commitments[name], committed[name] = dealt
        steps["shares"].append(seconds)
    code = protocol.fixed_point(num_clients, unit_weights=False)
    uploads, reference = {}, np.zeros(num_params)
    for index, name in enumerate(names):
        update = synthetic_update(num_params, index)
        reference += weight(index) * flatten(update)
        encoded, seconds = _timed(code.encode, update, weight(index))
        steps["encode"].append(seconds)
        for_me = {peer: sealed[peer][name] for peer in names if peer != name}
        commitments_for_me = {peer: committed[peer][name] for peer in for_me}
        (uploads[name], _), seconds = _timed(
            masking.mask_update, states[name], for_me, commitments_for_me, names, encoded
        )
        steps["mask"].append(seconds)
    revealed = {}
    for name in names:
        shares, seconds = _timed(masking.reveal_shares, states[name], names, [])
        revealed[name] = shares
        steps["reveal"].append(seconds)
    template = synthetic_update(num_params, 0)
    by_name = {bundle.client: bundle for bundle in bundles}
    threshold = states[names[0]].threshold

    def server(
        survivors: list[str], shares: dict[str, dict[str, dict[str, str]]], expected: np.ndarray
    ) -> dict[str, float]:
        started = time.perf_counter()
        masked = {name: uploads[name] for name in survivors}
        total, _ = masking.unmask(session, masked, by_name, commitments, shares, protocol, committed, {})
        summed, total_weight = code.decode(total, template)
        seconds = time.perf_counter() - started
        error = float(np.abs(flatten(summed) / total_weight - expected / total_weight).max())
        bound = code.error_bound(len(survivors), total_weight)
        if total_weight != sum(weight(names.index(name)) for name in survivors) or not error <= bound:
            raise RuntimeError(f"fedtune's unmasked sum is wrong: max error {error:.3g} > bound {bound:.3g}")
        return {"seconds": seconds, "max_abs_error_of_mean": error, "error_bound": bound}

    no_dropout = server(names, revealed, reference)
    gone = names[-1]  # shared keys, then never uploaded: the survivors reveal its mask key instead of its seed
    survivors = names[:-1]
    after_dropout = {name: masking.reveal_shares(states[name], survivors, [gone]) for name in survivors}
    dropout_reference = reference - weight(num_clients - 1) * flatten(synthetic_update(num_params, num_clients - 1))
    one_dropout = server(survivors, after_dropout, dropout_reference)
    first = names[0]
    protocol_bytes = {
        "key_bundle": len(bundles[0].to_json()),
        "sealed_shares": sum(len(peer) + len(ciphertext) for peer, ciphertext in sealed[first].items()),
        "commitment": len(commitments[first]),
        "share_commitments": sum(len(peer) + len(c) for peer, c in committed[first].items()),
        "revealed_shares": len(json.dumps(revealed[first])),
    }
    vector = uploads[first].nbytes
    return {
        "client_seconds": sum(statistics.median(times) for times in steps.values()),
        "client_step_seconds": {step: statistics.median(times) for step, times in steps.items()},
        "server_seconds": no_dropout["seconds"],
        "server_seconds_one_dropout": one_dropout["seconds"],
        "check": {"no_dropout": no_dropout, "one_dropout": one_dropout},
        "upload_vector_bytes": vector,
        "upload_protocol_bytes": protocol_bytes,
        "upload_total_bytes": vector + sum(protocol_bytes.values()),
        "threshold": threshold,
        "fixed_point_scale": code.scale,
    }


def flower_client(num_params: int, num_clients: int, timed: int) -> dict[str, Any]:
    """A client's work in Flower's SecAgg+: flwr's own stage functions, on ``timed`` representative clients.

    Every client runs setup and key sharing (so the shares exist); ``timed`` clients then quantize and
    mask their update and answer the unmask request, as secaggplus_mod does on a train message.
    """
    threshold = max(round(FLOWER["reconstruction_threshold"] * num_clients), 2)
    setup = {
        Key.SAMPLE_NUMBER: num_clients,
        Key.SHARE_NUMBER: num_clients,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: FLOWER["clipping_range"],
        Key.TARGET_RANGE: FLOWER["quantization_range"],
        Key.MOD_RANGE: FLOWER["modulus_range"],
        Key.MAX_WEIGHT: FLOWER["max_weight"],
    }
    node_ids = list(range(1, num_clients + 1))
    states, public_keys = {}, {}
    steps: dict[str, list[float]] = {step: [] for step in ("setup", "share_keys", "quantize_and_mask", "unmask")}
    replies: dict[str, dict[int, dict[str, Any]]] = {step: {} for step in steps}
    for node_id in node_ids:
        states[node_id] = flower_mod.SecAggPlusState()
        states[node_id].nid = node_id
        replies["setup"][node_id], seconds = _timed(flower_mod._setup, states[node_id], dict(setup))
        public_keys[str(node_id)] = [
            replies["setup"][node_id][Key.PUBLIC_KEY_1],
            replies["setup"][node_id][Key.PUBLIC_KEY_2],
        ]
        steps["setup"].append(seconds)
    forwarded: dict[int, dict[str, list[Any]]] = {n: {Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []} for n in node_ids}
    for node_id in node_ids:
        reply, seconds = _timed(flower_mod._share_keys, states[node_id], dict(public_keys))
        replies["share_keys"][node_id] = reply
        steps["share_keys"].append(seconds)
        for destination, ciphertext in zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST], strict=True):
            forwarded[destination][Key.CIPHERTEXT_LIST].append(ciphertext)
            forwarded[destination][Key.SOURCE_LIST].append(node_id)
    for index, node_id in enumerate(node_ids[:timed]):
        update = synthetic_update(num_params, index)
        parameters = ndarrays_to_parameters([tensor.numpy() for tensor in update.values()])  # what NumPyClient sends
        mask = flower_mod._collect_masked_vectors
        replies["quantize_and_mask"][node_id], seconds = _timed(
            mask, states[node_id], forwarded[node_id], weight(index), parameters
        )
        steps["quantize_and_mask"].append(seconds)
        request = {Key.ACTIVE_NODE_ID_LIST: node_ids, Key.DEAD_NODE_ID_LIST: []}
        replies["unmask"][node_id], seconds = _timed(flower_mod._unmask, states[node_id], request)
        steps["unmask"].append(seconds)
    first = node_ids[0]
    vector = sum(len(array) for array in replies["quantize_and_mask"][first][Key.MASKED_PARAMETERS])
    protocol_bytes = {step: _record_bytes(replies[step][first]) for step in ("setup", "share_keys", "unmask")}
    return {
        "client_seconds": sum(statistics.median(times) for times in steps.values()),
        "client_step_seconds": {step: statistics.median(times) for step, times in steps.items()},
        "timed_clients": timed,
        "upload_vector_bytes": vector,
        "upload_protocol_bytes": protocol_bytes,
        "upload_total_bytes": vector + sum(protocol_bytes.values()),
        "threshold": threshold,
    }


def _record_bytes(record: Mapping[str, Any]) -> int:
    """Payload of a ConfigRecord-like reply: bytes values, 8 bytes per number."""
    values = [v for value in record.values() for v in (value if isinstance(value, list) else [value])]
    return sum(len(v) if isinstance(v, bytes) else 8 for v in values)


def part_a(protocol: SecureAggregation, sizes: list[str], clients: list[int], timed: int) -> list[dict[str, Any]]:
    """Protocol costs, fedtune and Flower side by side, for every (size, clients) pair."""
    rows = []
    for size in sizes:
        for num_clients in clients:
            num_params = SIZES[size]
            row = {
                "size": size,
                "parameters": num_params,
                "clients": num_clients,
                "plaintext_float32_bytes": 4 * num_params,
                "fedtune": ours(protocol, num_params, num_clients),
                "flower_secaggplus": flower_client(num_params, num_clients, min(timed, num_clients)),
            }
            plain = row["plaintext_float32_bytes"]
            row["fedtune"]["upload_vector_over_float32"] = row["fedtune"]["upload_vector_bytes"] / plain
            row["flower_secaggplus"]["upload_vector_over_float32"] = (
                row["flower_secaggplus"]["upload_vector_bytes"] / plain
            )
            rows.append(row)
            f, s = row["fedtune"], row["flower_secaggplus"]
            print(
                f"A {size:>3} x {num_clients:2} clients | fedtune client {f['client_seconds']:.3f} s, server "
                f"{f['server_seconds']:.3f} s ({f['server_seconds_one_dropout']:.3f} s with a dropout), upload "
                f"{f['upload_vector_over_float32']:.4f}x float32 | Flower client {s['client_seconds']:.3f} s, upload "
                f"{s['upload_vector_over_float32']:.4f}x float32",
                flush=True,
            )
    return rows


def tiny_llama(target: Path) -> Path:
    """A random Llama (hidden 512, 4 layers, MLP 1024) saved with the packaged MiniLM tokenizer, as tests do."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.save_pretrained(target)
    torch.manual_seed(0)
    shape = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(shape).save_pretrained(target)
    return target


def experiment_overrides(model_dir: Path, size: str, num_clients: int, rounds: int, local_steps: int) -> list[str]:
    """The shared experiment of Part B: same model, data and local training for every variant."""
    rank = RANKS[size]
    return [
        "model=local",
        f"model.path={model_dir}",
        "model.task=causal_lm",
        "model.max_length=64",
        "data=icd10_instructions",
        "data.loader.max_examples=600",
        "data.test_size=20",
        "partition=iid",
        f"lora.r={rank}",
        f"lora.lora_alpha={2 * rank}",
        "lora.target_modules=all-linear",
        f"federation.num_clients={num_clients}",
        f"federation.min_train_clients={num_clients}",
        f"federation.num_rounds={rounds}",
        f"federation.evaluate_every={rounds}",
        "federation.fraction_evaluate=0",
        f"train.local_steps={local_steps}",
        "train.batch_size=4",
        "train.eval_max_examples=20",
        "train.generation_examples=0",
        "train.torch_threads=1",
    ]


def steady_rounds(seconds: Mapping[int, float], rounds: int) -> dict[str, Any]:
    """Median round time over rounds 2..rounds-1 (round 1 includes start-up, the last the final evaluation)."""
    steady = [seconds[r] for r in range(2, rounds)]
    return {"round_seconds": statistics.median(steady), "steady_rounds": steady, "all_rounds": dict(seconds)}


def fedtune_variant(overrides: list[str], rounds: int) -> dict[str, Any]:
    """A fedtune simulation; round times and per-client bytes from its metrics.jsonl."""
    run_dir = tempfile.mkdtemp()
    started = time.perf_counter()
    simulate(config.compose([*overrides, f"run_dir={run_dir}"]), config.to_run_config(overrides, run_dir))
    wall = time.perf_counter() - started
    lines = RunDir(run_dir).read_metrics()
    seconds = {m["round"]: m["value"] for m in lines if m["scope"] == "server" and m["metric"] == "round_seconds"}
    train = {m["metric"]: m["value"] for m in lines if m["scope"] == "train" and m["round"] == 2}
    return {
        **steady_rounds(seconds, rounds),
        "wall_seconds": wall,
        "clients_per_round": train["clients"],
        "upload_bytes_per_client": train["upload_bytes_per_client"],
        "upload_bytes_source": "metrics.jsonl upload_bytes_per_client (round 2)",
    }


class AdapterClient(NumPyClient):
    """Flower legacy client running fedtune's local training; returns the trained adapter (FedAvg averages it)."""

    def __init__(self, overrides: list[str], partition_id: int) -> None:
        self.experiment = get_experiment(config.compose(overrides))
        self.partition_id = partition_id

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict]:
        """One round of fedtune.client.train_round from the global adapter in ``parameters``."""
        keys = list(self.experiment.initial_adapter())
        arrays = [torch.from_numpy(np.asarray(p, dtype=np.float32)) for p in parameters]  # SecAgg+ returns float64
        global_adapter = dict(zip(keys, arrays, strict=True))
        update, metrics = train_round(
            self.experiment,
            self.experiment.client_data(self.partition_id),
            global_adapter,
            int(config["server-round"]),
            f"partition-{self.partition_id}",
        )
        return [(global_adapter[k] + update[k]).numpy() for k in keys], int(metrics["num_examples"]), {}


class TimedFedAvg(FedAvg):
    """FedAvg that stamps each round from configure_fit to the end of aggregate_fit and counts the replies."""

    def __init__(self, log: dict[int, dict[str, float]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log = log

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Stamp the start of the round."""
        self.log[server_round] = {"started": time.perf_counter()}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> Any:
        """Aggregate, then stamp the end of the round."""
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.log[server_round].update(finished=time.perf_counter(), results=len(results), failures=len(failures))
        return aggregated


def _payload_bytes(content: Any) -> int:
    """Payload of a Flower RecordDict: array bytes, config bytes values, 8 bytes per number."""
    size = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    size += sum(_record_bytes(record) for record in content.config_records.values())
    return size + sum(8 * len(record) for record in content.metric_records.values())


def count_bytes(path: str) -> Callable[[Any, Context, Callable[[Any, Context], Any]], Any]:
    """A client mod that appends ``round node downloaded uploaded`` payload bytes of each message to ``path``."""

    def mod(msg: Any, context: Context, call_next: Callable[[Any, Context], Any]) -> Any:
        downloaded = _payload_bytes(msg.content)
        reply = call_next(msg, context)
        with open(path, "a") as file:
            file.write(f"{msg.metadata.group_id} {context.node_id} {downloaded} {_payload_bytes(reply.content)}\n")
        return reply

    return mod


def flower_variant(overrides: list[str], rounds: int, secure: bool) -> dict[str, Any]:
    """Flower's legacy FedAvg (DefaultWorkflow), with SecAggPlusWorkflow when ``secure``, on the same training."""
    from flwr.simulation import run_simulation  # deferred as in fedtune.simulation: importing Ray is slow

    experiment = get_experiment(config.compose([*overrides, f"run_dir={tempfile.mkdtemp()}"]))
    federation = experiment.federation
    initial = [tensor.numpy() for tensor in experiment.initial_adapter().values()]
    log: dict[int, dict[str, float]] = {}
    counts = str(Path(tempfile.mkdtemp()) / "bytes.txt")
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        strategy = TimedFedAvg(
            log,
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=federation.num_clients,
            min_available_clients=federation.num_clients,
            accept_failures=False,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=lambda server_round: {"server-round": server_round},
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(**FLOWER) if secure else None)(grid, legacy)

    def client_fn(context: Context) -> Any:
        return AdapterClient(overrides, int(context.node_config["partition-id"])).to_client()

    mods = [count_bytes(counts), secaggplus_mod] if secure else [count_bytes(counts)]
    cpus = os.cpu_count() or 1
    backend_config = {  # as fedtune.simulation
        "client_resources": {"num_cpus": min(federation.cpus_per_client, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR},
    }
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=ClientApp(client_fn=client_fn, mods=mods),
            num_supernodes=federation.num_clients,
            backend_config=backend_config,
        )
    wall = time.perf_counter() - started
    incomplete = {r: e for r, e in log.items() if e.get("results") != federation.num_clients}
    if len(log) != rounds or incomplete:
        raise RuntimeError(f"Flower {'SecAgg+' if secure else 'FedAvg'} rounds incomplete: {log}")
    downloaded: Counter[tuple[str, str]] = Counter()
    uploaded: Counter[tuple[str, str]] = Counter()
    for line in Path(counts).read_text().splitlines():
        server_round, node, down, up = line.split()
        if int(server_round) >= 2:  # as the round times
            downloaded[server_round, node] += int(down)
            uploaded[server_round, node] += int(up)
    return {
        **steady_rounds({r: e["finished"] - e["started"] for r, e in log.items()}, rounds),
        "wall_seconds": wall,
        "clients_per_round": federation.num_clients,
        "upload_bytes_per_client": statistics.median(uploaded.values()),
        "download_bytes_per_client": statistics.median(downloaded.values()),
        "upload_bytes_source": "message payloads counted by a client mod (arrays, config bytes, 8 per number)",
    }


def paired_fedtune(overrides: list[str], rounds: int, repeats: int) -> dict[str, Any]:
    """``repeats`` plaintext/masking pairs run back to back: the machine's drift over minutes lands on both
    halves of a pair, so the spread of the paired overheads says what one pair alone cannot."""
    pairs = []
    for _ in range(repeats):
        plain = fedtune_variant([*overrides, "secure=none"], rounds)
        masked = fedtune_variant([*overrides, "secure=masking"], rounds)
        pairs.append((plain, masked))
    overheads = [m["round_seconds"] / p["round_seconds"] - 1 for p, m in pairs]
    added = [m["round_seconds"] - p["round_seconds"] for p, m in pairs]
    middle_plain, middle_masked = pairs[overheads.index(statistics.median_low(overheads))]
    return {
        "fedtune_plaintext": middle_plain,  # the middle pair (by overhead) stands for the point; all are kept
        "fedtune_masking": middle_masked,
        "pairs": [{"plaintext": p, "masking": m} for p, m in pairs],
        "paired_overheads": overheads,
        "paired_added_seconds": added,
        "median_paired_overhead": statistics.median(overheads),
        "median_paired_added_seconds": statistics.median(added),
    }


def part_b(
    points: list[str], rounds: int, model_dir: Path, repeats: int = 1, flower: bool = True
) -> list[dict[str, Any]]:
    """Whole-round times and upload bytes of the four variants (fedtune's two only, without ``flower``) for
    each ``size:clients`` point; fedtune's pair ``repeats`` times."""
    rows = []
    for point in points:
        size, clients, *steps = point.split(":")
        overrides = experiment_overrides(model_dir, size, int(clients), rounds, int(steps[0]) if steps else 3)
        experiment = get_experiment(config.compose([*overrides, f"run_dir={tempfile.mkdtemp()}"]))
        row: dict[str, Any] = {
            "point": point,
            "clients": int(clients),
            "adapter_parameters": adapters.num_parameters(experiment.initial_adapter()),
            "overrides": overrides,
            **paired_fedtune(overrides, rounds, repeats),
        }
        if flower:
            row["flower_fedavg"] = flower_variant(overrides, rounds, secure=False)
            row["flower_secaggplus"] = flower_variant(overrides, rounds, secure=True)
        row["float32_bytes"] = 4 * row["adapter_parameters"]
        for name, plain, secure in (
            ("fedtune", "fedtune_plaintext", "fedtune_masking"),
            ("flower", "flower_fedavg", "flower_secaggplus"),
        ):
            if plain not in row:
                continue
            row[f"{name}_overhead"] = row[secure]["round_seconds"] / row[plain]["round_seconds"] - 1
            row[f"{name}_added_seconds"] = row[secure]["round_seconds"] - row[plain]["round_seconds"]
            row[f"{name}_upload_ratio"] = row[secure]["upload_bytes_per_client"] / row[plain]["upload_bytes_per_client"]
        rows.append(row)
        line = (
            f"B {point:>5} ({row['adapter_parameters']:,} params) | fedtune plaintext "
            f"{row['fedtune_plaintext']['round_seconds']:.2f} s, masking {row['fedtune_masking']['round_seconds']:.2f} s "
            f"({row['fedtune_overhead']:+.1%}; pairs {', '.join(f'{o:+.1%}' for o in row['paired_overheads'])})"
        )
        if flower:
            line += (
                f" | Flower FedAvg {row['flower_fedavg']['round_seconds']:.2f} s, SecAgg+ "
                f"{row['flower_secaggplus']['round_seconds']:.2f} s ({row['flower_overhead']:+.1%})"
            )
        print(line, flush=True)
    return rows


def goals(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at 10 clients and a 1M-parameter adapter (None where not measured)."""
    a = next((r for r in rows_a if r["size"] == "1m" and r["clients"] == 10), None)
    b = next((r for r in rows_b if r["point"] == "1m:10"), None)
    return {
        # the median over the interleaved pairs (one pair with --repeats 1)
        "fedtune_overhead": None if b is None else b["median_paired_overhead"],
        "overhead_under_5_percent": None if b is None else b["median_paired_overhead"] < 0.05,
        "fedtune_added_seconds": None if b is None else b["median_paired_added_seconds"],
        "flower_overhead": None if b is None else b.get("flower_overhead"),
        "flower_added_seconds": None if b is None else b.get("flower_added_seconds"),
        # Whole-round uploads as logged: masked (all four steps) over plaintext (update, metrics, signature).
        "upload_over_plaintext": None if b is None else b["fedtune_upload_ratio"],
        "upload_no_larger_than_plaintext": None if b is None else b["fedtune_upload_ratio"] <= 1,
        "flower_upload_over_plaintext": None if b is None else b.get("flower_upload_ratio"),
        # Protocol level: the masked vector is uint32 x (P + 1); a plaintext reply holds 4 P bytes and the count.
        "masked_vector_over_float32": None if a is None else a["fedtune"]["upload_vector_over_float32"],
        "protocol_upload_over_float32": None
        if a is None
        else a["fedtune"]["upload_total_bytes"] / a["plaintext_float32_bytes"],
    }


def print_tables(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> None:
    """The short table: Part A per (size, clients), Part B per point."""
    if rows_a:
        print(
            "\n| params | clients | fedtune client s | fedtune server s (1 dropout) | Flower client s | upload/float32 fedtune | Flower |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows_a:
            f, s = r["fedtune"], r["flower_secaggplus"]
            print(
                f"| {r['size']} | {r['clients']} | {f['client_seconds']:.3f} | {f['server_seconds']:.3f} "
                f"({f['server_seconds_one_dropout']:.3f}) | {s['client_seconds']:.3f} | "
                f"{f['upload_total_bytes'] / r['plaintext_float32_bytes']:.4f} | "
                f"{s['upload_total_bytes'] / r['plaintext_float32_bytes']:.4f} |"
            )
    if rows_b:
        print(
            "\n| point | fedtune plaintext s | masking s | overhead | Flower FedAvg s | SecAgg+ s | overhead | upload MB: plaintext / masking / FedAvg / SecAgg+ |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows_b:
            names = ("fedtune_plaintext", "fedtune_masking", "flower_fedavg", "flower_secaggplus")
            variants = [r.get(v) for v in names]
            seconds = ["-" if v is None else f"{v['round_seconds']:.2f}" for v in variants]
            megabytes = " / ".join("-" if v is None else f"{v['upload_bytes_per_client'] / 1e6:.2f}" for v in variants)
            overheads = [
                "-" if f"{n}_overhead" not in r else f"{r[f'{n}_overhead']:+.1%} ({r[f'{n}_added_seconds']:+.2f} s)"
                for n in ("fedtune", "flower")
            ]
            print(
                f"| {r['point']} | {seconds[0]} | {seconds[1]} | {overheads[0]} | {seconds[2]} | {seconds[3]} | "
                f"{overheads[1]} | {megabytes} |"
            )


NOTES = [
    "Part A, Flower: the client's stage functions of flwr's secaggplus_mod (_setup, _share_keys, "
    "_collect_masked_vectors, _unmask) called in protocol order with SecAggPlusWorkflow's defaults; the ConfigRecord "
    "state (de)serialisation between stages and the messages themselves are not included (Part B includes them). "
    "Flower's server-side unmasking cannot be isolated without its Grid/LegacyContext workflow and is not timed.",
    "Part A, Flower: _collect_masked_vectors starts from Parameters (npy bytes, as NumPyClient sends them) and "
    "includes decrypting the peers' shares; fedtune's encode+mask starts from tensors and includes unsealing shares.",
    "Part A: client seconds = sum over the protocol steps of the step's median over clients (fedtune: all clients; "
    "Flower: all clients for setup and key sharing, the timed clients for masking and unmasking). fedtune's server "
    "time covers unmask + FixedPoint.decode; the one-dropout case drops the last client after key sharing.",
    "Part A bytes: fedtune vector = uint32 x (parameters + 1); protocol bytes = key bundle JSON, sealed shares "
    "(+ peer names), commitment, revealed shares JSON. Flower vector = int64 npy arrays (+ the weight factor); "
    "protocol bytes = public keys, share ciphertexts (+ 8 per node id), unmask shares.",
    "Part B: round seconds = median over rounds 2..num_rounds-1 (round 1 includes start-up, the last round "
    "fedtune's final central evaluation). fedtune's round covers train step, checkpoint and logging; Flower's round "
    "runs from configure_fit to the end of aggregate_fit. Flower's SecAgg+ returns float64 aggregates, so its "
    "clients receive float64 adapters from round 2 on (cast to float32 before training).",
    "Part B: an overhead in percent depends on how long local training takes (3 steps of 4 x 64 tokens by default, "
    "about 0.6 s per client, clients two at a time on 2 cores; point 1m:10:30 trains 30 steps); the added seconds "
    "per round do not.",
]


def machine() -> dict[str, Any]:
    """Versions and hardware of this run."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "load_average_1_5_15_min_at_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES), help="Part A adapter sizes")
    parser.add_argument("--clients", nargs="*", type=int, default=list(CLIENTS), help="Part A client counts")
    parser.add_argument("--timed-clients", type=int, default=3, help="Part A: Flower clients that mask an update")
    parser.add_argument(
        "--points",
        nargs="*",
        default=["1m:10", "1m:4", "4m:10", "1m:10:30"],
        help="Part B size:clients[:local steps, default 3] (sizes 1m, 4m)",
    )
    parser.add_argument("--rounds", type=int, default=8, help="Part B rounds per simulation (at least 3)")
    parser.add_argument("--repeats", type=int, default=1, help="Part B: fedtune plaintext/masking pairs, interleaved")
    parser.add_argument("--no-flower", action="store_true", help="Part B: fedtune's variants only")
    parser.add_argument("--out", default="benchmarks/results/secure_overhead.json")
    args = parser.parse_args()
    if args.rounds < 3 or any(p.split(":")[0] not in RANKS for p in args.points):
        parser.error(f"--rounds must be at least 3 and --points sizes one of {sorted(RANKS)}")
    started, info = time.perf_counter(), machine()
    protocol = config.instantiate(config.compose(["secure=masking"]).secure)  # as shipped in conf/secure/
    rows_a = part_a(protocol, args.sizes, args.clients, args.timed_clients) if args.part in ("a", "all") else []
    rows_b = []
    if args.part in ("b", "all"):
        with tempfile.TemporaryDirectory() as model_dir:
            rows_b = part_b(args.points, args.rounds, tiny_llama(Path(model_dir)), args.repeats, not args.no_flower)
    result = {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**info, "load_average_1_5_15_min_at_end": os.getloadavg()},
        "settings": {
            "part": args.part,
            "sizes": {s: SIZES[s] for s in args.sizes},
            "clients": args.clients,
            "timed_flower_clients": args.timed_clients,
            "points": args.points,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "fedtune_protocol": dataclasses.asdict(protocol),
            "flower_secaggplus": FLOWER,
            "lora_ranks": RANKS,
            "synthetic_update": "float32 ~N(0, 0.01), LoRA A/B tensors 32x512 and 512x32",
            "weights": "client i trains on 100 + 7 i examples",
        },
        "notes": NOTES,
        "part_a": rows_a,
        "part_b": rows_b,
        "goals": goals(rows_a, rows_b),
        "wall_seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_tables(rows_a, rows_b)
    print(f"\ngoals: {json.dumps(result['goals'])}")


if __name__ == "__main__":
    main()
