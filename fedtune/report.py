"""Human-facing outputs: progress lines, partition summary, final adapter export, model card and plot."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fedtune import adapters, config, portable  # noqa: E402
from fedtune.adapters import RESIDUAL_FILE, AdapterState  # noqa: E402
from fedtune.contribution import leaderboard  # noqa: E402
from fedtune.evaluation import majority_baseline  # noqa: E402
from fedtune.experiment import Experiment  # noqa: E402
from fedtune.federation import Federation  # noqa: E402
from fedtune.run_dir import RunDir  # noqa: E402

logger = logging.getLogger("fedtune")


def partition_summary(experiment: Experiment, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The clients' own descriptions (what each node reported) in the layout of :func:`format_summary`."""
    clients = [{"id": key, **info} for key, info in infos.items()]
    return {
        "pool": len(experiment.pool),
        "train": sum(c["train"] for c in clients),
        "val": sum(c["val"] for c in clients),
        "label_names": list(experiment.label_names) if experiment.num_labels else None,
        "clients": clients,
    }


def progress_line(
    server_round: int, num_rounds: int, metrics: list[dict[str, Any]], central: dict[str, float], seconds: float
) -> str:
    """``round 3/5 | clients 4/4 | train loss 1.234 | val ... | test ... | 12.3 s``."""
    latest = {(m["scope"], m["metric"]): m["value"] for m in metrics if m["round"] == server_round}
    if latest.get(("train", "abandoned")):
        return f"round {server_round}/{num_rounds} | abandoned, the global adapter is unchanged | {seconds:.1f} s"
    parts = [
        f"round {server_round}/{num_rounds}",
        f"clients {latest.get(('train', 'clients'), 0):.0f}/{latest.get(('train', 'sampled'), 0):.0f}",
        f"train loss {latest.get(('train', 'train_loss'), float('nan')):.4f}",
    ]
    if ("train", "epsilon_max") in latest:
        parts.append(f"max epsilon {latest[('train', 'epsilon_max')]:.3f}")
    if ("server", "client_dp_epsilon") in latest:
        parts.append(f"organisation epsilon {latest[('server', 'client_dp_epsilon')]:.3f}")
    federated = {name: v for (scope, name), v in latest.items() if scope == "federated"}
    if federated:
        parts.append("val " + " ".join(f"{k} {v:.4f}" for k, v in federated.items()))
    if central:
        parts.append("test " + " ".join(f"{k} {v:.4f}" for k, v in central.items()))
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


def finish(
    run_dir: RunDir, experiment: Experiment, final_adapter: AdapterState, contributions: dict[str, Any] | None = None
) -> None:
    """Export the final adapter in PEFT format (naming its base model by its public id: fedtune/portable.py),
    write the plot and the model card (with the ``contributions`` leaderboard, if accounted:
    fedtune/contribution/), log a summary."""
    metrics = run_dir.read_metrics()
    baseline = None
    if experiment.corpus.task == "classification":
        baseline = majority_baseline(experiment.pool["label"], experiment.test_set["label"])
        run_dir.write_json("baseline.json", {"majority_class": baseline})
    plot_metrics(metrics, run_dir)
    card = model_card(experiment, metrics, baseline, final_adapter)
    if contributions is not None:
        card += leaderboard.model_card_section(
            contributions, experiment.secure.masked, experiment.privacy.organisation is not None
        )
    model = experiment.model()
    adapters.set_adapter(model, final_adapter)
    portable.save_adapter(model, run_dir.path / "adapter", experiment.model_spec, card)
    residuals = adapters.residual_weights(model, final_adapter)
    if residuals:  # PEFT's format has no place for them (FedEx-LoRA): a file beside it, see the model card
        save_file(residuals, run_dir.path / "adapter" / RESIDUAL_FILE)
    (run_dir.path / "README.md").write_text(card, encoding="utf-8")
    final = final_central(metrics)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    logger.info("Finished: central test %s", summary)
    privacy = _epsilon_spent(experiment, metrics).strip().replace("**", "")
    if privacy:
        logger.info("Privacy spent:\n%s", privacy)
    if baseline:
        logger.info(
            "Majority-class baseline on the same test set: macro_f1 %.4f, accuracy %.4f",
            baseline["macro_f1"],
            baseline["accuracy"],
        )
    logger.info("Outputs in %s (adapter/, README.md, metrics.jsonl, metrics.png)", run_dir.path)


def plot_metrics(metrics: list[dict[str, Any]], run_dir: RunDir) -> None:
    """metrics.png: train loss and the central / federated metrics per round."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for line in metrics:
        if line["scope"] in ("train", "federated", "central") and line["metric"] not in (
            "clients",
            "sampled",
            "bytes_per_client",
            "train_loss_last",
            "train_seconds",
        ):
            series[(line["scope"], line["metric"])].append((line["round"], line["value"]))
    names = sorted({metric for _, metric in series})
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for (scope, metric), points in sorted(series.items()):
            if metric == name:
                axis.plot(*zip(*sorted(points), strict=True), marker="o", label=scope)
        axis.set_title(name)
        axis.set_xlabel("round")
        axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir.path / "metrics.png", dpi=100)
    plt.close(figure)


def model_card(
    experiment: Experiment, metrics: list[dict[str, Any]], baseline: dict[str, float] | None, adapter: AdapterState
) -> str:
    """The run's README: what was trained, on what, how, and how well."""
    cfg, spec, federation = experiment.cfg, experiment.model_spec, experiment.federation
    lora = cfg.lora
    trained, residuals = adapters.split_residuals(adapter)
    final = final_central(metrics)
    partitions = (
        " (clients' sizes withheld: secure aggregation)" if experiment.secure.masked else " (see `partitions.json`)"
    )
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in final.items())
    baseline_rows = "\n".join(f"| majority-class {k} | {v:.4f} |" for k, v in (baseline or {}).items())
    return f"""# Federated LoRA adapter

Trained with fedtune. {portable.loading_section(spec, experiment.num_labels)}{_residual_note(residuals)}
{portable.base_model_section(spec)}
## Data
- {experiment.corpus.description}
- {len(experiment.pool)} rows for clients, {len(experiment.test_set)} held out for the central test set.
- Partitioning: `{cfg.partition._target_.rsplit(".", 1)[-1]}` over {federation.num_clients} clients{partitions}.
{_documents_note(experiment)}
## Training
- {federation.num_rounds} rounds, {federation.fraction_train:.0%} of clients per round, strategy `{cfg.strategy._target_.rsplit(".", 1)[-1]}`.
- Local: {experiment.train_config.local_steps} steps of batch {experiment.train_config.batch_size}, lr {experiment.train_config.lr} ({experiment.train_config.lr_schedule}), precision {experiment.train_config.precision} (device `{experiment.train_config.device}` on each node).
- LoRA: r={lora.r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout}, target modules {lora.target_modules or "PEFT default for the architecture"};
  {adapters.num_parameters(trained):,} adapter parameters ({adapters.num_bytes(trained) / 1e6:.2f} MB{_residual_size(residuals)}), fingerprint `{adapters.fingerprint(adapter)[:16]}`.
{_ranks_note(federation)}- Seed {cfg.seed}; full resolved config in `config.yaml`.

## Privacy and security
- Differential privacy: {experiment_component(experiment, "privacy")}{_epsilon_spent(experiment, metrics)}
- Secure aggregation: {experiment_component(experiment, "secure")}
- Simulated attack: {experiment.attack.describe()}
- Contribution accounting: {experiment.contribution.describe()}
- Integrity: every client reply was signed; `ledger.jsonl` chains every round (`fedtune audit <run dir>`).{_membership_note(experiment)}

## Results (central held-out test set, final round)
{_personalised_note(experiment)}| metric | value |
|---|---|
{rows}
{baseline_rows}

Per-round metrics: `metrics.jsonl`, `metrics.png`.
"""


