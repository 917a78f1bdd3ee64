"""What does a real deployment cost per round, compared to the same experiment simulated in one process, and
how much of it does `fedtune worker` take away?

The same small experiment (the demo's MiniLM on ICD-10 chapters, 2 hospitals, a few short rounds), plaintext
and ``secure=masking``, four ways:
  - in-process: the real ServerApp loop over in-process Flower nodes (tests/nodes.py), one Python process;
  - subprocess: a real SuperLink and two SuperNodes on loopback, `flwr run` of the repository, Flower's
    default isolation (a fresh flwr-clientapp process for every message to a node);
  - worker: the same, with the SuperNodes in process isolation, each served by one `fedtune worker`;
  - worker+supernode: the same again, with the SuperNodes started by `fedtune supernode` (Flower's SuperNode
    with its idle poll capped at 0.1 s instead of 3 s).
Per run: the server's round times (metrics.jsonl ``round_seconds``; the first round also pays the nodes'
first model build, so the steady round is the median of the others), the messages each node handled (the
SuperNode's log) and seconds per message. Where the subprocess mode's time goes is estimated from what one
flwr-clientapp pays before it can answer: a fresh interpreter importing fedtune's ClientApp (torch, PEFT,
transformers, Flower) and building the base model, both timed here in fresh processes. Each row also gives
the wait on the SuperNodes' polls: a SuperNode that finds no message waiting sleeps (3 s in flwr 1.41) before
it asks again, and a node that has just replied finds nothing until every node's reply to that step is in, so
a round of ``m`` messages per node waits up to about ``m`` times that sleep
(``supernode_idle_poll_seconds_per_round_bound``).

    python benchmarks/deployment_tax.py                         # about 10 minutes on 2 cores
    python benchmarks/deployment_tax.py --rounds 2 --secure none --out /tmp/tax.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the deployment harness and nodes

from fedtune import supernode  # noqa: E402
from fedtune.run_dir import RunDir  # noqa: E402
from tests import deployment  # noqa: E402
from tests.nodes import federate  # noqa: E402

MODES = ("in-process", "subprocess", "worker", "worker+supernode")
# How each deployed mode starts its SuperNodes, and how long such a SuperNode sleeps when it finds no message
# waiting before it asks again: Flower's own 3 s (flwr 1.41, supernode/start_client_internal.py; no flag
# changes it), or `fedtune supernode`'s shorter wait. Each protocol step after the first in a round finds the
# node idle, since the server sends the next step only once every reply of the step before is in.
SUPERNODES = {
    "subprocess": (("flower-supernode",), 3.0),
    "worker": (("flower-supernode",), 3.0),
    "worker+supernode": (("fedtune", "supernode", "--"), supernode.DEFAULT_IDLE_POLL),
}


def overrides(rounds: int, secure: str, run_dir: Path, trusted_keys: Path) -> list[str]:
    """The experiment: the demo's model and data, 2 hospitals, short rounds."""
    return [
        "federation.num_clients=2",
        f"federation.num_rounds={rounds}",
        "federation.round_timeout=600",
        "train.local_steps=5",
        "train.batch_size=8",
        "data.loader.max_examples=1000",
        "data.test_size=100",
        "train.eval_max_examples=100",
        f"secure={secure}",
        f"federation.trusted_keys={trusted_keys}",
        f"run_dir={run_dir}",
    ]


def round_times(run_dir: Path) -> list[float]:
    """The server's seconds per round, in round order."""
    lines = RunDir(run_dir).read_metrics()
    return [m["value"] for m in sorted(lines, key=lambda m: m["round"]) if m["metric"] == "round_seconds"]


def run_in_process(root: Path, rounds: int, secure: str) -> dict:
    """The experiment over in-process nodes (one Python process, no Flower transport)."""
    started = time.perf_counter()
    run_dir = federate(
        root,
        overrides(rounds, secure, root / "run", root / "trusted_keys.json"),
        2,
        prefix="partition",
        node_config={"min-round-clients": 2},
    )
    return {"wall_seconds": time.perf_counter() - started, "round_seconds": round_times(run_dir), "messages": None}


