"""fedtune: federated fine-tuning of language models with LoRA, differential privacy and secure aggregation."""

import os

# Offline by default (DESIGN.md decision 5): no code path may reach a model or dataset hub.
for _flag in (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
):
    os.environ.setdefault(_flag, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"
