"""Flower ClientApp (Message API): decodes messages, calls fedtune.client (training, evaluation) and
fedtune/secure_client.py (secure aggregation's steps), and signs every reply.

Node config keys (``flower-supernode --node-config``): ``partition-id`` / ``num-partitions`` pick a
partition of the configured dataset (simulation, demos); ``data-path`` points at the node's own file,
``model-path`` at its own copy of the base model (the same files as the server's, wherever they lie: the
experiment hash holds their fingerprint), and ``name`` labels the node in logs and reports (deployments);
``identity-key`` is the node's Ed25519 key file (created on first use; default beside ``state-dir``);
``state-dir`` holds its privacy state and its record of the rounds it uploaded in. Under
``secure=masking``: ``trusted-keys`` lists the peers' identity keys this node accepts (required outside fedtune's in-process simulation, so that the server
cannot invent peers), ``min-round-clients`` (default 3) is the smallest round it takes part in, and
``colluders`` (default 1) how many of its peers may collude with the server: it reveals its shares only when
more than half of the peers it masked with, plus that many, signed the same unmask lists.
``experiment-hash`` (from ``fedtune run OVERRIDES --hash``) makes the node refuse every other experiment, so a
server cannot restart the same training under a cosmetically different config (README, threat model).
``device`` is where this node trains (auto, cpu, cuda or cuda:N; default: the run's ``train.device``), so a
site picks its own GPU or its CPU without changing the experiment. ``lora-rank`` is the LoRA rank this node
trains at (a node with less compute; at most the experiment's ``lora.r``; default:
``federation.client_ranks`` for a simulated partition, else ``lora.r``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import adapters, client, client_state, config, devices, wire
from fedtune.assets import BUILTIN_PREFIX
from fedtune.attacks.collusion import PARTITION
from fedtune.client_settings import ClientSettings
from fedtune.contribution import reports
from fedtune.data.partition import ClientData
from fedtune.evaluation import TOKENS
from fedtune.experiment import Experiment, get_experiment
from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.secure_client import SecureClient, session_of

logger = logging.getLogger("fedtune")

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


def _node_setting(context: Context, key: str) -> str | None:
    value = context.node_config.get(key)
    return None if value is None else str(value)


def _signer(node_config: Mapping[str, Any]) -> Identity:
    """This node's identity key (loaded once per process)."""
    return _load_identity(str(client_state.identity_file(node_config, client_key(node_config))))


@cache
def _load_identity(path: str) -> Identity:
    return identity.load_or_create(Path(path))


