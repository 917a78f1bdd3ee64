"""The round engine's channel over Flower's Grid: requests become signed messages, replies become contributions.

Plaintext rounds send each client the global adapter and its settings and read each update; masked
rounds go through the secure-aggregation protocol (fedtune/secure_server.py) and yield only the sum.
Either way the engine gets a :class:`fedtune.channel.Collected`.
"""

from __future__ import annotations

import logging
import math

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune import adapters
from fedtune.adapters import AdapterState
from fedtune.aggregation import weighted_sum
from fedtune.channel import Client, Collected, Contribution, TrainRequest
from fedtune.client_settings import ClientSettings
from fedtune.contribution import reports
from fedtune.experiment import Experiment
from fedtune.run_dir import RunDir
from fedtune.secure_server import SecureRounds
from fedtune.transport import Reply, Transport, connect
from fedtune.wire import ARRAYS, CONFIG, METRICS, NUM_SAMPLED, SETTINGS, adapter_of, adapter_record, payload_bytes

logger = logging.getLogger("fedtune")


class GridChannel:
    """Reaches the nodes of a Flower Grid, in the clear or masked as ``experiment.secure`` says.

    Args:
        grid: Flower's Grid of the run.
        experiment: The experiment (its hash and timeouts go into every message).
    """

    def __init__(self, grid: Grid, experiment: Experiment) -> None:
        self.transport = Transport(grid, experiment)
        self.run_nonce = self.transport.run_nonce
        self.secure_rounds = SecureRounds(self.transport) if experiment.secure.masked else None

    def connect(self, run_dir: RunDir, resume: bool) -> list[Client]:
        """The admitted nodes (fedtune/transport.py)."""
        return connect(self.transport, run_dir, resume)

    def train(self, clients: list[Client], request: TrainRequest) -> Collected:
        """One round's training over ``clients``; see :meth:`fedtune.channel.Channel.train`."""

        def content(client: Client) -> RecordDict:
            settings = request.settings[client.key].to_json()
            config_record = ConfigRecord({NUM_SAMPLED: len(clients), SETTINGS: settings})
            return RecordDict({ARRAYS: adapter_record(request.adapter), CONFIG: config_record})

        if self.secure_rounds is not None:  # the server sees only the sum of the weighted updates and weights
            masked = self.secure_rounds.collect(
                clients,
                content,
                request.layout,
                request.server_round,
                request.weighting.unit,
                request.next_clients,
                request.groups,
            )
            return Collected(
                [_contribution(r, dict(r.content.metric_records[METRICS])) for r in masked.uploads],
                masked.weighted_sum,
                masked.total_weight,
                masked.round_size,  # the clients whose keys were verified: each one's DP noise share is for them
                masked.upload_bytes,
                groups=None if masked.groups is None else tuple(masked.groups),
                extra={"aggregation_error_bound": masked.error_bound, "exchanges": float(masked.exchanges)},
            )
        contributions, updates, weights, replies = [], [], [], []
        for reply in self.transport.send(clients, "train", content, request.server_round):
            try:
                update, metrics = _read_update(reply.content, request.layout)
            except (KeyError, TypeError, ValueError) as error:
                logger.warning("Round %d: update of %s rejected: %s", request.server_round, reply.client.key, error)
                continue
            contributions.append(_contribution(reply, metrics))
            updates.append(update)
            weights.append(float(request.weighting.weight(metrics["num_examples"])))
            replies.append(reply)
        return Collected(
            contributions,
            weighted_sum(updates, weights) if updates else {},
            sum(weights),
            len(clients),
            sum(payload_bytes(r.content) for r in replies) / max(len(replies), 1),
            (tuple(updates), tuple(weights)),
        )

    def evaluate(
        self, clients: list[Client], adapter: AdapterState, server_round: int, settings: dict[str, ClientSettings]
    ) -> list[dict[str, float]]:
        """Each replying client's validation metrics."""

        def content(client: Client) -> RecordDict:
            config_record = ConfigRecord({SETTINGS: settings[client.key].to_json()})
            return RecordDict({ARRAYS: adapter_record(adapter), CONFIG: config_record})

        replies = self.transport.send(clients, "evaluate", content, server_round)
        return [dict(r.content.metric_records[METRICS]) for r in replies]


def _contribution(reply: Reply, metrics: dict[str, float]) -> Contribution:
    """The reply as the engine sees it, with its contribution report if it carries a well-formed one."""
    record = reply.content.config_records.get(reports.RECORD)
    report = None
    if (
        record is not None
        and isinstance(record.get(reports.REPORT), str)
        and isinstance(record.get(reports.SIGNATURE), bytes)
    ):
        report = (str(record[reports.REPORT]), bytes(record[reports.SIGNATURE]))
    return Contribution(reply.client, metrics, reply.digest, reply.signature, report)


def _read_update(content: RecordDict, layout: AdapterState) -> tuple[AdapterState, dict[str, float]]:
    """The update and metrics of a train reply, refused if malformed (not the round's tensors, non-finite values,
    bad weight)."""
    update = adapter_of(content.array_records[ARRAYS])
    adapters.check_update(update, layout)
    metrics = dict(content.metric_records[METRICS])
    weight = float(metrics["num_examples"])
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"num_examples={weight} must be a positive number.")
    return update, metrics
