"""Real Flower deployments on loopback, for tests/test_deployment.py and benchmarks/deployment_tax.py: a
SuperLink, SuperNodes (Flower's subprocess isolation, or process isolation served by `fedtune worker`), and
`flwr run` of the repository as a Flower app. Every process started here, and every process those start
(SuperExec, flwr-serverapp, flwr-clientapp), is found by PID (and by a marker in its environment) and stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedtune.config import to_run_config
from fedtune.secure import identity

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live next to the interpreter
FEDERATION = "fedtune-test"
MARKER = "FEDTUNE_DEPLOYMENT_TEST"  # env var inherited by every process of this test, children included
MAKE_CERTS = REPO_ROOT / "examples" / "deployment" / "make_certs.py"
RUN_TIMEOUT = 600.0  # guard against a hang; a run takes 1-4 minutes on 2 cores in subprocess mode (busy machine)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_alive(process: psutil.Process) -> bool:
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
        # The latest command line of every descendant seen so far, kept because most have exited by the time a
        # test asks what ran (psutil.Process compares by PID and start time, so a reused PID is another key).
        self.seen: dict[psutil.Process, str] = {}

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

    def run_until_exit(self, name: str, args: list[str], timeout: float = 120.0) -> int:
        """Start ``name`` and wait for it to exit, as a process that must give up does (a refused SuperNode);
        returns its exit code. It then no longer counts among the processes that must keep running; anything
        it left behind carries the marker and is still stopped by :meth:`stop`."""
        process = self.start(name, args)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} was still running after {timeout:.0f} s:\n{self.log(name)[-4000:]}")
        finally:
            if process.poll() is not None:
                del self.started[name]

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
                descendants = [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for descendant in descendants:
                command = " ".join(cmdline(descendant))
                if command:  # empty once it has exited: keep what it ran
                    self.seen[descendant] = command
                else:
                    self.seen.setdefault(descendant, "")

    def ran(self, program: str) -> bool:
        """Whether any process seen so far ran ``program`` (a substring of its command line)."""
        self._collect()
        return any(program in command for command in self.seen.values())

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
        targets = {p for p in set(self.seen) | self._marked() if is_alive(p)}
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
        survivors = [p for p in set(self.seen) | self._marked() if is_alive(p)]
        descriptions = []
        for process in survivors:
            try:
                descriptions.append(f"{process.pid} {' '.join(process.cmdline())}")
            except psutil.NoSuchProcess:
                continue
        return descriptions


def flower_processes(workdir: Path) -> FlowerProcesses:
    """A process manager for Flower processes run from ``workdir``, with their own FLWR_HOME, offline, and a
    marker in their environment that finds every one of them (and their children) when stopping."""
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode spawn Flower commands by name
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # belt and braces: the flag is passed as well
        "UV_OFFLINE": "1",  # should anything still call `uv sync`, it must not download (torch!)
        "UV_CACHE_DIR": str(workdir / "uv-cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        MARKER: uuid.uuid4().hex,
    }
    return FlowerProcesses(workdir, env)


def wait_for_health(flower: FlowerProcesses, port: int, tls: Tls | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    scheme, context = ("https", ssl.create_default_context(cafile=tls.ca)) if tls else ("http", None)
    while time.monotonic() < deadline:
        flower.check_running()
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"SuperLink did not answer on port {port} within {timeout:.0f} s:\n{flower.log('superlink')[-4000:]}")


def flwr(flower: FlowerProcesses, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "flwr"), *args],
        env=flower.env,
        cwd=flower.workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Tls:
    """A deployment's TLS and SuperNode-authentication material, made with examples/deployment/make_certs.py
    as the operator (CA, SuperLink certificate) and each hospital (its node key) would make it.

    Args:
        directory: Where ``certs/`` (ca.crt, server.pem, server.key) and ``keys/`` (node keys) are.
    """

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "certs" / "ca.crt"

    def node_key(self, name: str) -> Path:
        """The OpenSSH private key of node ``name`` (its public key is ``<key>.pub``)."""
        return self.directory / "keys" / name

    def superlink_args(self) -> list[str]:
        certs = self.directory / "certs"
        return [
            *("--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(certs / "server.pem")),
            *("--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"),
        ]

    def supernode_args(self, name: str) -> list[str]:
        return ["--root-certificates", str(self.ca), "--auth-supernode-private-key", str(self.node_key(name))]


def make_tls(directory: Path, nodes: list[str]) -> Tls:
    """A CA and a SuperLink certificate for 127.0.0.1, and an authentication key for each of ``nodes``."""
    script = [sys.executable, str(MAKE_CERTS)]
    subprocess.run([*script, "tls", "--out", str(directory / "certs"), "--san", "127.0.0.1"], check=True)
    for name in nodes:
        subprocess.run([*script, "node-key", "--out", str(directory / "keys"), "--name", name], check=True)
    return Tls(directory)


def start_superlink(flower: FlowerProcesses, tls: Tls | None = None) -> int:
    """A SuperLink on a free loopback port, set as the default federation of this test's FLWR_HOME; with
    ``tls``, over TLS and admitting only SuperNodes whose keys are registered (:func:`register_nodes`)."""
    (port,) = free_ports(1)
    security = f'root-certificates = "{tls.ca}"' if tls else "insecure = true"
    (Path(flower.env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )
    flower.start(
        "superlink",
        [
            "flower-superlink",
            *(tls.superlink_args() if tls else ["--insecure"]),
            *("--host", "127.0.0.1", "--port", str(port)),
            "--disable-runtime-dependency-installation",
        ],
    )
    wait_for_health(flower, port, tls)
    return port


def register_nodes(flower: FlowerProcesses, tls: Tls, nodes: list[str]) -> None:
    """Register the public keys of ``nodes`` with the SuperLink, as its operator does."""
    for name in nodes:
        registered = flwr(flower, "supernode", "register", f"{tls.node_key(name)}.pub", FEDERATION)
        assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered


def trusted_nodes(tmp_path: Path, count: int) -> Path:
    """Identity keys for partition-0.. and the trusted-keys file listing them (the operators' exchange)."""
    trusted_keys = tmp_path / "trusted_keys.json"
    for partition in range(count):
        node = identity.load_or_create(tmp_path / "keys" / f"partition-{partition}.pem")
        identity.add_trusted_key(trusted_keys, f"partition-{partition}", node.public_hex)
    return trusted_keys


def start_supernodes(
    flower: FlowerProcesses,
    tmp_path: Path,
    superlink_port: int,
    trusted_keys: Path,
    *extra: str,
    tls: Tls | None = None,
    command: tuple[str, ...] = ("flower-supernode",),
) -> list[int]:
    """Two SuperNodes (partitions 0 and 1) with their identity keys, over TLS with their registered node keys
    when ``tls`` is given, started by ``command`` (e.g. ``fedtune supernode --``); returns their Runtime API
    ports."""
    ports = free_ports(2)
    for partition, port in enumerate(ports):
        name = f"partition-{partition}"
        flower.start(
            f"supernode-{partition}",
            [
                *command,
                *(tls.supernode_args(name) if tls else ["--insecure"]),
                *("--superlink", f"127.0.0.1:{superlink_port}", "--port", str(port)),
                "--node-config",
                f"partition-id={partition} num-partitions=2 identity-key='{tmp_path}/keys/{name}.pem' "
                f"trusted-keys='{trusted_keys}' min-round-clients=2",  # a masked node needs its own trusted list
                *extra,
            ],
        )
    return ports


def run_app(flower: FlowerProcesses, tmp_path: Path, overrides: list[str], run_dir: Path, app: Path = REPO_ROOT) -> str:
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
    listing = flwr(flower, "ls", FEDERATION, "--run-id", match.group(1), "--format", "json")
    return str(json.loads(listing.stdout)["runs"][0]["status"])


def start_workers(flower: FlowerProcesses, ports: list[int], secret: Path) -> None:
    """A `fedtune worker` for each SuperNode Runtime API port (``worker-<i>``), with the SuperExec secret."""
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


def wait_for_runtime_api(flower: FlowerProcesses, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flower.check_running()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail(f"The SuperNode's Runtime API did not open port {port}:\n{flower.log('supernode-0')[-4000:]}")


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []
