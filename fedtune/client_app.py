"""Flower ClientApp (Message API): decodes messages and calls fedtune.client. All logic lives there.

Node config keys (``flower-supernode --node-config``): ``partition-id`` / ``num-partitions`` pick a
partition of the configured dataset (simulation, demos); ``data-path`` points at the node's own file
and ``name`` labels the node in logs and reports (deployments).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import adapters, client, client_state, config
from fedtune.data.partition import ClientData
from fedtune.experiment import Experiment, get_experiment

# Wire keys shared with server_app.py.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
EXPERIMENT_HASH, SERVER_ROUND, CLIENT_KEY, DESCRIPTION = "experiment-hash", "server-round", "client-key", "description"
NUM_SAMPLED = "num-sampled"
PRIVACY_STATE = "privacy"  # Context.state record holding the client's privacy accounting


def client_key(node_config: Mapping[str, Any]) -> str:
    """A stable name for this node: its ``name``, else its partition id (used for seeding and reports)."""
    if "name" in node_config:
        return str(node_config["name"])
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"
    raise ValueError(
        "This SuperNode has neither node-config 'name' nor 'partition-id'; start it with --node-config \"name='hospital-a' data-path='/data/notes.csv'\"."
    )


def make_client_app(bound_run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``bound_run_config`` stands in for Flower's run_config (in-process simulation)."""
    app = ClientApp()

    def setup(msg: Message, context: Context) -> tuple[Experiment, ClientData]:
        run_config = bound_run_config if bound_run_config is not None else context.run_config
        experiment = get_experiment(config.load_experiment(run_config))
        expected = msg.content.config_records[CONFIG].get(EXPERIMENT_HASH)
        if expected is not None and expected != experiment.hash:
            raise RuntimeError(
                "This node composed a different experiment config than the server (fedtune or conf/ versions differ)."
            )
        if "data-path" in context.node_config:
            return experiment, experiment.node_data(str(context.node_config["data-path"]))
        partitions = int(context.node_config.get("num-partitions", experiment.federation.num_clients))
        if partitions != experiment.federation.num_clients:
            raise ValueError(
                f"This node was started with num-partitions={partitions} but the experiment has "
                f"federation.num_clients={experiment.federation.num_clients}; start nodes with matching values."
            )
        return experiment, experiment.client_data(int(context.node_config["partition-id"]))

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        info = {CLIENT_KEY: client_key(context.node_config), DESCRIPTION: json.dumps(client.describe(experiment, data))}
        return Message(RecordDict({CONFIG: ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        global_adapter = msg.content.array_records[ARRAYS].to_torch_state_dict()
        server_round = int(msg.content.config_records[CONFIG][SERVER_ROUND])
        key = client_key(context.node_config)
        durable = client_state.state_file(context.node_config, f"{experiment.hash}|{experiment.cfg.run_dir}", key)
        privacy_state = client_state.load(context.state.config_records.get(PRIVACY_STATE, {}), durable)
        client_state.begin_round(privacy_state, server_round, adapters.fingerprint(global_adapter))
        update, metrics = client.train_round(
            experiment,
            data,
            global_adapter,
            server_round,
            key,
            privacy_state,
            int(msg.content.config_records[CONFIG][NUM_SAMPLED]),
        )
        context.state.config_records[PRIVACY_STATE] = ConfigRecord(privacy_state)  # survives across rounds
        client_state.save(privacy_state, durable)  # and across a resumed run
        return Message(RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        metrics = client.evaluate_round(experiment, data, msg.content.array_records[ARRAYS].to_torch_state_dict())
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()
