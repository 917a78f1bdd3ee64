"""The onboarding guide's commands and systemd units (examples/deployment/) are ones the programs accept.

A guide whose flags drifted from the programs would fail a site's IT at the first command. The keys the
guide makes are made here, with its own commands (into a temporary directory instead of /etc/fedtune); the
units' command lines are checked against each program's arguments and against each other (the worker
serves the SuperNode the other unit starts).
"""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedtune import cli, client_app

DEPLOYMENT = Path(__file__).resolve().parents[1] / "examples" / "deployment"
GUIDE = DEPLOYMENT / "ONBOARDING.md"
BIN_DIR = Path(sys.executable).parent


def _exec_start(unit: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(DEPLOYMENT / "systemd" / unit)
    return shlex.split(parser["Service"]["ExecStart"].replace("\\\n", " "))


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _guide_commands() -> list[list[str]]:
    """The commands in the guide's bash blocks, without ``sudo``, the virtual environment's prefix or comments."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    commands = []
    for line in "\n".join(blocks).splitlines():
        line = line.split("   #")[0].strip()
        for command in line.split("&&"):
            words = [w for w in shlex.split(command) if w != "sudo"]
            if words:
                commands.append([w.removeprefix(".venv/bin/") for w in words])
    return commands


def _supernode_flags(words: list[str]) -> list[str]:
    """The flags the unit gives Flower's SuperNode (`fedtune supernode [--idle-poll S] -- FLAGS`)."""
    assert Path(words[0]).name == "fedtune" and words[1] == "supernode"
    args = cli.build_parser().parse_args(words[1:])
    assert 0 < args.idle_poll <= 3 and args.flower_args[0] == "--"
    return args.flower_args[1:]


def test_the_supernode_unit_uses_only_flags_the_supernode_has() -> None:
    words = _supernode_flags(_exec_start("fedtune-supernode.service"))
    documented = subprocess.run(
        [str(BIN_DIR / "flower-supernode"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (w for w in words if w.startswith("--")):
        assert re.search(rf"^\s*{re.escape(flag)}\b", documented, flags=re.MULTILINE), flag
    assert "--insecure" not in words and _flag(words, "--isolation") == "process"
    node_config = parse_config_args([_flag(words, "--node-config")])
    for key in node_config:  # every key one the ClientApp reads (its docstring lists them)
        assert f"``{key}``" in (client_app.__doc__ or ""), key
    assert {"name", "data-path", "identity-key", "trusted-keys", "state-dir"} <= set(node_config)


def test_the_worker_unit_serves_the_supernode_unit() -> None:
    supernode = _supernode_flags(_exec_start("fedtune-supernode.service"))
    worker = _exec_start("fedtune-worker.service")
    assert Path(worker[0]).name == "fedtune" and worker[1] == "worker"
    args = cli.build_parser().parse_args(worker[1:])
    assert args.runtime_api_address == f"{_flag(supernode, '--host')}:{_flag(supernode, '--port')}"
    assert str(args.superexec_auth_secret_file) == _flag(supernode, "--superexec-auth-secret-file")


def test_every_fedtune_command_of_the_guide_parses() -> None:
    commands = [words for words in _guide_commands() if words[0] == "fedtune"]
    assert {words[1] for words in commands} >= {"code-digest", "identity", "audit"}
    for words in commands:
        cli.build_parser().parse_args(words[1:])  # exits (SystemExit) on an unknown flag or a missing argument


def test_the_guide_makes_the_keys_a_site_sends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its key commands, run as written but into a temporary directory: the node's authentication key pair
    (OpenSSH, what the operator registers) and its identity key (the public key printed to send)."""
    made = []
    for words in _guide_commands():
        words = [w.replace("/etc/fedtune", str(tmp_path)) for w in words]
        if words[:2] == ["python", "examples/deployment/make_certs.py"]:
            subprocess.run([sys.executable, str(DEPLOYMENT / "make_certs.py"), *words[2:]], check=True)
            made.append("node-key")
        elif words[:2] == ["fedtune", "identity"]:
            assert cli.main(words[1:]) == 0
            made.append("identity")
    assert made == ["node-key", "identity"]
    assert (tmp_path / "node-auth-key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (tmp_path / "node-auth-key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "identity.pem").stat().st_mode & 0o077 == 0
    printed = capsys.readouterr().out
    assert re.search(r"\b[0-9a-f]{64}\b", printed), printed  # the Ed25519 public key, hex