def run_deployed(root: Path, rounds: int, secure: str, mode: str) -> dict:
    """The experiment on a real SuperLink and two SuperNodes, in Flower's subprocess isolation or served by
    `fedtune worker` (``mode``); every process is stopped by PID afterwards."""
    worker, (command, _) = mode != "subprocess", SUPERNODES[mode]
    flower = deployment.flower_processes(root)
    try:
        superlink = deployment.start_superlink(flower)
        trusted_keys = deployment.trusted_nodes(root, 2)
        extra: list[str] = []
        if worker:
            secret = root / "superexec.secret"
            secret.write_bytes(os.urandom(32))
            extra = ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        ports = deployment.start_supernodes(flower, root, superlink, trusted_keys, *extra, command=command)
        if worker:
            deployment.start_workers(flower, ports, secret)
        started = time.perf_counter()
        status = deployment.run_app(flower, root, overrides(rounds, secure, root / "run", trusted_keys), root / "run")
        wall = time.perf_counter() - started
        if status != "finished:completed":
            raise RuntimeError(f"the run ended {status}:\n{flower.log('flwr-run')[-4000:]}")
        messages = len(re.findall(r"Receiving: ", flower.log("supernode-0")))
        clientapps = sum("flwr-clientapp" in command for command in flower.seen.values())
        builds = (
            [len(re.findall(r"Built \S+ \+ LoRA", flower.log(f"worker-{i}"))) for i in range(2)] if worker else None
        )
    finally:
        survivors = flower.stop()
    if survivors:
        raise RuntimeError(f"processes still alive after stopping them by PID: {survivors}")
    return {
        "wall_seconds": wall,
        "round_seconds": round_times(root / "run"),
        "messages": messages,
        "flwr_clientapp_processes_seen": clientapps,
        "model_builds_per_worker": builds,
    }


def cold_start() -> dict[str, float]:
    """What a fresh flwr-clientapp pays before it can answer, timed in fresh interpreters: starting Python and
    importing fedtune's ClientApp, then building the demo's base model with LoRA."""
    script = (
        "import time; t = time.perf_counter(); import fedtune.client_app; imported = time.perf_counter() - t\n"
        "from fedtune import config; from fedtune.experiment import get_experiment\n"
        "experiment = get_experiment(config.compose(['federation.num_clients=2']))\n"
        "t = time.perf_counter(); experiment.model(); built = time.perf_counter() - t\n"
        "print(imported, built)"
    )
    samples = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        imported, built = (float(x) for x in out.split()[-2:])
        samples.append({"imports_seconds": imported, "model_build_seconds": built})
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def summarise(runs: dict[str, dict], cold: dict[str, float]) -> list[dict]:
    """Per (secure, mode): steady round, first round, seconds per message, and ratios to in-process."""
    rows = []
    for secure in sorted({key.split("/")[0] for key in runs}):
        reference = statistics.median(runs[f"{secure}/in-process"]["round_seconds"][1:])
        for mode in MODES:
            run = runs.get(f"{secure}/{mode}")
            if run is None:
                continue
            steady = statistics.median(run["round_seconds"][1:])
            messages = run["messages"]
            row = {
                "secure": secure,
                "mode": mode,
                "first_round_seconds": run["round_seconds"][0],
                "steady_round_seconds": steady,
                "vs_in_process": steady / reference,
                "messages_per_node": messages,
                "seconds_per_message": run["wall_seconds"] / messages if messages else None,
            }
            if messages:
                per_round = messages / len(run["round_seconds"])
                row["supernode_idle_poll_seconds_per_round_bound"] = per_round * SUPERNODES[mode][1]
                if mode == "subprocess":  # each message's fresh process pays the cold start
                    row["cold_start_seconds_per_round_estimate"] = per_round * sum(cold.values())
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| secure | mode | steady round (s) | vs in-process | first round (s) | messages per node | s per message "
        "| SuperNode poll wait per round, bound (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_message = f"{r['seconds_per_message']:.1f}" if r["seconds_per_message"] else ""
        poll = r.get("supernode_idle_poll_seconds_per_round_bound")
        lines.append(
            f"| {r['secure']} | {r['mode']} | {r['steady_round_seconds']:.1f} | {r['vs_in_process']:.2f}x | "
            f"{r['first_round_seconds']:.1f} | {r['messages_per_node'] or ''} | {per_message} | "
            f"{'' if poll is None else f'{poll:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--secure", default="none,masking", help="comma-separated: none, masking")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "deployment_tax.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    cold = cold_start()
    print(f"cold start of one flwr-clientapp: {cold}", flush=True)
    runs: dict[str, dict] = {}
    for secure in args.secure.split(","):
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as root:
                if mode == "in-process":
                    result = run_in_process(Path(root), args.rounds, secure)
                else:
                    result = run_deployed(Path(root), args.rounds, secure, mode)
            runs[f"{secure}/{mode}"] = result
            print(f"{secure}/{mode}: rounds {[round(s, 1) for s in result['round_seconds']]}", flush=True)
    rows = summarise(runs, cold)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "rounds": args.rounds,
        "overrides": overrides(args.rounds, "<secure>", Path("<run_dir>"), Path("<trusted_keys>")),
        "cold_start": cold,
        "summary": rows,
        "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "seconds": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