def _documents_note(experiment: Experiment) -> str:
    """For plain text: what a record is, and how much of a long one was read."""
    if experiment.model_spec.task != "plain_text":
        return ""
    return (
        f"- Plain text: each row is one document and one record (the unit of DP-SGD's guarantee), read up to its "
        f"first {experiment.model_spec.max_length} tokens (`model.max_length`; the partition summary counts the "
        "documents cut).\n"
    )


def _ranks_note(federation: Federation) -> str:
    """For simulated clients of different LoRA ranks: which ranks trained the adapter."""
    if federation.client_ranks is None:
        return ""
    return (
        f"- `federation.client_ranks={list(federation.client_ranks)}`: in simulation, the clients' LoRA ranks "
        "(zero-padded to the adapter's r); deployed nodes set their own with node config `lora-rank`.\n"
    )


def _residual_size(residuals: AdapterState) -> str:
    """The dense residuals' size, which the adapter count leaves out (they are not trained)."""
    if not residuals:
        return ""
    return (
        f"; plus {adapters.num_parameters(residuals):,} residual values, {adapters.num_bytes(residuals) / 1e6:.2f} MB"
    )


def _residual_note(residuals: AdapterState) -> str:
    """For an adapter with dense residuals (FedEx-LoRA): how to add them to the base weights."""
    if not residuals:
        return ""
    return f"""
The adapted weights also carry dense residuals (exact aggregation, FedEx-LoRA) that PEFT's format cannot
hold; add them to the base weights after loading, or the model is not the one that was evaluated:

```python
from safetensors.torch import load_file
for name, delta in load_file("adapter/{RESIDUAL_FILE}").items():
    weight = model.get_parameter(name)
    weight.data += delta.to(weight.device, weight.dtype)
```
"""


def _personalised_note(experiment: Experiment) -> str:
    """For a strategy whose clients keep tensors for themselves (FedSA-LoRA): what the results here are of."""
    kept = experiment.new_strategy().configure(1, "").local
    if not kept:
        return ""
    return (
        f"Each client kept the tensors matching {list(kept)} for itself: this adapter and the central results are "
        "of the shared part alone (those tensors at their initial values). The federated metrics in "
        "`metrics.jsonl` are personalised: each client's own tensors on its own validation split.\n\n"
    )


def experiment_component(experiment: Experiment, group: str) -> str:
    """The ``describe()`` line of a privacy or security component."""
    return str(config.instantiate(experiment.cfg[group]).describe())


def _membership_note(experiment: Experiment) -> str:
    if experiment.privacy.organisation is None:
        return ""
    return (
        "\n- Organisation-level DP hides who took part: this card names no participant. The run directory's "
        "`ledger.jsonl` and `metrics.jsonl` do; they are for the consortium only."
    )


def final_central(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The central test metrics of the last round that has them."""
    last = max((m["round"] for m in metrics if m["scope"] == "central"), default=0)
    return {m["metric"]: m["value"] for m in metrics if m["scope"] == "central" and m["round"] == last}


def _epsilon_spent(experiment: Experiment, metrics: list[dict[str, Any]]) -> str:
    """Record-level epsilon (the maximum, and each client's unless organisation-level DP hides who took part)
    and the organisation-level epsilon, when reported."""
    spent: dict[str, float] = {}
    for line in metrics:  # in round order: the last value per client wins
        if line["scope"].startswith("client:") and line["metric"] == "epsilon":
            spent[line["scope"].removeprefix("client:")] = line["value"]
    lines = ""
    if spent:
        per_client = ", ".join(f"{key} {value:.3f}" for key, value in sorted(spent.items()))
        if experiment.privacy.organisation is not None:  # naming them would tell who took part
            per_client = "participants not named: organisation-level DP"
        lines += f"\n- Epsilon spent (record level, whole run): maximum **{max(spent.values()):.3f}** over clients ({per_client})."
    organisation = [line["value"] for line in metrics if line["metric"] == "client_dp_epsilon"]
    if organisation:
        lines += f"\n- Epsilon spent (organisation level, whole run): **{organisation[-1]:.3f}**."
    return lines
