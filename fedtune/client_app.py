"""Flower ClientApp (Message API): decodes messages, calls fedtune.client, signs every reply.

Node config keys (``flower-supernode --node-config``): ``partition-id`` / ``num-partitions`` pick a
partition of the configured dataset (simulation, demos); ``data-path`` points at the node's own file
and ``name`` labels the node in logs and reports (deployments); ``identity-key`` is the node's Ed25519
key file (created on first use; default beside ``state-dir``); ``state-dir`` holds its privacy state and
its record of the rounds it uploaded in. Under ``secure=masking``: ``trusted-keys`` lists the peers'
identity keys this node accepts (required outside fedtune's in-process simulation, so that the server
cannot invent peers), and ``min-round-clients`` (default 3) is the smallest round it takes part in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import adapters, client, client_state, config, wire
from fedtune.client_settings import ClientSettings
from fedtune.data.partition import ClientData
from fedtune.experiment import Experiment, get_experiment
from fedtune.secure import identity, masking
from fedtune.secure.identity import Identity
from fedtune.secure.masking import MIN_ROUND_CLIENTS
from fedtune.secure.session import ClientRound, KeyBundle, ProtocolError, Session
from fedtune.secure.uploads import UploadRecord

logger = logging.getLogger("fedtune")

PRIVACY_STATE = "privacy"  # Context.state record holding the client's privacy accounting
SECAGG_STATE = "secagg"  # Context.state record holding this round's secure-aggregation secrets


def client_key(node_config: Mapping[str, Any]) -> str:
    """A stable name for this node: its ``name``, else its partition id (used for seeding and reports)."""
    if "name" in node_config:
        return str(node_config["name"])
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"
    raise ValueError(
        "This SuperNode has neither node-config 'name' nor 'partition-id'; start it with --node-config \"name='hospital-a' data-path='/data/notes.csv'\"."
    )


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
        experiment = get_experiment(config.load_experiment(run_config))
        expected = msg.content.config_records[wire.CONFIG].get(wire.EXPERIMENT_HASH)
        if expected is not None and expected != experiment.hash:
            raise RuntimeError(
                "This node composed a different experiment config than the server (fedtune or conf/ versions differ)."
            )
        return experiment

    def setup(msg: Message, context: Context) -> tuple[Experiment, ClientData]:
        """The experiment and this node's data (protocol steps that need no data use ``experiment_of``)."""
        experiment = experiment_of(msg, context)
        if "data-path" in context.node_config:
            return experiment, experiment.node_data(str(context.node_config["data-path"]))
        partitions = int(context.node_config.get("num-partitions", experiment.federation.num_clients))
        if partitions != experiment.federation.num_clients:
            raise ValueError(
                f"This node was started with num-partitions={partitions} but the experiment has "
                f"federation.num_clients={experiment.federation.num_clients}; start nodes with matching values."
            )
        return experiment, experiment.client_data(int(context.node_config["partition-id"]))

    def peer_identities(context: Context, received: ConfigRecord) -> dict[str, str]:
        """Peers' identity keys: the node's own trusted list; only fedtune's in-process simulation, where one
        operator runs every node, may take the server's (a deployed node would let the server invent peers)."""
        if "trusted-keys" in context.node_config:
            return identity.load_trusted_keys(str(context.node_config["trusted-keys"]))
        if bound_run_config is None:
            raise ProtocolError(
                "secure=masking needs this node's own list of its peers' identity keys, or the server could invent "
                "them: start the SuperNode with --node-config \"... trusted-keys='/etc/fedtune/trusted_keys.json'\"."
            )
        return json.loads(str(received[wire.IDENTITIES]))

    def upload_scope(experiment: Experiment) -> str:
        """What "the same experiment" means for the once-per-round upload rule (fedtune/secure/uploads.py): the
        config hash for a deployed node, whatever run dir the server names; one run in fedtune's in-process
        simulation, where one operator runs every node and reruns are routine."""
        return experiment.hash if bound_run_config is None else f"{experiment.hash}|{experiment.cfg.run_dir}"

    def reply(msg: Message, context: Context, content: RecordDict) -> Message:
        key = client_key(context.node_config)
        wire.sign(content, _signer(context.node_config), _session(msg), msg.metadata.message_type, key)
        return Message(content, reply_to=msg)

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        if experiment.secure.masked:
            peer_identities(context, ConfigRecord({wire.IDENTITIES: "{}"}))  # refuses to join without trusted keys
        # With masking the server learns only totals, so the node does not announce its data sizes.
        description = {} if experiment.secure.masked else client.describe(experiment, data)
        info = {wire.CLIENT_KEY: client_key(context.node_config), wire.DESCRIPTION: json.dumps(description)}
        return reply(msg, context, RecordDict({wire.CONFIG: ConfigRecord(info)}))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        global_adapter = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
        round_config = msg.content.config_records[wire.CONFIG]
        server_round = int(round_config[wire.SERVER_ROUND])
        key = client_key(context.node_config)
        num_sampled = int(round_config[wire.NUM_SAMPLED])  # sizes this client's share of the DP noise
        secagg, uploads = None, None
        if experiment.secure.masked:  # every check before training: fail fast
            secagg = _round_state(msg, context)
            uploads = UploadRecord(client_state.uploads_file(context.node_config, upload_scope(experiment), key))
            uploads.check(server_round)
            if num_sampled != secagg.round_size:
                raise ProtocolError(
                    f"The server says {num_sampled} clients take part in round {server_round}, but this node verified "
                    f"the keys of {secagg.round_size}; a larger count would shrink its DP noise. Refused."
                )
            survivors = json.loads(str(round_config[wire.SURVIVORS]))
            _require_group(survivors, context.node_config, "shared keys in this round")
        durable = client_state.state_file(context.node_config, f"{experiment.hash}|{experiment.cfg.run_dir}", key)
        settings = ClientSettings.from_json(str(round_config.get(wire.SETTINGS, ClientSettings().to_json())))
        privacy_state = client_state.load(context.state.config_records.get(PRIVACY_STATE, {}), durable)
        # The settings are part of the round's input: other settings on the same adapter give another update
        # with the same DP noise.
        round_input = f"{adapters.fingerprint(global_adapter)}|{settings.to_json()}"
        client_state.begin_round(privacy_state, server_round, round_input)
        update, metrics = client.train_round(
            experiment, data, global_adapter, server_round, key, privacy_state, num_sampled, settings
        )
        context.state.config_records[PRIVACY_STATE] = ConfigRecord(privacy_state)  # survives across rounds
        client_state.save(privacy_state, durable)  # and across a resumed run
        if secagg is None:
            return reply(
                msg, context, RecordDict({wire.ARRAYS: ArrayRecord(update), wire.METRICS: MetricRecord(metrics)})
            )
        weight = experiment.weighting.weight(metrics["num_examples"])
        code = experiment.secure.fixed_point(secagg.round_size, experiment.weighting.unit)
        sealed = {name: bytes(value) for name, value in msg.content.config_records[wire.SEALED].items()}
        committed = {k: str(v) for k, v in msg.content.config_records.get(wire.SHARE_COMMITMENTS, {}).items()}
        masked, excluded = masking.mask_update(secagg, sealed, committed, survivors, code.encode(update, weight))
        _save_round_state(context, secagg)
        uploads.record(server_round, secagg.session.run_nonce)  # on disk before the upload leaves
        visible = {k: v for k, v in metrics.items() if k != "num_examples"}  # the count travels masked
        content = RecordDict({wire.MASKED: ArrayRecord([masked]), wire.METRICS: MetricRecord(visible)})
        content.config_records[wire.CONFIG] = ConfigRecord({wire.EXCLUDED: json.dumps(excluded)})
        if excluded:
            logger.warning("Round %d: left out %s, whose shares for this node were bad", server_round, excluded)
        if round_config.get(wire.PREPARE_NEXT):  # pipelined: the next round's keys ride on this upload
            next_keys = _new_round_keys(context, _session(msg, next_round=True), still_open=_session(msg))
            content.config_records[wire.CONFIG][wire.BUNDLE] = next_keys[wire.BUNDLE]
        return reply(msg, context, content)

    def deal_shares(context: Context, experiment: Experiment, session: Session, received: ConfigRecord) -> RecordDict:
        """Step 2 for ``session``: the encrypted shares for each peer and the commitment, as a reply's records."""
        state = _round_state_for(context, session)
        bundles = [KeyBundle.from_json(text) for text in json.loads(str(received[wire.BUNDLES]))]
        _require_group([b.client for b in bundles], context.node_config, "sent round keys")
        identities = peer_identities(context, received)
        sealed, commitment, committed = masking.share_keys(state, bundles, identities, experiment.secure)
        _save_round_state(context, state)
        return RecordDict(
            {
                wire.SEALED: ConfigRecord(sealed),
                wire.SHARE_COMMITMENTS: ConfigRecord(committed),
                wire.CONFIG: ConfigRecord({wire.COMMITMENT: commitment}),
            }
        )

    @app.train("secagg_keys")
    def advertise_keys(msg: Message, context: Context) -> Message:
        return reply(msg, context, RecordDict({wire.CONFIG: _new_round_keys(context, _session(msg))}))

    @app.train("secagg_shares")
    def share_keys(msg: Message, context: Context) -> Message:
        experiment = experiment_of(msg, context)
        return reply(
            msg, context, deal_shares(context, experiment, _session(msg), msg.content.config_records[wire.CONFIG])
        )

    @app.train("secagg_unmask")
    def reveal_shares(msg: Message, context: Context) -> Message:
        state = _round_state(msg, context)
        received = msg.content.config_records[wire.CONFIG]
        _erase_round_state(context, state.session)  # one answer per round, then the secrets are gone
        survivors = json.loads(str(received[wire.SURVIVORS]))
        _require_group(survivors, context.node_config, "would be summed")
        revealed = masking.reveal_shares(state, survivors, json.loads(str(received[wire.DROPPED])))
        content = RecordDict({wire.CONFIG: ConfigRecord({wire.REVEALED: json.dumps(revealed)})})
        if wire.BUNDLES in received:  # pipelined: deal the next round's shares in the same reply
            experiment = experiment_of(msg, context)
            try:
                dealt = deal_shares(context, experiment, _session(msg, next_round=True), received)
            except (KeyError, ValueError) as error:  # ProtocolError included
                # This round's answer stands; the server sets the next round up in steps of their own.
                logger.warning("Round %s: not dealing the next round's shares: %s", state.session.server_round, error)
            else:
                for name in (wire.SEALED, wire.SHARE_COMMITMENTS):
                    content.config_records[name] = dealt.config_records[name]
                config_record = content.config_records[wire.CONFIG]
                config_record[wire.COMMITMENT] = dealt.config_records[wire.CONFIG][wire.COMMITMENT]
        return reply(msg, context, content)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        experiment, data = setup(msg, context)
        metrics = client.evaluate_round(experiment, data, msg.content.array_records[wire.ARRAYS].to_torch_state_dict())
        if experiment.secure.masked:
            del metrics["num_examples"]  # sizes stay private; the server averages clients equally
        return reply(msg, context, RecordDict({wire.METRICS: MetricRecord(metrics)}))

    return app


def _session(msg: Message, next_round: bool = False) -> Session:
    """The run and round ``msg`` belongs to, or the round after it (for pipelined steps)."""
    received = msg.content.config_records[wire.CONFIG]
    return Session(str(received[wire.RUN_NONCE]), int(received[wire.SERVER_ROUND]) + next_round)


def _new_round_keys(context: Context, session: Session, still_open: Session | None = None) -> ConfigRecord:
    """Step 1: keys for ``session`` kept in Context.state; returns the signed public halves to send. Asked
    again in the same round, the node sends the same keys: new ones would let the server draw ring orders."""
    signer = _signer(context.node_config)
    kept = context.state.config_records.get(SECAGG_STATE, ConfigRecord()).get(_state_key(session))
    if kept is not None:
        bundle = masking.signed_bundle(ClientRound.from_json(str(kept)), signer)
    else:
        state, bundle = masking.advertise_keys(session, client_key(context.node_config), signer)
        _save_round_state(context, state, still_open)
    return ConfigRecord({wire.BUNDLE: bundle.to_json()})


def _round_state(msg: Message, context: Context) -> ClientRound:
    """The secrets of the round ``msg`` belongs to."""
    return _round_state_for(context, _session(msg))


def _round_state_for(context: Context, session: Session) -> ClientRound:
    """The secrets kept for ``session``, refusing if there are none for this run and round."""
    record = context.state.config_records.get(SECAGG_STATE, ConfigRecord())
    text = record.get(_state_key(session))
    if text is None:
        raise ProtocolError(
            "No secure-aggregation keys for this run and round on this node; the server skipped a step."
        )
    return ClientRound.from_json(str(text))


