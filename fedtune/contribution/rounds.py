"""Contribution accounting as the round engine runs it (fedtune/engine.py): fixed groups at the start, a
record for each round's ledger entry, the run's summary in the last one."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from fedtune.adapters import AdapterState
from fedtune.aggregation import weighted_sum
from fedtune.channel import Client, Collected, Contribution
from fedtune.contribution import KINDS, groups, reports
from fedtune.contribution.accounting import data_rule, summary
from fedtune.contribution.reports import Report
from fedtune.contribution.valuation import Player, RoundGame, coalition_key, value_round
from fedtune.run_dir import RunDir
from fedtune.secure.session import Session
from fedtune.seeding import NOISE_SECRET, derive_seed

if TYPE_CHECKING:
    from fedtune.experiment import Experiment

logger = logging.getLogger("fedtune")


def start(experiment: Experiment, clients: list[Client], secrets: dict[str, Any]) -> dict[str, Any]:
    """The ledger's first entry's ``contribution`` field: the validation rows by their hash and, under masking,
    the fixed groups drawn from a seed of the server's secret, with a commitment to that seed."""
    validation = experiment.contribution_set
    record: dict[str, Any] = {
        "validation_rows": len(validation),
        "validation_hash": hashlib.sha256(json.dumps(validation.to_list(), sort_keys=True).encode()).hexdigest(),
    }
    if experiment.secure.masked:
        seed = group_seed(secrets)
        drawn = groups.draw([c.key for c in clients], experiment.contribution.group_size, seed)
        record.update(groups=[list(g) for g in drawn], group_seed_commitment=groups.commitment(seed))
    return record


def group_seed(secrets: dict[str, Any]) -> int:
    """The seed the fixed groups are drawn from: derived from the server's secret, revealed at the end."""
    return derive_seed(secrets[NOISE_SECRET], "contribution-groups")


def fixed_groups(opening: dict[str, Any]) -> groups.Groups | None:
    """The groups that :func:`start` drew and the ledger's first entry committed to (None without masking)."""
    drawn = opening.get("groups")
    return None if drawn is None else tuple(tuple(g) for g in drawn)


def account_round(
    experiment: Experiment,
    strategy_state: dict[str, Any],
    collected: Collected,
    base: AdapterState,
    layout: AdapterState,
    server_round: int,
    run_nonce: str,
    fixed_divisor: int | None,
    run_dir: RunDir,
) -> dict[str, Any]:
    """The round's contribution record (fedtune/contribution/valuation.py), its credits logged per client
    (``contribution:<name>``) and its coalition utilities (``contribution``) in metrics.jsonl."""
    session = Session(run_nonce, server_round)
    verified = {c.client.key: _verified(c, session, experiment.secure.masked) for c in collected.contributions}
    if collected.individual is not None:
        updates, weights = collected.individual
        players = [
            Player((c.client.key,), weighted_sum([u], [w]), w, u)
            for c, u, w in zip(collected.contributions, updates, weights, strict=True)
        ]
    else:
        if collected.groups is None:
            raise ValueError("contribution accounting under masking needs the channel's group sums.")
        players = [Player(g.members, g.weighted_sum, g.total_weight) for g in collected.groups]
    game = RoundGame(
        players,
        base,
        layout,
        strategy_state,
        experiment.new_strategy,
        experiment.weighting,
        fixed_divisor,
        server_round,
    )
    rule = data_rule(experiment.privacy.organisation is not None, experiment.secure.masked, experiment.weighting.unit)
    record = value_round(
        game,
        lambda adapter: experiment.evaluate(adapter, experiment.contribution_set)["loss"],
        experiment.contribution,
        derive_seed(experiment.cfg.seed, "contribution", server_round),
        {name: report for name, (report, _) in verified.items()},
        rule,
    )
    record["reports"] = {name: wire for name, (report, wire) in verified.items() if report is not None}
    utilities = record["utilities"]
    full = coalition_key((1 << len(players)) - 1)
    run_dir.log_metrics(
        server_round,
        "contribution",
        {
            "validation_loss_before": -utilities[""],
            "validation_loss_after": -utilities[full],
            "evaluations": float(record["evaluations"]),
        },
    )
    for name in sorted(record["utility"]):
        credits = {kind: float(record[kind][name]) for kind in KINDS}
        run_dir.log_metrics(server_round, f"contribution:{name}", credits)
    return record


def finish(experiment: Experiment, rounds: list[dict[str, Any]], secrets: dict[str, Any]) -> dict[str, Any]:
    """The ledger's last entry's ``contribution`` field: totals, shares and contribution values over the
    rounds' records, and under masking the group seed, so anyone can redraw the groups."""
    result = summary(rounds, experiment.contribution.weights)
    if experiment.secure.masked:
        result["group_seed"] = group_seed(secrets)
    return result


def _verified(contribution: Contribution, session: Session, masked: bool) -> tuple[Report | None, dict[str, str]]:
    """The client's report once its signature checks out (and, in the clear, its count is the one its update
    carries), with its ledger form; (None, {}) for a missing or refused one, which earns no credit."""
    name = contribution.client.key
    if contribution.report is None:
        logger.warning(
            "Round %d: %s sent no contribution report; no data or compute credit", session.server_round, name
        )
        return None, {}
    text, signature = contribution.report
    try:
        report = reports.verify(text, signature, contribution.client.public_key, session, name)
        seen = contribution.metrics.get("num_examples")
        if not masked and report.examples is not None and report.examples != seen:
            raise ValueError(f"it reports {report.examples} examples, but its update says {seen}")
    except ValueError as error:
        logger.warning("Round %d: contribution report of %s refused: %s", session.server_round, name, error)
        return None, {}
    return report, {"report": text, "signature": signature.hex()}
