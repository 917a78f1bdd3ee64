"""End to end deployment: a real SuperLink, two real SuperNodes, and `flwr run` of the repository as a Flower app
(tests/deployment.py starts them): in Flower's subprocess isolation on plain loopback, and over TLS with SuperNode
authentication, served by `fedtune worker`.

The runs use secure aggregation (secure=masking) and admit only the nodes whose identity keys are in the
trusted-keys file. Everything runs on loopback with free ports and its own FLWR_HOME. Every process a test
starts, and every process those start, is stopped by PID afterwards, also when the test fails; the test fails
if any of them is still alive after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from fedtune.ledger import audit
from tests import deployment
from tests.conftest import tiny_overrides
from tests.deployment import REPO_ROOT, FlowerProcesses, Tls, flower_processes
from tests.nodes import federate


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[FlowerProcesses]:
    """A process manager whose processes are stopped when the test ends, pass or fail."""
    manager = flower_processes(tmp_path)
    yield manager
    survivors = manager.stop()
    if survivors:
        pytest.fail("Processes still alive after stopping them by PID:\n" + "\n".join(survivors))


def _run_to_completion(flower: FlowerProcesses, tmp_path: Path, overrides: list[str], run_dir: Path) -> None:
    """`flwr run` the repository with ``overrides``; fail unless the run finished as completed."""
    status = deployment.run_app(flower, tmp_path, overrides, run_dir)
    assert status == "finished:completed", flower.log("flwr-run")[-6000:]  # the stream holds the ServerApp's log


def _check_outputs(run_dir: Path) -> None:
    """The outputs of a completed masked two-round run: checkpoints, metrics per round, adapter, a sound ledger."""
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*.pt")) == ["round-0001.pt", "round-0002.pt"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scopes: dict[int, set[str]] = defaultdict(set)
    for line in lines:
        scopes[line["round"]].add(line["scope"])
    assert sorted(r for r, s in scopes.items() if "central" in s) == [0, 1, 2]
    for server_round in (1, 2):
        assert {"client:partition-0", "client:partition-1"} <= scopes[server_round]
        clients = [
            line["value"]
            for line in lines
            if line["round"] == server_round and line["scope"] == "train" and line["metric"] == "clients"
        ]
        assert clients == [2.0]
    assert audit(run_dir) == []  # the ledger matches metrics, checkpoints and adapter
    assert {line["round"] for line in lines if line["metric"] == "aggregation_error_bound"} == {1, 2}  # masked


def _masked_overrides(tiny_bert_dir: Path, run_dir: Path, trusted_keys: Path) -> list[str]:
    return tiny_overrides(
        tiny_bert_dir,
        run_dir,
        "federation.round_timeout=240",
        "secure=masking",
        f"federation.trusted_keys={trusted_keys}",
    )


def _assert_same_as_in_process(overrides: list[str], run_dir: Path, root: Path) -> None:
    """The deployed run's final adapter equals, bit for bit, the same experiment over in-process nodes (the
    reference every deployment mode is compared with, so that the modes equal each other)."""
    reference_root = root / "in-process"
    moved = {"run_dir": reference_root / "run", "federation.trusted_keys": reference_root / "trusted_keys.json"}
    reference = [f"{key}={moved[key]}" if (key := o.split("=", 1)[0]) in moved else o for o in overrides]
    expected = torch.load(
        federate(reference_root, reference, 2, prefix="partition", node_config={"min-round-clients": 2})
        / "checkpoints"
        / "round-0002.pt",
        weights_only=True,
    )["adapter"]
    deployed = torch.load(run_dir / "checkpoints" / "round-0002.pt", weights_only=True)["adapter"]
    assert expected.keys() == deployed.keys()
    assert all(torch.equal(expected[k], deployed[k]) for k in expected)


@pytest.mark.slow
def test_flwr_run_on_real_superlink_and_supernodes(
    flower: FlowerProcesses, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Flower's default isolation: each message to a node is handled by a fresh flwr-clientapp process."""
    superlink_port = deployment.start_superlink(flower)
    trusted_keys = deployment.trusted_nodes(tmp_path, 2)
    deployment.start_supernodes(flower, tmp_path, superlink_port, trusted_keys)
    run_dir = tmp_path / "run"
    overrides = _masked_overrides(tiny_bert_dir, run_dir, trusted_keys)
    _run_to_completion(flower, tmp_path, overrides, run_dir)
    _check_outputs(run_dir)
    for name in ("supernode-0", "supernode-1"):  # no ClientApp failed (their output goes to the SuperNodes' logs)
        assert "Traceback" not in flower.log(name), flower.log(name)[-4000:]
    assert flower.ran("flwr-clientapp")
    survivors = flower.stop()
    assert not survivors, survivors
    _assert_same_as_in_process(overrides, run_dir, tmp_path)


