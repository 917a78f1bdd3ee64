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
    SecAggPlusWorkflow's defaults and every sampled client a neighbour (num_shares=1.0), as fedtune masks.
Part B, whole rounds (Flower simulations, Ray): a tiny random Llama (hidden 512, 4 layers, LoRA on all
linear layers: r=32 gives 1.1M adapter parameters, r=128 4.5M), ICD-10 instructions, the same local
training (fedtune.client.train_round) in four variants: (1) fedtune plaintext, (2) fedtune secure=masking,
(3) Flower legacy FedAvg, (4) the same under Flower's SecAggPlusWorkflow (secaggplus_mod on the clients).
Round time is the median of the rounds between the first (start-up) and the last (final evaluation).

    python benchmarks/secure_overhead.py                                   # both parts, about 25 min on 2 cores
    python benchmarks/secure_overhead.py --part a --sizes 1m 4m --clients 4 10
    python benchmarks/secure_overhead.py --part b --points 1m:10 1m:4 4m:10 --out benchmarks/results/secure_overhead_b.json
"""

from __future__ import annotations

import argparse
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
from fedtune.secure.masking import SecureAggregation, Session
from fedtune.simulation import simulate

SIZES = {"1m": 2**20, "4m": 2**22, "16m": 2**24}  # Part A adapter parameters
CLIENTS = (4, 10, 50)
RANKS = {"1m": 32, "4m": 128}  # Part B: LoRA rank on the benchmark Llama -> 1,114,112 / 4,456,448 parameters
LORA_SHAPES = ((32, 512), (512, 32))  # Part A: A and B of LoRA r=32 on a 512-wide layer
PROTOCOL = SecureAggregation()  # fedtune's defaults (threshold 0.6, value_range 1.0, max_examples 100,000)
# SecAggPlusWorkflow's defaults; num_shares=1.0 makes every sampled client a neighbour of every other.
FLOWER = {"num_shares": 1.0, "reconstruction_threshold": 0.6, "clipping_range": 8.0, "quantization_range": 2**22,
          "modulus_range": 2**32, "max_weight": 1000.0}  # fmt: skip
# The module itself (the package re-exports its function under the same name).
flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


def synthetic_update(num_params: int, seed: int) -> AdapterState:
    """A float32 update of ``num_params`` values ~N(0, 0.01) in LoRA-shaped tensors (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    count = num_params // (LORA_SHAPES[0][0] * LORA_SHAPES[0][1])
    return {f"layer{i // 2:04d}.lora_{'AB'[i % 2]}": torch.randn(LORA_SHAPES[i % 2], generator=generator) * 0.01
            for i in range(count)}  # fmt: skip


def weight(index: int) -> int:
    """Training example count of client ``index`` (unequal, so the weighting is exercised)."""
    return 100 + 7 * index


def _timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def ours(num_params: int, num_clients: int) -> dict[str, Any]:
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
    sealed, commitments = {}, {}
    for name in names:
        (sealed[name], commitments[name]), seconds = _timed(masking.share_keys, states[name], bundles, public, PROTOCOL)
        steps["shares"].append(seconds)
    code = PROTOCOL.fixed_point(num_clients, unit_weights=False)
    uploads, reference = {}, np.zeros(num_params)
    for index, name in enumerate(names):
        update = synthetic_update(num_params, index)
        reference += weight(index) * flatten(update)
        encoded, seconds = _timed(code.encode, update, weight(index))
        steps["encode"].append(seconds)
        for_me = {peer: sealed[peer][name] for peer in names if peer != name}
        uploads[name], seconds = _timed(masking.mask_update, states[name], for_me, names, encoded)
        steps["mask"].append(seconds)
    revealed = []
    for name in names:
        shares, seconds = _timed(masking.reveal_shares, states[name], names, [])
        revealed.append(shares)
        steps["reveal"].append(seconds)
    template = synthetic_update(num_params, 0)
    by_name = {bundle.client: bundle for bundle in bundles}
    threshold = states[names[0]].threshold

    def server(survivors: list[str], shares: list[dict[str, dict[str, str]]], expected: np.ndarray) -> dict[str, float]:
        started = time.perf_counter()
        masked = {name: uploads[name] for name in survivors}
        summed, total_weight = code.decode(
            masking.unmask(session, masked, by_name, commitments, shares, threshold), template
        )
        seconds = time.perf_counter() - started
        error = float(np.abs(flatten(summed) / total_weight - expected / total_weight).max())
        bound = code.error_bound(len(survivors), total_weight)
        if total_weight != sum(weight(names.index(name)) for name in survivors) or not error <= bound:
            raise RuntimeError(f"fedtune's unmasked sum is wrong: max error {error:.3g} > bound {bound:.3g}")
        return {"seconds": seconds, "max_abs_error_of_mean": error, "error_bound": bound}

    no_dropout = server(names, revealed, reference)
    gone = names[-1]  # shared keys, then never uploaded: the survivors reveal its mask key instead of its seed
    survivors = names[:-1]
    after_dropout = [masking.reveal_shares(states[name], survivors, [gone]) for name in survivors]
    dropout_reference = reference - weight(num_clients - 1) * flatten(synthetic_update(num_params, num_clients - 1))
    one_dropout = server(survivors, after_dropout, dropout_reference)
    client_seconds = [sum(step[i] for step in steps.values()) for i in range(num_clients)]
    first = names[0]
    protocol_bytes = {
        "key_bundle": len(bundles[0].to_json()),
        "sealed_shares": sum(len(peer) + len(ciphertext) for peer, ciphertext in sealed[first].items()),
        "commitment": len(commitments[first]),
        "revealed_shares": len(json.dumps(revealed[0])),
    }
    vector = uploads[first].nbytes
    return {
        "client_seconds": statistics.median(client_seconds),
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
    setup = {Key.SAMPLE_NUMBER: num_clients, Key.SHARE_NUMBER: num_clients, Key.THRESHOLD: threshold,
             Key.CLIPPING_RANGE: FLOWER["clipping_range"], Key.TARGET_RANGE: FLOWER["quantization_range"],
             Key.MOD_RANGE: FLOWER["modulus_range"], Key.MAX_WEIGHT: FLOWER["max_weight"]}  # fmt: skip
    node_ids = list(range(1, num_clients + 1))
    states, public_keys = {}, {}
    steps: dict[str, list[float]] = {step: [] for step in ("setup", "share_keys", "quantize_and_mask", "unmask")}
    replies: dict[str, dict[int, dict[str, Any]]] = {step: {} for step in steps}
    for node_id in node_ids:
        states[node_id] = flower_mod.SecAggPlusState()
        states[node_id].nid = node_id
        replies["setup"][node_id], seconds = _timed(flower_mod._setup, states[node_id], dict(setup))
        public_keys[str(node_id)] = [replies["setup"][node_id][Key.PUBLIC_KEY_1], replies["setup"][node_id][Key.PUBLIC_KEY_2]]  # fmt: skip
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
        replies["quantize_and_mask"][node_id], seconds = _timed(mask, states[node_id], forwarded[node_id], weight(index), parameters)  # fmt: skip
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


def part_a(sizes: list[str], clients: list[int], timed: int) -> list[dict[str, Any]]:
    """Protocol costs, fedtune and Flower side by side, for every (size, clients) pair."""
    rows = []
    for size in sizes:
        for num_clients in clients:
            num_params = SIZES[size]
            row = {"size": size, "parameters": num_params, "clients": num_clients,
                   "plaintext_float32_bytes": 4 * num_params, "fedtune": ours(num_params, num_clients),
                   "flower_secaggplus": flower_client(num_params, num_clients, min(timed, num_clients))}  # fmt: skip
            plain = row["plaintext_float32_bytes"]
            row["fedtune"]["upload_vector_over_float32"] = row["fedtune"]["upload_vector_bytes"] / plain
            row["flower_secaggplus"]["upload_vector_over_float32"] = row["flower_secaggplus"]["upload_vector_bytes"] / plain  # fmt: skip
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