def make_client_app(bound_run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``bound_run_config`` stands in for Flower's run_config (in-process simulation)."""
    app = ClientApp()

    def experiment_of(msg: Message, context: Context) -> Experiment:
        """The experiment, refused if it is not the one the server runs."""
        run_config = bound_run_config if bound_run_config is not None else context.run_config
        model_path, device = (_node_setting(context, key) for key in ("model-path", "device"))
        experiment = get_experiment(config.load_experiment(run_config, model_path, device))
        name, pinned = client_key(context.node_config), context.node_config.get("experiment-hash")
        if device is not None:  # refused at connect rather than at its first training step
            try:
                devices.resolve(device, experiment.train_config.deterministic)
            except ValueError as error:
                message = f"Node {name} cannot train where its node config says (device={device}): {error}"
                raise ValueError(message) from error
        if pinned is not None and experiment.hash != str(pinned):
            raise RuntimeError(
                f"Node {name} takes part only in the experiment its node config pins (experiment-hash="
                f"{str(pinned)[:16]}...); the server's run is another ({experiment.hash[:16]}...). Refused."
            )
        received = msg.content.config_records[wire.CONFIG]
        expected = received.get(wire.EXPERIMENT_HASH)
        if expected is not None and expected != experiment.hash:
            theirs = received.get(wire.BASE_MODEL)
            if theirs is not None and theirs != experiment.base_model:
                if str(theirs).startswith(BUILTIN_PREFIX):
                    raise RuntimeError(
                        f"Node {name}: the server trains the built-in model {theirs}, and this node's node config "
                        f"names its own (model-path={experiment.cfg.model.path}): remove model-path from it."
                    )
                raise RuntimeError(
                    f"Node {name}: its base model (model.path={experiment.cfg.model.path}, "
                    f"{experiment.base_model[:23]}...) is not the server's ({str(theirs)[:23]}...): give this node "
                    "a copy of the same model files and name it in its node config, model-path='/path/to/copy'."
                )
            raise RuntimeError(
                f"Node {name} composed a different experiment config than the server (fedtune or conf/ versions "
                "differ; `fedtune code-digest` on both tells)."
            )
        return experiment

    def setup(msg: Message, context: Context) -> tuple[Experiment, ClientData]:
        """The experiment and this node's data (protocol steps that need no data use ``experiment_of``)."""
        experiment = experiment_of(msg, context)
        # a deployed node refuses to take part in an experiment that casts any node as an attacker
        experiment.check_attack(simulated=bound_run_config is not None)
        if "data-path" in context.node_config:
            return experiment, experiment.node_data(str(context.node_config["data-path"]))
        partitions = int(context.node_config.get("num-partitions", experiment.federation.num_clients))
        if partitions != experiment.federation.num_clients:
            raise ValueError(
                f"This node was started with num-partitions={partitions} but the experiment has "
                f"federation.num_clients={experiment.federation.num_clients}; start nodes with matching values."
            )
        return experiment, experiment.client_data(int(context.node_config["partition-id"]))

    def records_config(context: Context, experiment: Experiment) -> Mapping[str, Any]:
        """The node config with where this node keeps its records of the run (client_state.records_config)."""
        return client_state.records_config(context.node_config, experiment.cfg.run_dir, bound_run_config is not None)

    def secure(context: Context, experiment: Experiment) -> SecureClient:
        """This node's side of secure aggregation (fedtune/secure_client.py)."""
        name = client_key(context.node_config)
        return SecureClient(context, experiment, name, _signer(context.node_config), bound_run_config is not None)

    def reply(msg: Message, context: Context, content: RecordDict) -> Message:
        key = client_key(context.node_config)
        wire.sign(content, _signer(context.node_config), session_of(msg), msg.metadata.message_type, key)
        return Message(content, reply_to=msg)

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        if experiment.secure.masked:  # refuses to join without its own trusted keys
            secure(context, experiment).peer_identities(ConfigRecord({wire.IDENTITIES: "{}"}))
        # With masking the server learns only totals, so the node does not announce its data sizes.
        description = {} if experiment.secure.masked else client.describe(experiment, data)
        if experiment.attack.colludes and "partition-id" in context.node_config:  # who the colluders are
            description[PARTITION] = int(context.node_config["partition-id"])
        info = {wire.CLIENT_KEY: client_key(context.node_config), wire.DESCRIPTION: json.dumps(description)}
        return reply(msg, context, RecordDict({wire.CONFIG: ConfigRecord(info)}))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        global_adapter = wire.adapter_of(msg.content.array_records[wire.ARRAYS])
        round_config = msg.content.config_records[wire.CONFIG]
        server_round, key = int(round_config[wire.SERVER_ROUND]), client_key(context.node_config)
        num_sampled = int(round_config[wire.NUM_SAMPLED])  # sizes this client's share of the DP noise
        masked = secure(context, experiment) if experiment.secure.masked else None
        secagg = masked.before_training(msg) if masked is not None else None  # every check before training
        settings = _settings(round_config)
        scope = client_state.record_scope(experiment.hash, experiment.cfg.run_dir, bound_run_config is not None)
        durable = client_state.state_file(records_config(context, experiment), scope, key)
        privacy_state = client_state.load(context.state.config_records.get(PRIVACY_STATE, {}), durable)
        rank = _rank(context, experiment)
        # The settings and rank are part of the round's input: other settings on the same adapter give
        # another update with the same DP noise.
        round_input = f"{adapters.fingerprint(global_adapter)}|{settings.to_json()}|rank={rank}"
        client_state.begin_round(privacy_state, server_round, round_input)
        kept = client_state.personal_file(records_config(context, experiment), run_key(experiment), key)
        personal = client_state.load_personal(kept, server_round) if settings.local else None
        partition = context.node_config.get("partition-id")
        attack = experiment.attack if experiment.attack.active(partition, server_round) else None
        update, metrics = client.train_round(
            experiment,
            data,
            global_adapter,
            server_round,
            key,
            privacy_state,
            num_sampled,
            settings,
            personal,
            rank,
            attack,
        )
        context.state.config_records[PRIVACY_STATE] = ConfigRecord(privacy_state)  # survives across rounds
        client_state.save(privacy_state, durable)  # and across a resumed run
        if personal is not None:
            client_state.save_personal(kept, server_round, personal)
        if masked is None or secagg is None:
            content = RecordDict({wire.ARRAYS: wire.adapter_record(update), wire.METRICS: MetricRecord(metrics)})
        else:
            content = masked.upload(msg, secagg, update, metrics)
        if experiment.contribution.enabled:  # what this node states it brought, signed on its own for the ledger
            report = reports.for_round(experiment, int(metrics["num_examples"]))
            text, signature = reports.sign(report, _signer(context.node_config), session_of(msg), key)
            content.config_records[reports.RECORD] = ConfigRecord({reports.REPORT: text, reports.SIGNATURE: signature})
        return reply(msg, context, content)

    @app.train("secagg_keys")
    def advertise_keys(msg: Message, context: Context) -> Message:
        return reply(msg, context, secure(context, experiment_of(msg, context)).keys(msg))

    @app.train("secagg_ring")
    def reveal_ring(msg: Message, context: Context) -> Message:
        return reply(msg, context, secure(context, experiment_of(msg, context)).ring(msg))

    @app.train("secagg_shares")
    def share_keys(msg: Message, context: Context) -> Message:
        return reply(msg, context, secure(context, experiment_of(msg, context)).shares(msg))

    @app.train("secagg_agree")
    def agree_lists(msg: Message, context: Context) -> Message:
        return reply(msg, context, secure(context, experiment_of(msg, context)).agree(msg))

    @app.train("secagg_unmask")
    def reveal_shares(msg: Message, context: Context) -> Message:
        return reply(msg, context, secure(context, experiment_of(msg, context)).reveal(msg))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        settings = _settings(msg.content.config_records[wire.CONFIG])
        personal = None
        if settings.local:  # evaluate with what this client keeps for itself, as trained up to this round
            records = records_config(context, experiment)
            kept = client_state.personal_file(records, run_key(experiment), client_key(context.node_config))
            round_number = int(msg.content.config_records[wire.CONFIG][wire.SERVER_ROUND])
            personal = settings.kept(client_state.load_personal(kept, round_number + 1))
        global_adapter = wire.adapter_of(msg.content.array_records[wire.ARRAYS])
        metrics = client.evaluate_round(experiment, data, global_adapter, personal, _rank(context, experiment))
        if experiment.secure.masked:  # sizes stay private; the server averages clients equally
            for size in ("num_examples", TOKENS):
                metrics.pop(size, None)
        return reply(msg, context, RecordDict({wire.METRICS: MetricRecord(metrics)}))

    return app


def run_key(experiment: Experiment) -> str:
    """What this node's durable state of a run is keyed on: the experiment and the run directory."""
    return client_state.record_scope(experiment.hash, experiment.cfg.run_dir, simulated=True)


def _rank(context: Context, experiment: Experiment) -> int:
    """The LoRA rank this node trains at: node config ``lora-rank``, else its simulated partition's."""
    if "lora-rank" in context.node_config:
        return experiment.lora_rank(int(context.node_config["lora-rank"]))
    if "partition-id" in context.node_config:
        return experiment.simulated_rank(int(context.node_config["partition-id"]))
    return experiment.lora_rank()


def _settings(received: ConfigRecord) -> ClientSettings:
    """The strategy's settings for this client in a train or evaluate message (defaults when absent)."""
    return ClientSettings.from_json(str(received.get(wire.SETTINGS, ClientSettings().to_json())))


app = make_client_app()