def _save_round_state(context: Context, state: ClientRound, still_open: Session | None = None) -> None:
    """Keep ``state`` (and the secrets of round ``still_open``); erase those of every other round, such as one
    abandoned or left by this node midway."""
    record = context.state.config_records.get(SECAGG_STATE, ConfigRecord())
    kept = {key: record[key] for key in record if still_open is not None and key == _state_key(still_open)}
    kept[_state_key(state.session)] = state.to_json()
    context.state.config_records[SECAGG_STATE] = ConfigRecord(kept)


def _erase_round_state(context: Context, session: Session) -> None:
    record = context.state.config_records[SECAGG_STATE]
    del record[_state_key(session)]


def _state_key(session: Session) -> str:
    return f"{session.run_nonce}/{session.server_round}"


def _require_group(names: list[str], node_config: Mapping[str, Any], what: str) -> None:
    """Refuse a round of fewer clients than this node's own minimum (node config ``min-round-clients``)."""
    minimum = int(node_config.get("min-round-clients", MIN_ROUND_CLIENTS))
    if len(set(names)) < minimum:
        raise ProtocolError(
            f"{len(set(names))} clients {what}, fewer than this node's minimum of {minimum} (node config "
            "min-round-clients): in so small a round the server and a colluding client could isolate its update."
        )


app = make_client_app()
