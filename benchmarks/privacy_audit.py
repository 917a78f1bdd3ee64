"""Empirical privacy audit: plant canary records at one hospital, train with and without DP-SGD, attack.

Canaries are random token strings with random labels: nothing but memorisation can fit them. Half of
them (members) are added once each to hospital 0's training data; the other half (non-members) are
never seen. After federated training, a loss-threshold membership-inference attack on the final adapter
tries to tell members from non-members. Reported per run: the attack's advantage (max TPR - FPR) and
the empirical epsilon lower bound ln((TPR_low - delta) / FPR_high) with 95 % Clopper-Pearson bounds
(Jagielski et al. 2020; Nasr et al. 2021), next to the accounted epsilon.

    python benchmarks/privacy_audit.py                      # no DP vs DP-SGD at epsilon 8, 10 rounds
    python benchmarks/privacy_audit.py --epsilon 1 --canaries 200
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import tempfile
from pathlib import Path

import torch
from scipy.stats import beta

from fedtune import config
from fedtune.adapters import set_adapter
from fedtune.data import icd10_chapters
from fedtune.experiment import get_experiment
from fedtune.run_dir import RunDir
from fedtune.simulation import simulate
from fedtune.training import encode, sequence_loss

HOSPITALS = 4


def write_data(path: Path, canaries: int, rows_per_hospital: int, seed: int) -> tuple[list[dict], list[dict]]:
    """ICD-10 rows spread over hospitals, plus member canaries at hospital 0; returns (members, non-members)."""
    rng = random.Random(seed)
    corpus = icd10_chapters(max_examples=rows_per_hospital * HOSPITALS, seed=seed)
    names = corpus.label_names
    rows = [
        {"text": r["text"], "label": names[r["label"]], "hospital": f"h{i % HOSPITALS}"}
        for i, r in enumerate(corpus.dataset)
    ]
    planted = [
        {"text": "patient note " + " ".join(f"{rng.getrandbits(24):06x}" for _ in range(6)), "label": rng.choice(names), "hospital": "h0"}
        for _ in range(2 * canaries)
    ]  # fmt: skip
    members, non_members = planted[:canaries], planted[canaries:]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "hospital"])
        writer.writeheader()
        writer.writerows(rows + members)
    return members, non_members


@torch.no_grad()
def canary_losses(run_dir: Path, overrides: list[str], canaries: list[dict]) -> list[float]:
    """Loss of the final global adapter on each canary (lower = more likely a member)."""
    experiment = get_experiment(config.compose([*overrides, f"run_dir={run_dir}"]))
    adapter = torch.load(max((run_dir / "checkpoints").glob("round-*.pt")), weights_only=True)["adapter"]
    names = list(experiment.label_names)
    rows = {"text": [c["text"] for c in canaries], "label": [names.index(c["label"]) for c in canaries]}
    model = experiment.model()
    set_adapter(model, adapter)
    batch = encode(rows, "classification", experiment.tokenizer, experiment.model_spec.max_length)
    labels = batch.pop("labels")
    return sequence_loss(model(**batch).logits, labels, "classification").tolist()


def audit(member_losses: list[float], non_member_losses: list[float], delta: float) -> dict[str, float]:
    """Best advantage and empirical epsilon lower bound over all loss thresholds."""
    best_advantage, best_epsilon = 0.0, 0.0
    m, n = len(member_losses), len(non_member_losses)
    for threshold in sorted(set(member_losses + non_member_losses)):
        tp = sum(loss <= threshold for loss in member_losses)
        fp = sum(loss <= threshold for loss in non_member_losses)
        best_advantage = max(best_advantage, tp / m - fp / n)
        tpr_low = beta.ppf(0.025, tp, m - tp + 1) if tp else 0.0  # Clopper-Pearson, 95 % two-sided
        fpr_high = beta.ppf(0.975, fp + 1, n - fp) if fp < n else 1.0
        if tpr_low - delta > 0:
            best_epsilon = max(best_epsilon, math.log((tpr_low - delta) / fpr_high))
    return {"advantage": best_advantage, "empirical_epsilon_lower_bound": best_epsilon}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--canaries", type=int, default=100, help="members (and as many non-members)")
    parser.add_argument("--rows-per-hospital", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/privacy_audit.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtune-audit-"))
    members, non_members = write_data(work / "data.csv", args.canaries, args.rows_per_hospital, seed=0)
    base = [
        "data=local", f"data.loader.path={work / 'data.csv'}", "data.test_size=100", "partition=natural",
        "partition.partition_by=hospital", f"federation.num_clients={HOSPITALS}", f"federation.num_rounds={args.rounds}",
        "federation.evaluate_every=1000", "federation.fraction_evaluate=0",
    ]  # fmt: skip
    results = {}
    for name, extra in (("no_dp", []), ("dp_sgd", ["privacy=dp_sgd", f"privacy.target_epsilon={args.epsilon}"])):
        overrides, run_dir = [*base, *extra], work / name
        simulate(config.compose([*overrides, f"run_dir={run_dir}"]), config.to_run_config(overrides, str(run_dir)))
        lines = RunDir(run_dir).read_metrics()
        accounted = max((m["value"] for m in lines if m["metric"] == "epsilon_max"), default=None)  # None: no DP
        delta = max((m["value"] for m in lines if m["metric"] == "delta_max"), default=1e-5)
        # Members are the planted canaries that hospital 0 really trained on (not drawn into a test or val split).
        trained = set(get_experiment(config.compose([*overrides, f"run_dir={run_dir}"])).client_data(0).train["text"])
        in_training = [c for c in members if c["text"] in trained]
        scores = audit(
            canary_losses(run_dir, overrides, in_training), canary_losses(run_dir, overrides, non_members), delta
        )
        results[name] = {
            "accounted_epsilon": accounted,
            "delta": delta,
            "members_trained_on": len(in_training),
            **scores,
        }
        print(f"{name}: accounted epsilon {accounted if accounted is not None else 'none'} | attack advantage {scores['advantage']:.3f} | "
              f"empirical epsilon >= {scores['empirical_epsilon_lower_bound']:.3f}", flush=True)  # fmt: skip
    payload = {"canaries_in": args.canaries, "canaries_out": args.canaries, "rounds": args.rounds, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
