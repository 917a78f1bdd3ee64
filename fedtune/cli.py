"""The ``fedtune`` command.

    fedtune [--debug] run [OVERRIDE ...] [--multirun] [--cfg] [--hash] [--partitions]
    fedtune keygen KEY_FILE
    fedtune encrypt PATH (--key-file KEY_FILE | --key-env VAR) [--remove-plaintext]
    fedtune decrypt PATH (--key-file KEY_FILE | --key-env VAR) [--remove-encrypted]
    fedtune compare RUN_DIR|SWEEP_DIR ... [--out DIR]
    fedtune evaluate RUN_DIR [data=... data.loader.path=...] [model.path=...] [--json FILE]
    fedtune export RUN_DIR --merged OUT [--model-path DIR]
    fedtune predict RUN_DIR TEXT ... [--model-path DIR] [--max-new-tokens N]
    fedtune audit RUN_DIR [--head HASH] [--server-key HEX]
    fedtune contributions RUN_DIR [--out DIR]
    fedtune identity NAME KEY_FILE [--trusted TRUSTED_KEYS_JSON]
    fedtune worker [--runtime-api-address HOST:PORT] [--superexec-auth-secret-file FILE] [--root-certificates PEM]
    fedtune supernode [--idle-poll SECONDS] -- FLOWER_SUPERNODE_FLAGS ...
    fedtune code-digest

``run`` composes conf/ with Hydra overrides (``model=smollm2 federation.num_clients=8``), validates
the result before any work starts, and runs the federation as a Flower simulation. ``--multirun``
expands sweeps (``lora.r=4,8 seed=0,1``) into one run per combination; ``--cfg`` prints the resolved
config, ``--hash`` the experiment hash a node can pin (node config ``experiment-hash``), and ``--partitions``
how the data is split into clients, without running anything.

``compare`` prints the final central metrics of several runs (or a sweep's folder) side by side, with the
config keys that differ, seeds folded into mean and spread (fedtune/compare.py). ``evaluate`` runs a run's
final adapter over a site's own held-out file on its own machine (default: the run's central test set) and
prints the task's metrics (fedtune/evaluate_run.py). ``export --merged`` writes the final adapter merged into
its base model as a plain Hugging Face model directory (fedtune/export.py); ``predict`` runs the final adapter
on texts given on the command line (fedtune/predict.py). All three load the adapter the same way, and refuse
it on other base weights (fedtune/finished_run.py).

``keygen`` writes a new AES-256 key file (mode 0600); ``encrypt`` and ``decrypt`` turn a file or every
file of a directory (``<run_dir>/adapter``, ``<run_dir>/checkpoints``) into ``.enc`` files and back
(see :mod:`fedtune.secure.at_rest`). ``audit`` checks a run's hash-chained ledger (fedtune/ledger.py)
and names the first broken entry; ``contributions`` shows who contributed what to a run that accounted it
(``contribution=shapley``: fedtune/contribution/), from its ledger; ``identity`` creates a node's Ed25519 key and lists it in the trusted
keys file the server reads (``federation.trusted_keys``). ``worker`` serves a SuperNode started with
``--isolation process``, keeping the model loaded between messages (fedtune/worker.py); ``supernode`` runs
Flower's SuperNode with a shorter wait between its polls of the SuperLink (fedtune/supernode.py);
``code-digest`` prints the digest of the installed code that a worker compares each run's app bundle with.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fedtune import config, supernode
from fedtune.errors import DataError
from fedtune.secure import at_rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedtune`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    handlers = {
        "run": _run_command,
        "keygen": _keygen,
        "encrypt": _encrypt,
        "decrypt": _decrypt,
        "compare": _compare,
        "evaluate": _evaluate,
        "export": _export,
        "predict": _predict,
        "audit": _audit,
        "contributions": _contributions,
        "identity": _identity,
        "worker": _worker,
        "supernode": _supernode,
        "code-digest": _code_digest,
    }
    try:
        return handlers[args.command](args)
    except (config.ConfigError, DataError) as error:
        if args.debug:
            raise
        kind = "data" if isinstance(error, DataError) else "config"
        print(f"fedtune: {kind} error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``fedtune`` command's arguments (also what tests check documented commands against)."""
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a config or data error")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment as a Flower simulation")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=smollm2 federation.num_rounds=3")
    run.add_argument("--multirun", "-m", action="store_true", help="expand sweeps (a=1,2) into several runs")
    run.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    run.add_argument(
        "--hash", action="store_true", help="print the experiment hash (what a node pins: experiment-hash) and exit"
    )
    run.add_argument("--partitions", action="store_true", help="print how the data is split into clients and exit")
    keygen = commands.add_parser("keygen", help="write a new key file for encrypt/decrypt (mode 0600)")
    keygen.add_argument("key_file", type=Path, help="where to write the key; an existing file is never overwritten")
    for name, remove, what in (
        ("encrypt", "--remove-plaintext", "x to x.enc"),
        ("decrypt", "--remove-encrypted", "x.enc to x"),
    ):
        command = commands.add_parser(name, help=f"{name} a file ({what}) or every file of a directory")
        command.add_argument("path", type=Path, help="a file or a directory, e.g. runs/<date_time>/adapter")
        key = command.add_mutually_exclusive_group(required=True)
        key.add_argument("--key-file", type=Path, help="file written by `fedtune keygen`")
        key.add_argument("--key-env", metavar="VAR", help="environment variable holding the key (hex)")
        command.add_argument(
            remove, dest="remove_source", action="store_true", help="delete each source file once written"
        )
    compare = commands.add_parser("compare", help="final metrics of several runs side by side, seeds folded")
    compare.add_argument("runs", nargs="+", type=Path, help="run directories, or folders of them (multirun/...)")
    compare.add_argument("--out", type=Path, help="also write compare.csv, compare.md and compare.png here")
    evaluate = commands.add_parser("evaluate", help="a run's final adapter on your own held-out data")
    evaluate.add_argument("run_dir", type=Path, help="the run directory")
    evaluate.add_argument(
        "overrides", nargs="*", help="the data to evaluate (data=local data.loader.path=...) and model.path=..."
    )
    evaluate.add_argument("--json", type=Path, help="also write the result to this JSON file")
    export = commands.add_parser("export", help="a run's final adapter merged into its base model (plain Hugging Face)")
    export.add_argument("run_dir", type=Path, help="the run directory")
    export.add_argument("--merged", type=Path, required=True, metavar="OUT", help="the new model directory to write")
    predict = commands.add_parser("predict", help="a run's final adapter on texts given here")
    predict.add_argument("run_dir", type=Path, help="the run directory")
    predict.add_argument(
        "texts",
        nargs="+",
        metavar="TEXT",
        help="a text to classify, a prompt for a causal LM, or the start of a document to continue (plain text)",
    )
    predict.add_argument("--max-new-tokens", type=int, default=64, help="causal LM: the longest answer, in tokens")
    for command in (export, predict):
        command.add_argument("--model-path", help="this machine's copy of the run's base model (default: the run's)")
    audit = commands.add_parser("audit", help="verify a run's ledger against its metrics, checkpoints and adapter")
    audit.add_argument("run_dir", type=Path, help="the run directory")
    audit.add_argument("--head", help="the ledger head hash published at the end of the run")
    audit.add_argument("--server-key", help="the server identity public key (hex) you trust to have signed it")
    contributions = commands.add_parser("contributions", help="who contributed what to a run, from its ledger")
    contributions.add_argument("run_dir", type=Path, help="the run directory (run with contribution=shapley)")
    contributions.add_argument("--out", type=Path, help="also write contributions.csv, .md and .png here")
    node = commands.add_parser("identity", help="create a node's identity key and list it as trusted")
    node.add_argument("name", help="the node's name (its node-config 'name')")
    node.add_argument("key_file", type=Path, help="the node's private key (created with mode 0600 if absent)")
    node.add_argument("--trusted", type=Path, help="add the public key to this trusted-keys file (the server's)")
    worker = commands.add_parser("worker", help="run a SuperNode's ClientApp tasks in one long-lived process")
    worker.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's --host:--port")
    worker.add_argument(
        "--root-certificates", type=Path, help="CA certificate of a Runtime API served over TLS (else plain HTTP)"
    )
    worker.add_argument("--superexec-auth-secret-file", type=Path, help="the SuperNode's SuperExec secret file")
    worker.add_argument("--poll-interval", type=float, default=0.05, help="seconds between asks when idle")
    flower_node = commands.add_parser("supernode", help="Flower's SuperNode, polling the SuperLink more often")
    flower_node.add_argument(
        "--idle-poll",
        type=float,
        default=supernode.DEFAULT_IDLE_POLL,
        help="seconds between asks for a message (Flower's own: 3 s)",
    )
    flower_node.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's own flags")
    commands.add_parser("code-digest", help="print the digest of the installed code (fedtune, strategies, conf)")
    return parser


