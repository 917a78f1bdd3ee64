"""``fedtune audit``'s checks of contribution accounting: every number recomputed from the ledger.

The ledger's chain and signatures (fedtune/ledger.py) prove that no one edited the entries after the server
signed them; these checks prove that what the server signed adds up: each round's Shapley values follow
from its recorded coalition utilities (exact, or GTG-Shapley replayed from its seed), they sum to the
round's change in utility, the credits follow from the values and from reports each node signed itself,
the metric lines say the same, and the last entry's totals and contribution values follow from the rounds
and the weights in the config. Under masking, the players are the committed groups, and the revealed seed
redraws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedtune.contribution import KINDS, groups, reports
from fedtune.contribution.accounting import credits, data_rule, summary, utility_shares
from fedtune.contribution.reports import Report
from fedtune.contribution.shapley import exact_shapley, gtg_shapley
from fedtune.contribution.valuation import coalition_key, coalition_mask
from fedtune.secure.session import Session
from fedtune.seeding import derive_seed

_CLOSE = 1e-9  # relative; values are recomputed with the same arithmetic, so they agree to the last bit


def check(run_dir: Path, entries: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]]) -> str | None:
    """The first inconsistency in the contribution records of ``entries`` (a run's ledger), naming its entry;
    None if every number follows from what the ledger records."""
    from fedtune.experiment import Experiment  # deferred: only runs that accounted contributions need it

    experiment = Experiment(OmegaConf.load(run_dir / "config.yaml"))
    accounting = experiment.contribution
    if not accounting.enabled:
        return "entry 0: contribution records in a run whose config.yaml accounts for none"
    rule = data_rule(experiment.privacy.organisation is not None, experiment.secure.masked, experiment.weighting.unit)
    opening = entries[0].get("contribution", {})
    committed = groups.check_partition(opening["groups"], [], 1) if "groups" in opening else None
    rounds = []
    for index, entry in enumerate(entries):
        record = entry.get("contribution")
        if entry["kind"] != "round" or record is None:
            continue
        where = f"entry {index} (round {entry['round']})"
        try:
            problem = _check_round(entry, record, accounting, rule, committed, metrics, experiment.cfg.seed)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            problem = f"its contribution record is malformed ({type(error).__name__}: {error})"
        if problem:
            return f"{where}: {problem}"
        rounds.append(record)
    last = entries[-1]
    if last["kind"] == "export":
        problem = _check_summary(last.get("contribution"), rounds, accounting.weights, opening, accounting.group_size)
        if problem:
            return f"entry {len(entries) - 1} (export): {problem}"
    return None


def _check_round(
    entry: Mapping[str, Any],
    record: Mapping[str, Any],
    accounting: Any,
    rule: str,
    committed: groups.Groups | None,
    metrics: Sequence[Mapping[str, Any]],
    seed: int,
) -> str | None:
    players = [list(members) for members in record["players"]]
    problem = _check_players(players, entry["participants"], committed)
    if problem:
        return problem
    utilities = {coalition_mask(key): float(value) for key, value in record["utilities"].items()}
    count = len(players)

    def utility(coalition: int) -> float:
        if coalition not in utilities:
            raise KeyError(coalition)
        return utilities[coalition]

    try:
        if record["method"] == "exact" and count <= accounting.exact_up_to:
            values = exact_shapley(count, utility)
        elif record["method"] == "gtg" and count > accounting.exact_up_to:
            expected_seed = derive_seed(seed, "contribution", entry["round"])
            if record.get("seed") != expected_seed:
                return f"GTG-Shapley's seed is not the round's ({expected_seed})"
            values, drawn = gtg_shapley(count, utility, expected_seed, accounting.sampling)
            if drawn != record.get("permutations"):
                return f"GTG-Shapley draws {drawn} permutations from its seed, not {record.get('permutations')}"
        else:
            return f"method {record['method']!r} for {count} players, where the config asks for the other"
    except KeyError as missing:
        return f"the utility of coalition {coalition_key(missing.args[0])!r} is needed but not recorded"
    if not _close(values, record["values"]):
        return "the Shapley values do not follow from the recorded coalition utilities"
    gain = utilities[(1 << count) - 1] - utilities[0]
    slack = 0.0 if record["method"] == "exact" else accounting.truncation * abs(gain)
    if abs(sum(values) - gain) > slack + _CLOSE * max(1.0, abs(gain)):
        return f"the values add up to {sum(values):.6g}, not to the round's change in utility {gain:.6g}"
    if not _close_maps(utility_shares(players, values), record["utility"]):
        return "the utility credits are not the players' values shared among their members"
    session = Session(str(entry["run_nonce"]), int(entry["round"]))
    stated: dict[str, Report | None] = {}
    for name in entry["participants"]:
        wire = record["reports"].get(name)
        try:
            stated[name] = None if wire is None else _signed_report(wire, entry["received"][name]["key"], session, name)
        except (KeyError, ValueError) as error:
            return f"the contribution report of {name} does not verify ({error})"
    if record.get("data_rule") != rule:
        return f"data credited by rule {record.get('data_rule')!r}, but the config's settings make it {rule!r}"
    if committed is not None and len(record.get("group_weights") or ()) != count:
        return "a masked round records no total weight for each group"
    data, compute, checks = credits(players, stated, rule, record.get("group_weights"))
    if not _close_maps(data, record["data"]) or not _close_maps(compute, record["compute"]):
        return "the data or compute credits do not follow from the signed reports"
    if record.get("group_weights") is not None and checks != record.get("data_checked"):
        return "the reported buckets' check against the groups' totals is recorded wrongly"
    return _check_metric_lines(entry["round"], record, utilities[0], utilities[(1 << count) - 1], metrics)


def _check_players(
    players: list[list[str]], participants: Sequence[str], committed: groups.Groups | None
) -> str | None:
    members = [name for player in players for name in player]
    if sorted(members) != sorted(participants) or len(set(members)) != len(members):
        return "the players are not the round's participants, each once"
    if committed is None:
        return None if all(len(player) == 1 for player in players) else "players are grouped without masking"
    present = [sorted(set(group) & set(participants)) for group in committed]
    if sorted(sorted(player) for player in players) != sorted(group for group in present if group):
        return "the players are not the committed groups' members in the round (the server valued finer sums)"
    return None


def _signed_report(wire: Mapping[str, str], public_hex: str, session: Session, name: str) -> Report:
    return reports.verify(wire["report"], bytes.fromhex(wire["signature"]), public_hex, session, name)


def _check_metric_lines(
    server_round: int, record: Mapping[str, Any], before: float, after: float, metrics: Sequence[Mapping[str, Any]]
) -> str | None:
    logged = {(m["scope"], m["metric"]): m["value"] for m in metrics if m["round"] == server_round}
    expected = {("contribution", "validation_loss_before"): -before, ("contribution", "validation_loss_after"): -after}
    for name in record["utility"]:
        expected.update({(f"contribution:{name}", kind): record[kind][name] for kind in KINDS})
    for key, value in expected.items():
        if key not in logged or not math.isclose(logged[key], value, rel_tol=_CLOSE, abs_tol=_CLOSE):
            return f"metrics.jsonl's {key[0]} {key[1]} is not what the ledger records"
    return None


def _check_summary(
    recorded: Mapping[str, Any] | None,
    rounds: list[Mapping[str, Any]],
    weights: Mapping[str, float],
    opening: Mapping[str, Any],
    group_size: int,
) -> str | None:
    if recorded is None:
        return "the run accounted contributions but its last entry has no summary"
    expected = summary(rounds, weights)
    for part in ("weights", "rounds", "totals", "shares", "value"):
        if not _close_nested(expected[part], recorded.get(part)):
            return f"the summary's {part} do not follow from the rounds and the config's weights"
    if "groups" in opening:
        seed = recorded.get("group_seed")
        if not isinstance(seed, int) or groups.commitment(seed) != opening.get("group_seed_commitment"):
            return "the revealed group seed does not match the first entry's commitment"
        names = [name for group in opening["groups"] for name in group]
        drawn = groups.draw(names, group_size, seed)
        if [list(g) for g in drawn] != [list(g) for g in opening["groups"]]:
            return "the groups of the first entry are not the ones the revealed seed draws"
    return None


def _close(left: Sequence[float], right: Sequence[float]) -> bool:
    return len(left) == len(right) and all(
        math.isclose(a, float(b), rel_tol=_CLOSE, abs_tol=_CLOSE) for a, b in zip(left, right, strict=True)
    )


def _close_maps(left: Mapping[str, float], right: Mapping[str, Any]) -> bool:
    return set(left) == set(right) and _close([left[k] for k in sorted(left)], [right[k] for k in sorted(left)])


def _close_nested(left: Any, right: Any) -> bool:
    if isinstance(left, Mapping):
        return (
            isinstance(right, Mapping)
            and set(left) == set(right)
            and all(_close_nested(left[k], right[k]) for k in left)
        )
    return isinstance(right, int | float) and math.isclose(float(left), float(right), rel_tol=_CLOSE, abs_tol=_CLOSE)
