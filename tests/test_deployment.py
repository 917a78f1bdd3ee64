"""End to end deployment: a real SuperLink, two real SuperNodes, and `flwr run` of the repository as a Flower app.

The run uses secure aggregation (secure=masking) and admits only the nodes whose identity keys are in
the trusted-keys file. Everything runs on loopback with free ports and its own FLWR_HOME. Every process the test starts, and every
process those start (SuperExec, flwr-serverapp, flwr-clientapp), is stopped by PID afterwards, also when the
test fails; the test fails if any of them is still alive after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from fedtune.config import to_run_config
from fedtune.ledger import audit
from fedtune.secure import identity
from tests.conftest import tiny_overrides
from tests.nodes import federate

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live next to the interpreter
FEDERATION = "fedtune-test"
MARKER = "FEDTUNE_DEPLOYMENT_TEST"  # env var inherited by every process of this test, children included
RUN_TIMEOUT = 600.0  # guard against a hang; a run takes 1-4 minutes on 2 cores in subprocess mode (busy machine)


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class FlowerProcesses:
    """Starts Flower processes in their own sessions and stops them, and everything they spawned, by PID."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.marker = env[MARKER]
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.known: set[psutil.Process] = set()  # every descendant seen so far (psutil guards against PID reuse)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [str(BIN_DIR / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,  # its own process group, stopped with killpg in stop()
            )
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def check_running(self, *names: str) -> None:
        """Fail with the process's log if one of the named started processes (default: all) has exited."""
        self._collect()
        for name in names or tuple(self.started):
            process = self.started[name]
            if process.poll() is not None:
                pytest.fail(f"{name} exited with code {process.returncode}:\n{self.log(name)[-4000:]}")

    def _collect(self) -> None:
        for process in self.started.values():
            try:
                parent = psutil.Process(process.pid)
                self.known.update([parent, *parent.children(recursive=True)])
            except psutil.NoSuchProcess:
                pass

    def _marked(self) -> set[psutil.Process]:
        """Processes carrying this test's marker in their environment (finds orphans re-parented to init)."""
        found = set()
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARKER) == self.marker:
                    found.add(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self, grace: float = 15.0) -> list[str]:
        """Stop everything: SIGTERM to each process group and each known process, then SIGKILL what is left.

        Returns:
            Descriptions of processes that are still alive afterwards (empty when all are gone).
        """
        self._collect()
        targets = {p for p in self.known | self._marked() if _alive(p)}
        for process in self.started.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)  # groups we created with start_new_session=True
                except ProcessLookupError:
                    pass
        for process in targets:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(targets, timeout=grace)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for process in self.started.values():
            try:
                process.wait(timeout=5)  # reap our direct children
            except subprocess.TimeoutExpired:
                pass
        survivors = [p for p in self.known | self._marked() if _alive(p)]
        descriptions = []
        for process in survivors:
            try:
                descriptions.append(f"{process.pid} {' '.join(process.cmdline())}")
            except psutil.NoSuchProcess:
                continue
        return descriptions


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[FlowerProcesses]:
    """A process manager whose processes are stopped when the test ends, pass or fail."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode spawn Flower commands by name
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # belt and braces: the flag is passed as well
        "UV_OFFLINE": "1",  # should anything still call `uv sync`, it must not download (torch!)
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        MARKER: uuid.uuid4().hex,
    }
    manager = FlowerProcesses(tmp_path, env)
    yield manager
    survivors = manager.stop()
    if survivors:
        pytest.fail("Processes still alive after stopping them by PID:\n" + "\n".join(survivors))


def _wait_for_health(flower: FlowerProcesses, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flower.check_running()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"SuperLink did not answer on port {port} within {timeout:.0f} s:\n{flower.log('superlink')[-4000:]}")


def _flwr(flower: FlowerProcesses, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "flwr"), *args],
        env=flower.env,
        cwd=flower.workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _start_superlink(flower: FlowerProcesses) -> int:
    """A SuperLink on a free loopback port, set as the default federation of this test's FLWR_HOME."""
    (port,) = _free_ports(1)
    (Path(flower.env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    flower.start(
        "superlink",
        [
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
    )
    _wait_for_health(flower, port)
    return port


def _trusted_nodes(tmp_path: Path, count: int) -> Path:
    """Identity keys for partition-0.. and the trusted-keys file listing them (the operators' exchange)."""
    trusted_keys = tmp_path / "trusted_keys.json"
    for partition in range(count):
        node = identity.load_or_create(tmp_path / "keys" / f"partition-{partition}.pem")
        identity.add_trusted_key(trusted_keys, f"partition-{partition}", node.public_hex)
    return trusted_keys


def _start_supernodes(
    flower: FlowerProcesses, tmp_path: Path, superlink_port: int, trusted_keys: Path, *extra: str
) -> list[int]:
    """Two SuperNodes (partitions 0 and 1) with their identity keys; returns their Runtime API ports."""
    ports = _free_ports(2)
    for partition, port in enumerate(ports):
        flower.start(
            f"supernode-{partition}",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{superlink_port}",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={partition} num-partitions=2 identity-key='{tmp_path}/keys/partition-{partition}.pem' "
                f"trusted-keys='{trusted_keys}' min-round-clients=2",  # a masked node needs its own trusted list
                *extra,
            ],
        )
    return ports


def _run(flower: FlowerProcesses, tmp_path: Path, overrides: list[str], run_dir: Path, app: Path = REPO_ROOT) -> str:
    """`flwr run` the app at ``app`` with ``overrides`` and wait for it to end; returns its final status and
    keeps its log as ``flwr-run-<id>.log``."""
    run_config = to_run_config(overrides, str(run_dir))
    run_config_file = tmp_path / "run_config.toml"
    run_config_file.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()))

    # `--stream` returns once the run has finished (its logs are complete); the loop below guards against a hang.
    with open(tmp_path / "flwr-run.log", "wb") as log:
        submit = subprocess.Popen(
            [str(BIN_DIR / "flwr"), "run", str(app), FEDERATION, "--stream", "--run-config", str(run_config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower.env,
            cwd=tmp_path,
            start_new_session=True,
        )
    flower.started["flwr-run"] = submit
    long_lived = [name for name in flower.started if name != "flwr-run"]
    deadline = time.monotonic() + RUN_TIMEOUT
    while submit.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"The run did not finish within {RUN_TIMEOUT:.0f} s:\n{flower.log('flwr-run')[-4000:]}")
        flower.check_running(*long_lived)  # also remembers every flwr-*app process
        time.sleep(1.0)
    submitted = flower.log("flwr-run")
    match = re.search(r"Successfully started run (\d+)", submitted)
    assert match, submitted
    (tmp_path / f"flwr-run-{match.group(1)}.log").write_text(submitted)
    listing = _flwr(flower, "ls", FEDERATION, "--run-id", match.group(1), "--format", "json")
    return str(json.loads(listing.stdout)["runs"][0]["status"])


def _run_to_completion(flower: FlowerProcesses, tmp_path: Path, overrides: list[str], run_dir: Path) -> None:
    """`flwr run` the repository with ``overrides``; fail unless the run finished as completed."""
    status = _run(flower, tmp_path, overrides, run_dir)
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
    superlink_port = _start_superlink(flower)
    trusted_keys = _trusted_nodes(tmp_path, 2)
    _start_supernodes(flower, tmp_path, superlink_port, trusted_keys)
    run_dir = tmp_path / "run"
    overrides = _masked_overrides(tiny_bert_dir, run_dir, trusted_keys)
    _run_to_completion(flower, tmp_path, overrides, run_dir)
    _check_outputs(run_dir)
    for name in ("supernode-0", "supernode-1"):  # no ClientApp failed (their output goes to the SuperNodes' logs)
        assert "Traceback" not in flower.log(name), flower.log(name)[-4000:]
    assert any("flwr-clientapp" in " ".join(_cmdline(p)) for p in flower.known)
    survivors = flower.stop()
    assert not survivors, survivors
    _assert_same_as_in_process(overrides, run_dir, tmp_path)


@pytest.mark.slow
def test_the_fedtune_worker_serves_every_message_of_a_run_from_one_process(
    flower: FlowerProcesses, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """SuperNodes in process isolation, each served by a `fedtune worker` that holds its SuperExec secret: no
    flwr-clientapp process runs, each node builds its base model once for the whole run, and the result is
    bit for bit the in-process (and so the subprocess mode's) result."""
    superlink_port = _start_superlink(flower)
    trusted_keys = _trusted_nodes(tmp_path, 2)
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    ports = _start_supernodes(
        flower,
        tmp_path,
        superlink_port,
        trusted_keys,
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
    )
    _wait_for_runtime_api(flower, ports[0])
    for secret_file in (None, _wrong_secret(tmp_path)):  # without the SuperNode's secret nobody acquires its tasks
        with pytest.raises(httpx.HTTPStatusError) as refused:
            _acquire_task(ports[0], secret_file)
        assert refused.value.response.status_code in (401, 403)
    for partition, port in enumerate(ports):
        flower.start(
            f"worker-{partition}",
            [
                "fedtune",
                "worker",
                "--runtime-api-address",
                f"127.0.0.1:{port}",
                "--superexec-auth-secret-file",
                str(secret),
            ],
        )
    run_dir = tmp_path / "run"
    overrides = _masked_overrides(tiny_bert_dir, run_dir, trusted_keys)
    _run_to_completion(flower, tmp_path, overrides, run_dir)
    _check_outputs(run_dir)
    assert not [p for p in flower.known if "flwr-clientapp" in " ".join(_cmdline(p))]
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
    status = _run(flower, tmp_path, overrides, tmp_path / "run-2", app=changed)
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


def _copy_of_the_app(target: Path) -> Path:
    """The files `flwr run` bundles from this repository (pyproject's fab-include), copied to ``target``."""
    for pattern in ("fedtune/**/*.py", "strategies/**/*.py", "conf/**/*.yaml", "README.md", "pyproject.toml"):
        for path in REPO_ROOT.glob(pattern):
            if "__pycache__" not in path.parts:
                (target / path.relative_to(REPO_ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.relative_to(REPO_ROOT))
    return target


def _wait_for_runtime_api(flower: FlowerProcesses, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flower.check_running()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail(f"The SuperNode's Runtime API did not open port {port}:\n{flower.log('supernode-0')[-4000:]}")


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


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []
