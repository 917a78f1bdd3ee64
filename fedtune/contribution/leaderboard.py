"""The contribution leaderboard, as people read it: a table per organisation, per-round utilities, a plot, and
the model card's section. Everything is read from the ledger (fedtune/ledger.py), the run's signed record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedtune.contribution import KINDS
from fedtune.contribution.accounting import summary as run_summary


@dataclass(frozen=True)
class Board:
    """A run's contributions as its ledger records them.

    Attributes:
        run_dir: The run directory.
        summary: Totals, shares and contribution values (the last entry's, or, for a run still going, the
            rounds' so far under the config's weights).
        rounds: Each accounted round's number and record.
        groups: The fixed groups under masking, else None.
        audit: The audit's first problem, or None when every number checks out.
        organisation_dp: The run used organisation-level DP (the scores lie outside its guarantee).
    """

    run_dir: Path
    summary: Mapping[str, Any]
    rounds: list[tuple[int, Mapping[str, Any]]]
    groups: list[list[str]] | None
    audit: str | None
    organisation_dp: bool

    def text(self) -> str:
        """The leaderboard, the per-round utilities and the audit's verdict, as markdown."""
        verdict = (
            "audited: every number follows from the ledger (`fedtune audit`)"
            if self.audit is None
            else f"AUDIT FAILED: {self.audit}"
        )
        groups = ""
        if self.groups is not None:
            groups = (
                "Fixed groups (secure aggregation; members share their group's utility): "
                + "; ".join(", ".join(g) for g in self.groups)
                + "\n\n"
            )
        explained = "\n".join(
            f"- {note}" for note in notes(self.summary, self.groups is not None, self.organisation_dp)
        )
        return (
            f"Contributions to {self.run_dir} ({verdict})\n\n{groups}{markdown(rows(self.summary))}\n"
            f"Utility credit per round:\n\n{per_round(self.rounds)}\n{explained}\n"
        )

    def write(self, out: Path) -> None:
        """contributions.csv, contributions.md and contributions.png in ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "contributions.csv").write_text(csv(rows(self.summary)))
        (out / "contributions.md").write_text(self.text())
        plot(self.rounds, self.summary, out / "contributions.png")


def from_run(run_dir: Path) -> Board:
    """The contributions of the run in ``run_dir``, read from its ledger and audited.

    Raises:
        ValueError: The run has no ledger or accounted no contributions.
    """
    from fedtune.experiment import Experiment  # deferred: builds the config's privacy component
    from fedtune.ledger import Ledger, audit  # deferred: a cycle through fedtune.contribution.audit otherwise

    entries = Ledger(run_dir).entries()
    if not entries or "contribution" not in entries[0]:
        raise ValueError(
            f"{run_dir} has no ledger of a run with contribution accounting (run with contribution=shapley)."
        )
    rounds = [(e["round"], e["contribution"]) for e in entries if e["kind"] == "round" and "contribution" in e]
    experiment = Experiment(OmegaConf.load(run_dir / "config.yaml"))
    last = entries[-1]
    if last["kind"] == "export":
        summary = last["contribution"]
    else:  # a run still going: its rounds so far
        summary = run_summary([record for _, record in rounds], experiment.contribution.weights)
    problems = audit(run_dir)
    return Board(
        run_dir,
        summary,
        rounds,
        entries[0]["contribution"].get("groups"),
        problems[0] if problems else None,
        experiment.privacy.organisation is not None,
    )


_COLUMNS = ("organisation", "rounds", "data", "compute", "utility", *(f"{k} share" for k in KINDS), "V")


def rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """One row per organisation, best contribution value first: rounds credited, the raw totals (utility
    signed, as measured), each kind's share and V."""
    ordered = sorted(summary["totals"], key=lambda name: (-summary["value"][name], name))
    table = []
    for name in ordered:
        total, share = summary["totals"][name], summary["shares"][name]
        table.append(
            [
                name,
                str(summary["rounds"][name]),
                f"{total['data']:.1f}",
                f"{total['compute']:.0f}",
                f"{total['utility']:+.5f}",
                *(f"{share[k]:.3f}" for k in KINDS),
                f"{summary['value'][name]:.3f}",
            ]
        )
    return table


def markdown(table: list[list[str]]) -> str:
    """The leaderboard as a markdown table."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines) + "\n"


def csv(table: list[list[str]]) -> str:
    """The leaderboard as CSV."""
    return "\n".join(",".join(row) for row in [list(_COLUMNS), *table]) + "\n"


def per_round(rounds: Sequence[tuple[int, Mapping[str, Any]]]) -> str:
    """Each round's utility credit per organisation, as a markdown table (blank: not credited that round)."""
    names = sorted({name for _, record in rounds for name in record["utility"]})
    lines = ["| round | method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for server_round, record in rounds:
        cells = [f"{record['utility'][n]:+.5f}" if n in record["utility"] else "" for n in names]
        lines.append(f"| {server_round} | {record['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rounds: Sequence[tuple[int, Mapping[str, Any]]], summary: Mapping[str, Any], path: Path) -> None:
    """Cumulative utility credit per organisation over the rounds, and each one's contribution value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(summary["totals"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in names:
        running, points = 0.0, []
        for server_round, record in rounds:
            running += record["utility"].get(name, 0.0)
            points.append((server_round, running))
        left.plot(*zip(*points, strict=True), marker="o", label=name)
    left.set_title("cumulative utility (Shapley, validation loss)")
    left.set_xlabel("round")
    left.legend(fontsize="small")
    right.barh(names, [summary["value"][n] for n in names])
    right.set_title("contribution value V")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def notes(summary: Mapping[str, Any], masked: bool, organisation_dp: bool) -> list[str]:
    """What the numbers mean, and what they do not."""
    weights = ", ".join(f"{k} {w:g}" for k, w in summary["weights"].items())
    explained = [
        f"V = sum over kinds of weight x share (weights: {weights}); a negative utility total counts as zero "
        "in its share and is shown as measured.",
        "Utility: each organisation's Shapley value in the improvement of the loss on the server's validation "
        "rows, summed over the rounds. Data and compute come from reports each node signed; the ledger keeps "
        "them, and `fedtune audit` recomputes every value.",
        "Shapley values reward a member who joins twice under two names (each copy is credited): the "
        "consortium's admission of nodes is what prevents that.",
    ]
    if masked:
        explained.append(
            "Under secure aggregation the server learned only the sums of fixed groups (see the ledger's first "
            "entry): each member shares its group's utility equally"
            + ("." if organisation_dp else ", and data is the group's masked total split by the members' buckets.")
        )
    if organisation_dp:
        explained.append(
            "Organisation-level DP hides whether an organisation took part; these per-organisation scores reveal "
            "it. They lie outside the DP guarantee: share them within the consortium only. Data counts one unit "
            "per round taken part in."
        )
    return explained


def model_card_section(summary: Mapping[str, Any], masked: bool, organisation_dp: bool) -> str:
    """The model card's contribution section."""
    body = "\n".join(f"- {note}" for note in notes(summary, masked, organisation_dp))
    return f"""
## Contributions

{markdown(rows(summary))}
{body}

`fedtune contributions <run dir>` shows them per round, with a plot.
"""
