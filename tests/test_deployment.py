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

import psutil
import pytest

from fedtune.config import to_run_config
from fedtune.ledger import audit
from fedtune.secure import identity
from tests.conftest import tiny_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live next to the interpreter
FEDERATION = "fedtune-test"
MARKER = "FEDTUNE_DEPLOYMENT_TEST"  # env var inherited by every process of this test, children included
RUN_TIMEOUT = 300.0  # guard against a hang; the run itself takes about a minute on 2 cores


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


@pytest.mark.slow
def test_flwr_run_on_real_superlink_and_supernodes(
    flower: FlowerProcesses, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    superlink_port, *node_ports = _free_ports(3)
    (Path(flower.env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )

    flower.start(
        "superlink",
        [
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(superlink_port),
            "--disable-runtime-dependency-installation",
        ],
    )
    _wait_for_health(flower, superlink_port)
    trusted_keys = tmp_path / "trusted_keys.json"  # the operators' exchange of node identity keys
    for partition in range(2):
        node = identity.load_or_create(tmp_path / "keys" / f"partition-{partition}.pem")
        identity.add_trusted_key(trusted_keys, f"partition-{partition}", node.public_hex)
    for partition, port in enumerate(node_ports):
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
            ],
        )

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_bert_dir,
        run_dir,
        "federation.round_timeout=240",
        "secure=masking",
        f"federation.trusted_keys={trusted_keys}",
    )
    run_config = to_run_config(overrides, str(run_dir))
    run_config_file = tmp_path / "run_config.toml"
    run_config_file.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()))

    # `--stream` returns once the run has finished (its logs are complete); the loop below guards against a hang.
    with open(tmp_path / "flwr-run.log", "wb") as log:
        submit = subprocess.Popen(
            [
                str(BIN_DIR / "flwr"),
                "run",
                str(REPO_ROOT),
                FEDERATION,
                "--stream",
                "--run-config",
                str(run_config_file),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower.env,
            cwd=tmp_path,
            start_new_session=True,
        )
    flower.started["flwr-run"] = submit
    deadline = time.monotonic() + RUN_TIMEOUT
    while submit.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"The run did not finish within {RUN_TIMEOUT:.0f} s:\n{flower.log('flwr-run')[-4000:]}")
        flower.check_running("superlink", "supernode-0", "supernode-1")  # also remembers every flwr-*app process
        time.sleep(1.0)
    submitted = flower.log("flwr-run")
    assert submit.returncode == 0, submitted
    match = re.search(r"Successfully started run (\d+)", submitted)
    assert match, submitted

    listing = _flwr(flower, "ls", FEDERATION, "--run-id", match.group(1), "--format", "json")
    runs = json.loads(listing.stdout)["runs"]
    assert runs[0]["status"] == "finished:completed", submitted[-6000:]  # the stream holds the ServerApp's log

    # The outputs of a completed run: two checkpoints, metrics, exported adapter.
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

    # No ClientApp failed along the way (their output goes to the SuperNodes' logs).
    for name in ("supernode-0", "supernode-1"):
        assert "Traceback" not in flower.log(name), flower.log(name)[-4000:]

    survivors = flower.stop()
    assert not survivors, survivors