@pytest.mark.slow
def test_the_fedtune_worker_serves_every_message_of_a_run_from_one_process(
    flower: FlowerProcesses, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A production-like deployment: TLS, SuperNode authentication (a node whose key is not registered is
    refused), and SuperNodes in process isolation (started by `fedtune supernode`, Flower's SuperNode with
    shorter polls), each served by a `fedtune worker` that holds its SuperExec secret. No flwr-clientapp process runs, each node builds its base model once for the whole run, and the
    result is bit for bit the in-process (and so the subprocess mode's) result."""
    tls = deployment.make_tls(tmp_path / "flower-auth", ["partition-0", "partition-1", "stranger"])
    superlink_port = deployment.start_superlink(flower, tls)
    deployment.register_nodes(flower, tls, ["partition-0", "partition-1"])
    _assert_an_unregistered_node_is_refused(flower, tls, superlink_port)
    trusted_keys = deployment.trusted_nodes(tmp_path, 2)
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    ports = deployment.start_supernodes(
        flower,
        tmp_path,
        superlink_port,
        trusted_keys,
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
        tls=tls,
        command=("fedtune", "supernode", "--idle-poll", "0.2", "--"),
    )
    deployment.wait_for_runtime_api(flower, ports[0])
    for secret_file in (None, _wrong_secret(tmp_path)):  # without the SuperNode's secret nobody acquires its tasks
        with pytest.raises(httpx.HTTPStatusError) as refused:
            _acquire_task(ports[0], secret_file)
        assert refused.value.response.status_code in (401, 403)
    deployment.start_workers(flower, ports, secret)
    run_dir = tmp_path / "run"
    overrides = _masked_overrides(tiny_bert_dir, run_dir, trusted_keys)
    _run_to_completion(flower, tmp_path, overrides, run_dir)
    _check_outputs(run_dir)
    assert not flower.ran("flwr-clientapp")
    pids = {}
    for partition in range(2):
        log = flower.log(f"worker-{partition}")
        assert "Traceback" not in log, log[-4000:]
        assert len(re.findall(r"Built \S+ \+ LoRA", log)) == 1, log[-4000:]  # once, for every message of the run
        pids[partition] = flower.started[f"worker-{partition}"].pid
    _assert_same_as_in_process(overrides, run_dir, tmp_path)

    # A second run, from a bundle whose code differs by one comment: each worker starts afresh for the new run
    # (same PID, exec), finds the bundle's code is not its own, and refuses; the run fails and no node ran it.
    changed = _copy_of_the_app(tmp_path / "changed-app")
    with open(changed / "fedtune" / "client_app.py", "a") as code:
        code.write("# not the code this node installed\n")
    status = deployment.run_app(flower, tmp_path, overrides, tmp_path / "run-2", app=changed)
    assert status.startswith("finished:") and status != "finished:completed", status
    for partition in range(2):
        log = flower.log(f"worker-{partition}")
        assert "restarting with nothing of the previous run" in log, log[-4000:]
        assert "ships other code than this worker runs (1 files differ: fedtune/client_app.py)" in log, log[-4000:]
        assert flower.started[f"worker-{partition}"].pid == pids[partition]
        flower.check_running(f"worker-{partition}")
    assert "failed the query message: <class 'fedtune.worker.StaleCode'>" in flower.log(
        "flwr-run"
    )  # the operator sees why
    assert not list((tmp_path / "run-2").glob("checkpoints/round-*.pt"))
    survivors = flower.stop()
    assert not survivors, survivors


def _assert_an_unregistered_node_is_refused(flower: FlowerProcesses, tls: Tls, superlink_port: int) -> None:
    """A SuperNode with a valid key the operator never registered cannot join: it exits, refused."""
    (port,) = deployment.free_ports(1)
    args = ["flower-supernode", *tls.supernode_args("stranger"), "--superlink", f"127.0.0.1:{superlink_port}"]
    code = flower.run_until_exit("stranger", [*args, "--port", str(port)])
    assert code != 0 and "Failed to activate SuperNode" in flower.log("stranger"), flower.log("stranger")[-4000:]
    assert "No SuperNode found with the given public key" in flower.log("superlink")


def _copy_of_the_app(target: Path) -> Path:
    """The files `flwr run` bundles from this repository (pyproject's fab-include), copied to ``target``."""
    for pattern in ("fedtune/**/*.py", "strategies/**/*.py", "conf/**/*.yaml", "README.md", "pyproject.toml"):
        for path in REPO_ROOT.glob(pattern):
            if "__pycache__" not in path.parts:
                (target / path.relative_to(REPO_ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.relative_to(REPO_ROOT))
    return target


def _wrong_secret(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.secret"
    path.write_bytes(os.urandom(32))
    return path


def _acquire_task(port: int, secret_file: Path | None) -> None:
    """Ask the Runtime API for a task once, as an executor does, signing the call with ``secret_file``'s secret."""
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret_file is not None:
        protected = frozenset({"/flwr.proto.Runtime/AcquireTask"})
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret_file.read_bytes(), protected_methods=protected)
        )
    client = RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", True, None, interceptors)  # no retries
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    finally:
        client.close()
