"""``fedtune worker``: one long-lived process that runs a node's ClientApp tasks in-process, so that imports,
the tokenizer, the data and the frozen base model are loaded once per node per run instead of once per message.

In Flower 1.41 every message to a node is a task that a fresh ``flwr-clientapp`` process handles and exits
(upstream flwrlabs/flower#3670): it re-imports torch and PEFT and rebuilds the base model, twice a round.
With ``flower-supernode --isolation process`` the SuperNode instead waits for an executor to acquire each
task from its Runtime API; this worker is that executor. For each task it does what ``flwr-clientapp`` does
(pull the message, context and app bundle with the task's token, call the ClientApp, push the reply and the
task's status), in this process, reusing what earlier tasks of the run loaded.

Safety, since it keeps state that Flower's own isolation would drop:
- **Code.** It runs only a bundle whose code (fedtune/app_code.py: fedtune's Python files, strategies and
  configs) equals the code it has imported; another bundle's tasks are refused with the files that differ.
- **Runs.** One process serves one run: the first task of another run makes it replace itself (``exec``, same
  PID) with a fresh process, which reads the installed code anew and keeps nothing of the previous run.
- **The Runtime API.** Acquiring tasks needs the SuperNode's SuperExec secret when the SuperNode was started
  with one (``--superexec-auth-secret-file``, pass the same file here); each task is then served with its own
  single-task token. Keep the Runtime API on loopback (the SuperNode's default).

It relies on Flower internals (the Runtime API's messages and flwr-clientapp's helpers), hence the pinned
``flwr==1.41.0``; tests/test_deployment.py runs it end to end, so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedtune import app_code
from fedtune.flower_waits import retry_object_pulls_sooner

logger = logging.getLogger(__name__)

# A task acquired by the process this one replaced (exec keeps the environment, not memory), and its run.
_PENDING_TOKEN, _PENDING_RUN = "FEDTUNE_WORKER_PENDING_TOKEN", "FEDTUNE_WORKER_PENDING_RUN"
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the one call the SuperExec secret protects


@dataclass(frozen=True)
class WorkerOptions:
    """Where the SuperNode's Runtime API is and how to reach it.

    Args:
        runtime_api_address: ``host:port`` of the SuperNode's Runtime API (its ``--host``/``--port``).
        insecure: Plain HTTP (a Runtime API on loopback without ``--ssl-certfile``).
        root_certificates: CA certificate (PEM) of a Runtime API served over TLS.
        auth_secret_file: The SuperNode's ``--superexec-auth-secret-file``.
        poll_interval: Seconds between asks for a task while none is pending.
    """

    runtime_api_address: str
    insecure: bool = True
    root_certificates: Path | None = None
    auth_secret_file: Path | None = None
    poll_interval: float = 0.05

    def __post_init__(self) -> None:
        if self.insecure == (self.root_certificates is not None):
            raise ValueError("give either --insecure (plain HTTP on loopback) or --root-certificates, not both")
        if not 0 < self.poll_interval <= 60:
            raise ValueError(f"--poll-interval {self.poll_interval}: seconds in (0, 60]")

    def client(self, *interceptors: object) -> RuntimeHttpClient:
        """A Runtime API client with these interceptors."""
        certificates = self.root_certificates.read_bytes() if self.root_certificates else None
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.insecure,
            root_certificates=certificates,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )


class StaleCode(RuntimeError):
    """A run's app bundle ships other code than the worker has imported."""


def serve(options: WorkerOptions, argv: list[str]) -> None:
    """Acquire the node's ClientApp tasks and run them here until stopped (SIGTERM or SIGINT).

    Args:
        options: The Runtime API to serve.
        argv: The ``fedtune`` arguments this worker was started with (``worker ...``): a new run restarts it
            with them.
    """
    signal.signal(signal.SIGTERM, _exit_cleanly)  # so that a task in flight still reports its status
    # A task is offered before the SuperNode has all of its message: ask again for a missing part within 20 ms
    retry_object_pulls_sooner(run_clientapp, "pull_and_inflate_object_from_tree")
    from fedtune.client_app import app  # after the signal handler: this import is the slow part (torch)

    installed = app_code.installed_files()
    code = app_code.digest(installed)
    logger.info("worker: code %s, Runtime API %s, pid %d", code, options.runtime_api_address, os.getpid())
    secret = load_superexec_auth_secret(str(options.auth_secret_file)) if options.auth_secret_file else None
    acquire = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        acquire.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({_ACQUIRE})))
    runtime = options.client(*acquire)
    run_id: int | None = None
    pending = os.environ.pop(_PENDING_TOKEN, None)
    if pending is not None:
        run_id = int(os.environ.pop(_PENDING_RUN))
        _run_task(options, pending, app, installed, code)
    while True:
        response = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (response.HasField("task") and response.token):
            time.sleep(options.poll_interval)
            continue
        if run_id is not None and response.task.run_id != run_id:
            runtime.close()
            _replace_process(response.token, response.task.run_id, argv)
        run_id = response.task.run_id
        _run_task(options, response.token, app, installed, code)


def _run_task(options: WorkerOptions, token: str, app: object, installed: dict[str, bytes], code: str) -> None:
    """One task, as flwr-clientapp runs it: pull, check the bundle's code, call the ClientApp, push the reply
    (an error reply if anything failed) and the task's final status with the updated context."""
    client = options.client(
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "the worker stopped before the task ended"
    try:
        message, context, run, fab = pull_task_input(client)
        shipped = app_code.bundle_files(fab.content)
        if app_code.digest(shipped) != code:
            changed = app_code.differences(installed, shipped)
            raise StaleCode(
                f"run {run.run_id} ships other code than this worker runs ({len(changed)} files differ: "
                f"{', '.join(changed[:5])}). Install the run's fedtune version on this node and restart the worker, "
                "or start the SuperNode with --isolation subprocess to run each bundle's own code."
            )
        reply = app(message=message, context=context)  # type: ignore[operator]
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # reported to the SuperLink as a failed task, as flwr-clientapp does
        logger.exception("worker: the task failed")
        details = f"{type(error)}:<'{error}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()


def _replace_process(token: str, run_id: int, argv: list[str]) -> None:
    """Become a fresh worker (same PID, same arguments) that starts with the acquired task of run ``run_id``."""
    logger.info("worker: run %d begins; restarting with nothing of the previous run", run_id)
    for handler in logging.getLogger().handlers + logging.getLogger("fedtune").handlers:
        handler.flush()
    os.environ[_PENDING_TOKEN], os.environ[_PENDING_RUN] = token, str(run_id)
    os.execv(sys.executable, [sys.executable, "-m", "fedtune.cli", *argv])


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
