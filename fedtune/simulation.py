"""Run an experiment as a Flower simulation on this machine (Ray backend, one virtual SuperNode per client)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from omegaconf import DictConfig

from fedtune.client_app import make_client_app
from fedtune.experiment import get_experiment
from fedtune.server_app import make_server_app

logger = logging.getLogger("fedtune")


def simulate(cfg: DictConfig, run_config: dict[str, Any]) -> None:
    """Run the experiment ``cfg`` with Flower's simulation engine.

    The apps are bound to ``run_config`` (the same keys ``flwr run`` would pass), so server and clients
    compose ``cfg`` through :func:`fedtune.config.load_experiment` exactly as in a deployment.
    """
    from flwr.simulation import run_simulation  # deferred: importing Ray is slow and needed only here

    federation = get_experiment(cfg).federation
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": min(federation.cpus_per_client, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR},
    }
    with warnings.catch_warnings():
        # run_simulation is the in-process entry point; `flwr run` needs a SuperLink and a FAB (see README).
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(run_config),
            client_app=make_client_app(run_config),
            num_supernodes=federation.num_clients,
            backend_config=backend_config,
        )
