"""A client's privacy state: kept in Flower's Context.state during a run, and on the node's disk for resume.

A resumed run starts a new Flower run, whose Context.state is empty; without a durable copy the client's
accountant would restart at zero and the budget would no longer hold. The copy lives on the client's own
machine (node config ``state-dir``, default ``$FEDTUNE_CACHE/client-state``; for a node of fedtune's in-process
simulation, the run directory's ``node-state/``): the client trusts no one else with its own accounting.

A round that is replayed after a crash, with the same global adapter as input, reproduces the same update
bit for bit (all randomness is seeded), so publishing it again reveals nothing new: the client restores
the state it had before that round instead of spending the budget twice. The same round with another
input is refused: its DP noise would be the same, and two updates with equal noise give a noise-free
difference.

A strategy can have a client keep some adapter tensors for itself (FedSA-LoRA's B and head): those live
beside the privacy state, per round, so that a replayed round starts from the same ones.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedtune.adapters import AdapterState
from fedtune.assets import cache_dir
from fedtune.files import atomic_write
from fedtune.secure.session import ProtocolError

_ROUNDS = "rounds"  # round -> fingerprint of the global adapter received, and the state before training


def record_scope(experiment_hash: str, run_dir: str, simulated: bool) -> str:
    """What "the same experiment" means for a node's durable per-round records (its privacy state, the rounds
    it uploaded in, the clients it revealed its ring secret for): the config hash for a deployed node, whatever
    run dir the server names, since a new run dir must give it neither a fresh budget nor a second upload or
    ring for a round; one run in fedtune's in-process simulation, where one operator runs every node and
    reruns are routine."""
    return f"{experiment_hash}|{run_dir}" if simulated else experiment_hash


def records_config(node_config: Mapping[str, Any], run_dir: str, simulated: bool) -> Mapping[str, Any]:
    """``node_config`` with the directory its per-run records live in (``state-dir``): as set, else for a node
    of fedtune's in-process simulation ``<run dir>/node-state``. One operator runs all of a simulation's nodes
    and their records belong to that run: a run dir deleted and written again starts the experiment afresh
    instead of finding round 1 already uploaded in an earlier user cache. Identity keys stay where the node
    config puts them (``identity_file``): they outlive runs."""
    if "state-dir" in node_config or not simulated:
        return node_config
    return {**node_config, "state-dir": str(Path(run_dir) / "node-state")}


def state_file(node_config: Mapping[str, Any], run_key: str, client_key: str) -> Path:
    """Where this client keeps the durable copy of its state for one run."""
    return _state_dir(node_config) / f"{_hashed(f'{run_key}|{client_key}')}.json"


def uploads_file(node_config: Mapping[str, Any], experiment_key: str, client_key: str) -> Path:
    """Where this client records the rounds of one experiment it uploaded a masked update in."""
    return _state_dir(node_config) / "uploads" / f"{_hashed(f'{experiment_key}|{client_key}')}.json"


def rings_file(node_config: Mapping[str, Any], experiment_key: str, client_key: str) -> Path:
    """Where this client records, per round of one experiment, the clients it revealed its SecAgg+ ring secret for."""
    return _state_dir(node_config) / "rings" / f"{_hashed(f'{experiment_key}|{client_key}')}.json"


def groups_file(node_config: Mapping[str, Any], experiment_key: str, client_key: str) -> Path:
    """Where this client records its fixed group for contribution accounting in one experiment."""
    return _state_dir(node_config) / "groups" / f"{_hashed(f'{experiment_key}|{client_key}')}.json"


def personal_file(node_config: Mapping[str, Any], run_key: str, client_key: str) -> Path:
    """Where this client keeps, for one run, the adapter tensors it does not share (FedSA-LoRA's B and head)."""
    return _state_dir(node_config) / "personal" / f"{_hashed(f'{run_key}|{client_key}')}.pt"


def load_personal(path: Path, server_round: int) -> AdapterState:
    """The tensors kept after the latest round before ``server_round`` (empty before the first): a round
    replayed after a crash starts from the same ones, so it repeats bit for bit."""
    rounds = torch.load(path, weights_only=True) if path.is_file() else {}
    earlier = [r for r in rounds if r < server_round]
    return dict(rounds[max(earlier)]) if earlier else {}


def save_personal(path: Path, server_round: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """Keep the tensors trained in ``server_round``, and those of the round before (what a replay starts from)."""
    rounds = torch.load(path, weights_only=True) if path.is_file() else {}
    kept = {r: t for r, t in rounds.items() if server_round - 1 <= r < server_round}
    buffer = io.BytesIO()
    torch.save({**kept, server_round: dict(tensors)}, buffer)
    atomic_write(path, buffer.getvalue())


def identity_file(node_config: Mapping[str, Any], client_key: str) -> Path:
    """This node's identity key: node config ``identity-key``, else one kept beside its privacy state."""
    if "identity-key" in node_config:
        return Path(str(node_config["identity-key"]))
    return _state_dir(node_config) / "identity" / f"{_hashed(client_key)}.pem"


def load(in_context: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The state from Context.state, else from the durable file, else empty."""
    if in_context:
        return dict(in_context)
    return json.loads(path.read_text()) if path.is_file() else {}


def save(state: Mapping[str, Any], path: Path) -> None:
    """Write the durable copy atomically."""
    atomic_write(path, json.dumps(dict(state)).encode())


def begin_round(state: dict[str, Any], server_round: int, input_fingerprint: str) -> None:
    """Record the state before ``server_round``; for a replay of that round with the same input (global adapter
    and the strategy's settings, fingerprinted together), restore it.

    Raises:
        ProtocolError: This client already trained ``server_round`` on another input. Its DP noise is
            drawn from its secret and the round, so a second input would carry the same noise, and the
            difference of the two updates would be noise-free.
    """
    rounds = json.loads(state.get(_ROUNDS, "{}"))
    entry = rounds.get(str(server_round))
    if entry is not None and entry["input"] != input_fingerprint:
        raise ProtocolError(
            f"This client already trained round {server_round} on a different global adapter or settings; training it again "
            "would reuse its DP noise on another input. Refused."
        )
    if entry is not None:
        state.clear()
        state.update(entry["before"])
    else:
        rounds[str(server_round)] = {
            "input": input_fingerprint,
            "before": {k: v for k, v in state.items() if k != _ROUNDS},
        }
    state[_ROUNDS] = json.dumps(rounds)


def _state_dir(node_config: Mapping[str, Any]) -> Path:
    return Path(str(node_config.get("state-dir", cache_dir() / "client-state")))


def _hashed(name: str) -> str:
    """A file name for ``name`` that reveals nothing about it and is safe on every file system."""
    return hashlib.sha256(name.encode()).hexdigest()[:24]