def _run_command(args: argparse.Namespace) -> int:
    if args.partitions:
        return _show_partitions(args.overrides)
    if args.hash:
        print(config.experiment_hash(config.compose(args.overrides)))
        return 0
    return _run(args.overrides, multirun=args.multirun, show_config=args.cfg)


def _worker(args: argparse.Namespace) -> int:
    from fedtune.worker import WorkerOptions, serve  # imports Flower's runtime internals

    try:
        options = WorkerOptions(
            runtime_api_address=args.runtime_api_address,
            insecure=args.root_certificates is None,
            root_certificates=args.root_certificates,
            auth_secret_file=args.superexec_auth_secret_file,
            poll_interval=args.poll_interval,
        )
    except ValueError as error:
        print(f"fedtune worker: {error}", file=sys.stderr)
        return 2
    serve(options, args.argv)
    return 0


def _supernode(args: argparse.Namespace) -> int:
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    try:
        supernode.prepare(args.idle_poll)
    except (ValueError, RuntimeError) as error:
        print(f"fedtune supernode: {error}", file=sys.stderr)
        return 2
    supernode.start(flower_args)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune import compare  # deferred: matplotlib

    runs = compare.find_runs(args.runs)
    keys, groups = compare.compare(runs)
    rows = compare.table(keys, groups)
    print(compare.markdown(rows), end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.csv").write_text(compare.to_csv(rows))
        (args.out / "compare.md").write_text(compare.markdown(rows))
        compare.plot(runs, keys, args.out / "compare.png")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fedtune.evaluate_run import evaluate_run, format_evaluation  # deferred: loads the model

    result = evaluate_run(args.run_dir, args.overrides)
    print(format_evaluation(args.run_dir, result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedtune.export import export_merged  # deferred: loads the model
    from fedtune.finished_run import load_run

    run = load_run(args.run_dir, args.model_path, setting="--model-path")
    loader = export_merged(run, args.merged)
    print(
        f"{args.merged}: the final adapter of {args.run_dir} (round {run.checkpoint.round}) merged into its base model"
    )
    print(f"  load it with {loader}: its README.md, the model card, shows how")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedtune.finished_run import load_run  # deferred: loads the model
    from fedtune.predict import predict

    if args.max_new_tokens < 1:
        raise config.ConfigError(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
    run = load_run(args.run_dir, args.model_path, setting="--model-path")
    for prediction in predict(run, args.texts, args.max_new_tokens):
        print(prediction.lines())
    return 0


def _code_digest(args: argparse.Namespace) -> int:
    from fedtune import app_code

    print(app_code.digest(app_code.installed_files()))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    try:
        at_rest.generate_key(args.key_file)
    except (FileExistsError, FileNotFoundError) as error:
        print(f"fedtune: {error}", file=sys.stderr)
        return 1
    print(f"{args.key_file} (mode 0600; keep it apart from the encrypted files and their backups)")
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    return _transform(at_rest.encrypt_path, args)


def _decrypt(args: argparse.Namespace) -> int:
    return _transform(at_rest.decrypt_path, args)


def _transform(function: Callable[..., list[Path]], args: argparse.Namespace) -> int:
    """Run encrypt_path or decrypt_path; errors become one line on stderr and exit code 1."""
    try:
        key = at_rest.load_key(key_file=args.key_file, key_env=args.key_env)
        written = function(args.path, key, remove_source=args.remove_source)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # DecryptionError is a ValueError
        print(f"fedtune: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedtune.ledger import audit

    problems = audit(args.run_dir, head=args.head, server_key=args.server_key)
    for problem in problems:
        print(f"fedtune audit: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.run_dir}: ledger, metrics, checkpoints and adapter are consistent")
    return 1 if problems else 0


def _contributions(args: argparse.Namespace) -> int:
    from fedtune.contribution import leaderboard  # deferred: matplotlib for --out

    try:
        board = leaderboard.from_run(args.run_dir)
    except ValueError as error:
        print(f"fedtune contributions: {error}", file=sys.stderr)
        return 2
    print(board.text(), end="")
    if args.out is not None:
        board.write(args.out)
        print(f"written to {args.out} (contributions.csv, contributions.md, contributions.png)")
    return 0


def _identity(args: argparse.Namespace) -> int:
    from fedtune.secure import identity

    node = identity.load_or_create(args.key_file)
    print(f"{args.name}: {node.public_hex}")
    if args.trusted is not None:
        identity.add_trusted_key(args.trusted, args.name, node.public_hex)
        print(f"listed in {args.trusted}")
    return 0


def _run(overrides: list[str], multirun: bool, show_config: bool) -> int:
    jobs = config.expand_sweeps(overrides) if multirun else [overrides]
    if len(jobs) > 1 or multirun:
        sweep_dir = Path("multirun") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        jobs = [[*job, f"run_dir={sweep_dir / str(index)}"] for index, job in enumerate(jobs)]
    configs = [config.compose(job) for job in jobs]  # validate every job before the first one starts
    if show_config:
        for cfg in configs:
            print(config.to_yaml(cfg))
        return 0
    from fedtune.experiment import get_experiment  # deferred: heavy imports only when something runs
    from fedtune.run_dir import RunDir
    from fedtune.simulation import client_resources, simulate

    for cfg in configs:
        try:
            RunDir(cfg.run_dir).check(resume=bool(cfg.resume))
            config.instantiate(cfg.tracker).check()
            experiment = get_experiment(cfg)
            client_resources(experiment, os.cpu_count() or 1)
            experiment.preflight()
        except DataError:
            raise
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            raise config.ConfigError(str(error)) from error
    for job, cfg in zip(jobs, configs, strict=True):
        logging.getLogger("fedtune").info("Run directory: %s", cfg.run_dir)
        simulate(cfg, config.to_run_config(job, str(cfg.run_dir)))
    return 0


def _show_partitions(overrides: list[str]) -> int:
    from fedtune.data.partition import format_summary, partition_summary
    from fedtune.experiment import get_experiment

    experiment = get_experiment(config.compose(overrides))
    summary = partition_summary(
        experiment.pool,
        experiment.partitioner,
        experiment.corpus.label_names,
        experiment.data_spec.val_fraction,
        experiment.cfg.seed,
    )
    print(format_summary(summary))
    return 0


class _ToStdout(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is at the time (it may be replaced, as tests' capture does)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _: Any) -> None:
        """The stream is always the current stdout."""


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    fedtune_logger = logging.getLogger("fedtune")
    fedtune_logger.setLevel(logging.INFO)
    fedtune_logger.propagate = False
    if any(isinstance(h, _ToStdout) for h in fedtune_logger.handlers):
        return  # main() called again in one process (sweeps from Python, tests): one handler, one line per message
    handler = _ToStdout()
    handler.setFormatter(logging.Formatter("%(asctime)s fedtune: %(message)s", datefmt="%H:%M:%S"))
    fedtune_logger.addHandler(handler)
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler, at its own level


if __name__ == "__main__":
    sys.exit(main())
