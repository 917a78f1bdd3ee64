"""Flower ServerApp (Message API): Flower's side of the server, and nothing else.

The round loop is fedtune/engine.py; it reaches the nodes through the Grid channel (fedtune/grid_channel.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid
from omegaconf import DictConfig

from fedtune import config, engine
from fedtune.adapters import AdapterState
from fedtune.attacks.collusion import ColludingChannel, CollusionAttack
from fedtune.channel import Channel, RoundFailedError
from fedtune.experiment import get_experiment
from fedtune.flower_waits import retry_object_pulls_sooner
from fedtune.grid_channel import GridChannel

logger = logging.getLogger("fedtune")

__all__ = ["RoundFailedError", "make_server_app", "run_federation"]


def make_server_app(bound_run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the ServerApp; ``bound_run_config`` stands in for Flower's run_config (in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = bound_run_config if bound_run_config is not None else context.run_config
        if not logger.handlers:  # under `flwr run` nothing configured logging; Flower streams our stdout
            logger.addHandler(logging.StreamHandler(sys.stdout))
            logger.setLevel(logging.INFO)
        # A deployed ServerApp pulls replies whose parts may still be on their way (unused in simulation)
        retry_object_pulls_sooner(http_grid, "pull_objects")
        run_federation(grid, config.load_experiment(run_config), simulated=bound_run_config is not None)

    return app


def run_federation(grid: Grid, cfg: DictConfig, simulated: bool = False) -> AdapterState:
    """Run (or resume) the experiment ``cfg`` over the nodes of ``grid``; returns the final adapter.

    ``simulated``: fedtune's own simulation (its nodes are simulated partitions), not a deployment; only a
    simulation may carry an attack (fedtune/attacks/), and colluding attackers are played by the channel.
    False by default: whoever does not say otherwise is refused attacks.
    """
    experiment = get_experiment(cfg)
    attack = experiment.attack
    experiment.check_attack(simulated)
    channel: Channel = GridChannel(grid, experiment)
    if isinstance(attack, CollusionAttack) and attack.enabled:
        channel = ColludingChannel(channel, attack)
    return engine.run(channel, cfg)


app = make_server_app()
