"""What a client does each round, in plain torch: load the global adapter, train locally, return the update.

The Flower ClientApp (client_app.py) only decodes messages and calls these functions.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch

from fedtune import adapters, ranks
from fedtune.adapters import AdapterState
from fedtune.attacks import Attack
from fedtune.client_settings import ClientSettings
from fedtune.data.partition import ClientData
from fedtune.evaluation import TOKENS, evaluated_tokens
from fedtune.experiment import Experiment
from fedtune.seeding import derive_seed, noise_generator
from fedtune.training import local_train, truncated_documents


def describe(experiment: Experiment, data: ClientData) -> dict[str, Any]:
    """Sizes and label histogram (train and validation rows) of a client's data, for the partition summary; for
    plain text, how many of its documents are longer than ``model.max_length`` (cut to it: ``truncated``)."""
    labels = None
    if experiment.num_labels:
        counts = Counter(data.train["label"]) + Counter(data.val["label"])
        labels = [counts.get(label, 0) for label in range(experiment.num_labels)]
    description = {"train": len(data.train), "val": len(data.val), "labels": labels, "natural_id": None}
    if experiment.model_spec.task == "plain_text":
        texts = data.train["text"][:] + data.val["text"][:]
        description["truncated"] = truncated_documents(texts, experiment.tokenizer, experiment.model_spec.max_length)
    return description


def train_round(
    experiment: Experiment,
    data: ClientData,
    global_adapter: AdapterState,
    server_round: int,
    client_key: str,
    privacy_state: dict[str, Any] | None = None,
    num_sampled: int = 1,
    settings: ClientSettings | None = None,
    personal: AdapterState | None = None,
    rank: int | None = None,
    attack: Attack | None = None,
) -> tuple[AdapterState, dict[str, float]]:
    """Train from the global adapter on this client's data as the strategy's ``settings`` say, and return
    (update, metrics).

    The update is the trained adapter minus the one it started from, over the tensors ``settings`` upload.
    ``personal`` holds this client's own copies of the tensors ``settings`` keep local (FedSA-LoRA): they
    replace the global ones at the start, and are replaced by their trained values (empty: start from the
    global ones). A client of a smaller LoRA ``rank`` than the global adapter trains the first ``rank``
    components and uploads its trained adapter zero-padded to the global shapes (fedtune/ranks.py).
    Batch order and dropout are seeded from
    (experiment seed, round, client), so a run is reproducible and a resumed run continues exactly as an
    uninterrupted one would; DP noise comes from a secret in ``privacy_state`` (fedtune/seeding.py), the
    client's persistent privacy state (also the DP accountant's history), updated in place. With organisation-level DP the update
    is clipped (and, with ``noise_at=clients``, noised for a sum over ``num_sampled`` clients) before it leaves.
    A simulated malicious client (``attack``, active this round) trains on the rows the attack poisons and
    sends what it makes of the update (fedtune/attacks/).
    """
    config, settings = experiment.train_config, settings or ClientSettings()
    settings.check(global_adapter)
    check_residuals(experiment, global_adapter)
    torch.set_num_threads(config.torch_threads)
    rank = experiment.lora_rank(rank)
    model = experiment.model(rank)  # before seeding: a first-time build reseeds torch
    seed = derive_seed(experiment.cfg.seed, "train", server_round, client_key)
    if attack is not None:
        data = ClientData(attack.poison(data.train, experiment.num_labels, seed), data.val)
    torch.manual_seed(seed)  # dropout
    adapters.set_adapter(model, ranks.truncate({**global_adapter, **settings.kept(personal or {})}, rank))
    adapters.set_trainable(model, settings.frozen)
    started = time.perf_counter()
    metrics = local_train(
        model,
        data.train,
        experiment.corpus.task,
        experiment.tokenizer,
        experiment.model_spec.max_length,
        config,
        torch.Generator().manual_seed(seed),
        privacy=experiment.privacy,
        total_steps=config.local_steps * experiment.federation.num_rounds,
        privacy_state=privacy_state,
        proximal_mu=settings.proximal_mu,
        first_step=(server_round - 1) * config.local_steps,
    )
    trained = adapters.get_adapter(model)
    if personal is not None:
        personal.clear()
        personal.update(settings.kept(trained))
    update = adapters.subtract(settings.uploaded(ranks.pad(trained, global_adapter)), settings.uploaded(global_adapter))
    organisation = experiment.privacy.organisation
    if organisation is not None:
        noise = noise_generator(
            privacy_state if privacy_state is not None else {},
            organisation.reproducible_seed(experiment.cfg.seed),
            "client_dp",
            server_round,
        )
        update = organisation.privatize_update(update, num_sampled, noise)
    if attack is not None:  # after clipping: an attacker sends what it likes
        update = attack.corrupt(update, torch.Generator().manual_seed(derive_seed(seed, "attack")))
    return update, {**metrics, "train_seconds": time.perf_counter() - started, "num_examples": float(len(data.train))}


def evaluate_round(
    experiment: Experiment,
    data: ClientData,
    global_adapter: AdapterState,
    personal: AdapterState | None = None,
    rank: int | None = None,
) -> dict[str, float]:
    """Metrics of the global adapter (with this client's ``personal`` tensors in place of the global ones, if
    any; truncated to this client's LoRA ``rank``, the model it would use) on this client's validation split,
    with the rows (and a causal LM's tokens) they cover, which weigh them among the clients' metrics."""
    check_residuals(experiment, global_adapter)
    config = experiment.train_config
    torch.set_num_threads(config.torch_threads)
    rank = experiment.lora_rank(rank)
    adapter = ranks.truncate({**global_adapter, **(personal or {})}, rank)
    metrics = experiment.evaluate(adapter, data.val, rank)
    metrics["num_examples"] = float(min(len(data.val), config.eval_max_examples or len(data.val)))
    spec = experiment.model_spec
    if spec.task != "classification":
        metrics[TOKENS] = float(evaluated_tokens(data.val, spec.task, experiment.tokenizer, spec.max_length, config))
    return metrics


def check_residuals(experiment: Experiment, global_adapter: AdapterState) -> None:
    """Refuse dense residuals unless this node's experiment composes a strategy that folds them (FedEx-LoRA).

    A residual rewrites the frozen base weights a node trains and evaluates, to anything the sender chooses;
    a node accepts that only from the method it agreed to run (which is refused at start under
    ``secure=masking`` and organisation-level DP).

    Raises:
        ValueError: ``global_adapter`` holds a residual and the experiment's strategy folds none.
    """
    residuals = adapters.split_residuals(global_adapter)[1]
    if residuals and not experiment.folds_residuals:
        raise ValueError(
            f"the global adapter holds dense residuals ({next(iter(residuals))}) but strategy "
            f"{experiment.cfg.strategy._target_} folds none: refused, as they would rewrite this node's base weights."
        )
