"""Everything a process derives from one experiment config, built lazily and cached per process.

Simulated clients run many rounds in the same process (a Ray actor), so the corpus, the partitioning
and the frozen base model are built once and reused; only the adapter changes between rounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import datasets
import torch
from omegaconf import DictConfig
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune import config as fedtune_config
from fedtune import devices, model_fingerprint
from fedtune.adapters import AdapterState, set_adapter
from fedtune.aggregation import Weighting
from fedtune.attacks import Attack
from fedtune.contribution import NoContribution, ShapleyContribution
from fedtune.data import Corpus, DataSpec
from fedtune.data.local import local_file
from fedtune.data.partition import ClientData, client_partition, split_test
from fedtune.evaluation import evaluate
from fedtune.federation import Federation
from fedtune.interfaces import Strategy
from fedtune.models import ModelSpec, build_model, load_tokenizer
from fedtune.privacy import PrivacyMechanism
from fedtune.secure import Plaintext
from fedtune.secure.masking import MIN_ROUND_CLIENTS, SecureAggregation
from fedtune.training import TrainConfig

_EXPERIMENTS: dict[str, Experiment] = {}


@dataclass
class Experiment:
    """The components of one experiment config, built on first use."""

    cfg: DictConfig
    _clients: dict[str, ClientData] = field(default_factory=dict)

    @cached_property
    def hash(self) -> str:
        """Identifies everything that determines training (see :func:`fedtune.config.experiment_hash`)."""
        return fedtune_config.experiment_hash(self.cfg)

    @cached_property
    def base_model(self) -> str:
        """The base model by its content (:func:`fedtune.model_fingerprint.model_identity`), as hashed."""
        return model_fingerprint.model_identity(str(self.cfg.model.path))

    @cached_property
    def model_spec(self) -> ModelSpec:
        """The base model description."""
        return fedtune_config.instantiate(self.cfg.model)

    @cached_property
    def data_spec(self) -> DataSpec:
        """The data source and split sizes."""
        return fedtune_config.instantiate(self.cfg.data)

    @cached_property
    def federation(self) -> Federation:
        """Clients, rounds and sampling."""
        return fedtune_config.instantiate(self.cfg.federation)

    @cached_property
    def train_config(self) -> TrainConfig:
        """Local training settings."""
        return fedtune_config.instantiate(self.cfg.train)

    @cached_property
    def device(self) -> torch.device:
        """Where this process trains and evaluates (``train.device`` resolved on this machine's hardware)."""
        return devices.resolve(self.train_config.device, self.train_config.deterministic)

    @cached_property
    def privacy(self) -> PrivacyMechanism:
        """The privacy mechanism each client trains under."""
        return fedtune_config.instantiate(self.cfg.privacy)

    @cached_property
    def secure(self) -> Plaintext | SecureAggregation:
        """How updates reach the server: in the clear, or masked so that only their sum is seen."""
        return fedtune_config.instantiate(self.cfg.secure)

    @cached_property
    def attack(self) -> Attack:
        """The simulated malicious clients (``attack=none``: none)."""
        return fedtune_config.instantiate(self.cfg.attack)

    @cached_property
    def contribution(self) -> NoContribution | ShapleyContribution:
        """Contribution accounting (``contribution=none``: none)."""
        return fedtune_config.instantiate(self.cfg.contribution)

    def check_attack(self, simulated: bool) -> None:
        """Refuse the configured attack where it cannot run (the server and every node call this at setup).

        Args:
            simulated: This process is part of fedtune's own simulation, not a deployment.

        Raises:
            ValueError: See :meth:`fedtune.attacks.Attack.check`.
        """
        self.attack.check(
            simulated,
            masked=self.secure.masked,
            classification=self.model_spec.task == "classification",
            num_clients=self.federation.num_clients,
        )

    def new_strategy(self) -> Strategy:
        """A fresh server-side aggregation strategy.

        Raises:
            TypeError: The strategy lacks an attribute the :class:`fedtune.interfaces.Strategy` protocol declares
                (a user's strategy written before one was added), named with what it means.
        """
        strategy = fedtune_config.instantiate(self.cfg.strategy)
        missing = [name for name in Strategy.__annotations__ if not hasattr(strategy, name)]
        if missing:
            raise TypeError(
                f"strategy {self.cfg.strategy._target_} lacks {', '.join(missing)} of the Strategy protocol "
                "(fedtune/interfaces.py says what each means; a mean-based rule sets linear = True, "
                "weighting = 'examples', folds_residuals = False, min_clients = 1)."
            )
        return strategy

    @cached_property
    def folds_residuals(self) -> bool:
        """Whether the strategy sends dense residuals for clients to fold into their frozen weights (FedEx-LoRA)."""
        return self.new_strategy().folds_residuals

    @cached_property
    def weighting(self) -> Weighting:
        """How clients count in each round's mean: as the privacy mechanism requires, else as the strategy declares."""
        return self.privacy.weighting or Weighting.of(self.new_strategy().weighting)

    @cached_property
    def corpus(self) -> Corpus:
        """The full corpus from ``data.loader``."""
        corpus: Corpus = fedtune_config.instantiate(self.data_spec.loader)
        if corpus.task != self.model_spec.task:
            raise ValueError(
                f"data gives a {corpus.task} dataset but model.task is {self.model_spec.task}; "
                "pick a matching pair, e.g. model=minilm data=icd10 or model=smollm2 data=icd10_instructions "
                "(documents, plain text: model=smollm2 model.task=plain_text data=hpo_text)."
            )
        return corpus

    @cached_property
    def _split(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        return split_test(self.corpus, self.data_spec.test_size, self.cfg.seed)

    @property
    def pool(self) -> datasets.Dataset:
        """Rows available to clients (the corpus minus the central test set)."""
        return self._split[0]

    @cached_property
    def _held_out(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        held_out = self._split[1]
        rows = self.contribution.validation_rows if self.contribution.enabled else 0
        if rows >= len(held_out):
            raise ValueError(
                f"contribution.validation_rows={rows} would take every row of the central test set ({len(held_out)}, "
                "data.test_size); lower it, or raise data.test_size."
            )
        return held_out.select(range(rows, len(held_out))), held_out.select(range(rows))

    @property
    def test_set(self) -> datasets.Dataset:
        """The central held-out test set, evaluated by the server (less the contribution validation rows)."""
        return self._held_out[0]

    @property
    def contribution_set(self) -> datasets.Dataset:
        """The server's validation rows for contribution accounting: the first ``contribution.validation_rows``
        of the held-out rows (already shuffled), never part of the central test set; empty when it is off."""
        return self._held_out[1]

    @cached_property
    def partitioner(self) -> Any:
        """The flwr-datasets partitioner from ``partition``."""
        return fedtune_config.instantiate(self.cfg.partition)

    @cached_property
    def label_names(self) -> tuple[str, ...] | None:
        """Class names: declared in ``data.loader.label_names`` (deployments), else read from the corpus."""
        declared = self.data_spec.loader.get("label_names")
        return tuple(declared) if declared else self.corpus.label_names

    @property
    def num_labels(self) -> int | None:
        """Classes of the classification head (None for a causal LM)."""
        return len(self.label_names or ()) if self.model_spec.task == "classification" else None

    def client_data(self, partition_id: int) -> ClientData:
        """A simulated client's partition of the pool, split into train and validation."""
        key = f"partition-{partition_id}"
        if key not in self._clients:
            self._clients[key] = client_partition(
                self.pool, self.partitioner, partition_id, self.data_spec.val_fraction, self.cfg.seed
            )
        return self._clients[key]

    def node_data(self, data_path: str) -> ClientData:
        """A deployed node's own file (all of it is this node's), split into train and validation.

        Column mapping and label names come from ``data.loader`` when it is a ``local_file`` loader.

        Raises:
            ValueError: A classification experiment without ``data.loader.label_names``: every node must
                number the classes the same way, which its own file alone cannot guarantee.
        """
        key = f"path-{data_path}"
        if key not in self._clients:
            loader = dict(self.data_spec.loader) if str(self.data_spec.loader._target_).endswith(".local_file") else {}
            options = {k: v for k, v in loader.items() if not k.startswith("_") and k != "path"}
            options["task"] = self.model_spec.task
            if self.model_spec.task == "classification" and not options.get("label_names"):
                raise ValueError(
                    "A node reading its own data-path needs data=local with data.loader.label_names=[...] listing every "
                    "class, so that all nodes give each class the same id."
                )
            corpus = local_file(path=data_path, **options)
            split = corpus.dataset.train_test_split(test_size=self.data_spec.val_fraction, seed=self.cfg.seed)
            self._clients[key] = ClientData(train=split["train"], val=split["test"])
        return self._clients[key]

    def preflight(self) -> None:
        """Load the data and split it once, so that a data/model mismatch or a bad partitioning fails at start.

        Raises:
            ValueError: The corpus does not fit the model's task, the privacy mechanism refuses a trainable
                layer, or the partitioner's number of partitions differs from ``federation.num_clients``.
        """
        self.corpus  # noqa: B018 - loading checks the task pairing
        check_model = getattr(self.privacy, "check_model", None)
        if check_model is not None:  # DP refuses layers it cannot clip per record, before any client starts
            check_model(self.model())
        self.check_composition()
        self.test_set  # noqa: B018 - the held-out rows leave some to test after contribution validation
        self._check_masked_round_size()
        self.client_data(0)  # assigns the pool, which natural partitioning needs to count its partitions
        partitions = self.partitioner.num_partitions
        if partitions != self.federation.num_clients:
            raise ValueError(
                f"partition gives {partitions} partitions but federation.num_clients={self.federation.num_clients}; "
                f"set federation.num_clients={partitions}."
            )

    def check_composition(self) -> None:
        """Refuse a strategy, privacy mechanism and secure aggregation that cannot work together (the server
        calls this at the start of every run, however it was launched; it loads no model or data).

        Raises:
            ValueError: A non-linear strategy with ``secure=masking`` or organisation-level DP, masked rounds
                allowed to sum a single update, rounds smaller than the strategy's guarantee needs, a client
                rank the experiment cannot train, or dense residuals on weights that cannot hold them exactly.
        """
        for rank in self.federation.client_ranks or ():
            self.lora_rank(rank, "federation.client_ranks")
        strategy = self.cfg.strategy._target_
        if self.folds_residuals:
            self._check_residuals_fit(strategy)
        method = self.new_strategy()
        if not method.linear:
            if self.secure.masked:
                raise ValueError(
                    f"strategy {strategy} needs every client's individual update, but secure=masking lets the "
                    "server see only their sum. Use a linear strategy (e.g. strategy=fedavg) or secure=none."
                )
            if self.privacy.organisation is not None:
                raise ValueError(
                    f"strategy {strategy} does not average, but organisation-level DP calibrates its noise to the "
                    "sensitivity of a mean. Use a linear strategy (e.g. strategy=fedavg) or another privacy option."
                )
        if self.federation.min_train_clients < method.min_clients:
            raise ValueError(
                f"strategy {strategy} needs at least {method.min_clients} updates a round for its guarantee "
                f"(with its strategy.byzantine setting), but federation.min_train_clients="
                f"{self.federation.min_train_clients} would let a round combine fewer. Raise "
                f"federation.min_train_clients to {method.min_clients} (and num_clients with it) or lower "
                "strategy.byzantine."
            )
        organisation = self.privacy.organisation
        self.contribution.check(
            masked=self.secure.masked,
            num_clients=self.federation.num_clients,
            fraction_train=self.federation.fraction_train,
            ring=getattr(self.secure, "neighbours", None) is not None,
            noise_at_clients=organisation is not None and organisation.noise_at == "clients",
            min_round_clients=MIN_ROUND_CLIENTS,
        )
        if not self.secure.masked:
            return
        if self.federation.min_train_clients < 2:
            raise ValueError(
                "secure=masking needs federation.min_train_clients >= 2: the sum of one update is that update."
            )

    def _check_residuals_fit(self, strategy: str) -> None:
        """Residuals folded into the frozen weights are exact only in float32, on plain LoRA layers."""
        if self.train_config.precision != "fp32":
            raise ValueError(
                f"strategy {strategy} folds dense residuals into the frozen base weights, and "
                f"train.precision={self.train_config.precision} stores those in bfloat16, which rounds the "
                "residuals away (aggregation would no longer be exact). Set train.precision=fp32."
            )
        if self.cfg.lora.get("use_dora", False):
            raise ValueError(
                f"strategy {strategy} folds dense residuals into the frozen weights, which would change DoRA's "
                "weight norm as well: its aggregation is not exact with DoRA. Set lora.use_dora=false."
            )

    def _check_masked_round_size(self) -> None:
        """Fedtune's simulated nodes take part in masked rounds of at least MIN_ROUND_CLIENTS (a deployed node
        sets its own minimum, node config ``min-round-clients``, and refuses smaller rounds itself)."""
        federation = self.federation
        if not self.secure.masked:
            return
        per_round = federation.num_sampled(federation.num_clients, federation.fraction_train)
        if per_round < MIN_ROUND_CLIENTS:
            raise ValueError(
                f"secure=masking samples {per_round} clients a round here, and a node refuses masked rounds of fewer "
                f"than {MIN_ROUND_CLIENTS} (in a round of two, one colluding client gives the other's update away); "
                "raise federation.num_clients or federation.fraction_train."
            )

    def lora_rank(self, declared: int | None = None, source: str = "node config lora-rank") -> int:
        """The LoRA rank a client trains at: ``declared`` (a node's ``lora-rank``, a simulated client's entry
        in ``federation.client_ranks``, as ``source`` names), else ``lora.r``, the global adapter's rank.

        Raises:
            ValueError: ``declared`` above ``lora.r`` or below 1, or below ``lora.r`` with per-module rank or
                alpha patterns, or under organisation-level DP (a smaller client's update also zeroes the
                components it does not train, which would spend its clip norm on a data-independent term).
        """
        global_rank = int(self.cfg.lora.r)
        if declared is None or declared == global_rank:
            return global_rank
        if not 1 <= declared <= global_rank:
            raise ValueError(
                f"{source}: a client rank of {declared}, but client ranks lie between 1 and lora.r={global_rank}, "
                "the global adapter's rank (raise lora.r to the largest client rank)."
            )
        if self.cfg.lora.get("rank_pattern") or self.cfg.lora.get("alpha_pattern"):
            raise ValueError(
                f"{source}: client ranks below lora.r truncate every module to one rank, which lora.rank_pattern "
                "and lora.alpha_pattern contradict: remove them, or train every client at lora.r."
            )
        if self.privacy.organisation is not None:
            raise ValueError(
                f"{source}: a client rank of {declared} below lora.r={global_rank} with organisation-level DP: "
                "its update would zero the components it does not train, and clipping would spend the clip "
                "norm on that. Train every client at lora.r, or use privacy=dp_sgd."
            )
        return declared

    def simulated_rank(self, partition_id: int) -> int:
        """The LoRA rank of simulated client ``partition_id`` (``federation.client_ranks``, else ``lora.r``)."""
        ranks = self.federation.client_ranks
        return self.lora_rank(ranks[partition_id] if ranks is not None else None, "federation.client_ranks")

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer."""
        return load_tokenizer(self.model_spec)

    def model(self, rank: int | None = None) -> PeftModel:
        """The base model with LoRA, at ``rank`` (default ``lora.r``; cached per process; load an adapter
        into it before use). Each rank is its own copy of the base model: a process that simulates clients
        of several ranks holds one per rank (a deployed node trains at one)."""
        return self._model_and_initial_adapter(rank)[0]

    def initial_adapter(self) -> AdapterState:
        """The seeded initial adapter: the global adapter before round 1."""
        return self._model_and_initial_adapter()[1]

    def evaluate(self, adapter: AdapterState, dataset: datasets.Dataset, rank: int | None = None) -> dict[str, float]:
        """Metrics of the model with ``adapter`` (of LoRA rank ``rank``, default ``lora.r``) on ``dataset`` (a
        validation split or the central test set); a causal-LM corpus that names its answers (``label_names``:
        every response is one of them) also gets ``answer_accuracy``."""
        model = self.model(rank)
        set_adapter(model, adapter)
        task = self.corpus.task
        answers = self.label_names if task == "causal_lm" else None  # a causal corpus's closed answer set, if any
        return evaluate(model, dataset, task, self.tokenizer, self.model_spec.max_length, self.train_config, answers)

    def _model_and_initial_adapter(self, rank: int | None = None) -> tuple[PeftModel, AdapterState]:
        lora = fedtune_config.instantiate(self.cfg.lora)
        if rank is not None and rank != lora.r:  # PEFT's scaling the same at every rank (fedtune/ranks.py)
            ratio = (rank / lora.r) ** (0.5 if lora.use_rslora else 1.0)  # alpha/sqrt(r) with rsLoRA, else alpha/r
            lora = dataclasses.replace(lora, r=rank, lora_alpha=lora.lora_alpha * ratio)
        precision = self.train_config.precision
        return build_model(self.model_spec, lora, self.num_labels, self.cfg.seed, self.device, precision)


def get_experiment(cfg: DictConfig) -> Experiment:
    """The cached :class:`Experiment` for ``cfg`` in this process."""
    # The hash leaves out settings an Experiment still uses: the base's public name (in the adapter and model
    # card it writes), where the model files lie and the device (nodes in one process may differ in both)
    key = f"{fedtune_config.experiment_hash(cfg)} {cfg.model.get('public_name')} {cfg.model.path} {cfg.train.device}"
    if key not in _EXPERIMENTS:
        _EXPERIMENTS[key] = Experiment(cfg)
    return _EXPERIMENTS[key]
