"""Run an experiment as a Flower simulation on this machine (Ray backend, one virtual SuperNode per client)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from omegaconf import DictConfig

from fedtune.client_app import make_client_app
from fedtune.experiment import Experiment, get_experiment
from fedtune.server_app import make_server_app

logger = logging.getLogger("fedtune")


def simulate(cfg: DictConfig, run_config: dict[str, Any]) -> None:
    """Run the experiment ``cfg`` with Flower's simulation engine.

    The apps are bound to ``run_config`` (the same keys ``flwr run`` would pass), so server and clients
    compose ``cfg`` through :func:`fedtune.config.load_experiment` exactly as in a deployment.
    """
    from flwr.simulation import run_simulation  # deferred: importing Ray is slow and needed only here

    experiment = get_experiment(cfg)
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": client_resources(experiment, cpus),
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR},
    }
    with warnings.catch_warnings():
        # run_simulation is the in-process entry point; `flwr run` needs a SuperLink and a FAB (see README).
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(run_config),
            client_app=make_client_app(run_config),
            num_supernodes=experiment.federation.num_clients,
            backend_config=backend_config,
        )


def client_resources(experiment: Experiment, cpus: int) -> dict[str, float]:
    """What Ray reserves for each simulated client; refuses a GPU setting this machine cannot honour.

    Ray hides the GPUs from a client that reserves none, so ``train.device=cuda`` needs
    ``federation.gpus_per_client > 0``; reserving GPUs on a machine without one would leave every client
    waiting for a GPU that never comes.

    Raises:
        ValueError: Naming the setting to change.
    """
    federation, device = experiment.federation, experiment.train_config.device
    gpus = federation.gpus_per_client
    if gpus > 0 and not torch.cuda.is_available():
        raise ValueError(
            f"federation.gpus_per_client={gpus} but this machine has no usable CUDA GPU; set federation.gpus_per_client=0."
        )
    if gpus == 0 and device.startswith("cuda"):
        raise ValueError(
            f"train.device={device} in a simulation needs federation.gpus_per_client > 0 (the share of a GPU each "
            "simulated client reserves, e.g. 0.25 for four clients at a time on one GPU)."
        )
    if gpus == 0 and device == "auto" and torch.cuda.is_available():
        logger.info("federation.gpus_per_client=0: simulated clients train on the CPU; set it > 0 to use the GPU.")
    return {"num_cpus": min(federation.cpus_per_client, cpus), "num_gpus": gpus}
