"""How the federation runs: clients, rounds and sampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Federation:
    """Federation settings (config group ``federation``).

    Args:
        num_clients: Number of simulated clients (SuperNodes). In a deployment, the nodes that connect.
        num_rounds: Federated rounds to run.
        fraction_train: Fraction of available clients sampled to train each round.
        fraction_evaluate: Fraction of available clients sampled for federated evaluation each round.
        min_train_clients: A round fails unless at least this many clients return an update.
        min_evaluate_clients: Federated evaluation is skipped for a round with fewer replies.
        round_timeout: Seconds the server waits for replies in each step of a round.
        cpus_per_client: CPU cores reserved per simulated client (Ray resources).
        gpus_per_client: Share of a GPU reserved per simulated client (Ray resources; 0.25 runs four clients
            on one GPU at a time). With 0, simulated clients see no GPU and train on the CPU.
        evaluate_every: Evaluate (federated and central) every this many rounds, and after the last round.
        connect_timeout: Seconds the server waits at start for all ``num_clients`` nodes to connect.
        trusted_keys: JSON file of node name -> Ed25519 public key (``fedtune identity`` writes it). Only
            these nodes are admitted. Without it each node's key is pinned when the run starts. Read by the
            server only (nodes compose the same config but need not hold the file).
        server_identity_key: The server's Ed25519 key file, which signs every ledger entry (created with
            mode 0600 on first use). None: ``$FEDTUNE_CACHE/server-identity.pem``. Publish its public key
            (``fedtune identity server KEY_FILE`` prints it) so that auditors can pin it.
        client_ranks: The LoRA rank each simulated client trains at (partition i at ``client_ranks[i]``, at
            most ``lora.r``, the global adapter's rank; fedtune/ranks.py). None: every client at ``lora.r``.
            A deployed node sets its own with node config ``lora-rank``.

    Raises:
        ValueError: If a value is out of range; the message names the key.
    """

    num_clients: int = 4
    num_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 1
    round_timeout: float = 3600.0
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    evaluate_every: int = 1
    connect_timeout: float = 600.0
    trusted_keys: str | None = None
    server_identity_key: str | None = None
    client_ranks: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", tuple(int(rank) for rank in self.client_ranks))
            if len(self.client_ranks) != self.num_clients or min(self.client_ranks) < 1:
                raise ValueError(
                    f"federation.client_ranks={list(self.client_ranks)}: give one rank >= 1 per client "
                    f"(federation.num_clients={self.num_clients}), or null for lora.r everywhere."
                )
        checks = {
            "num_clients": self.num_clients >= 1,
            "num_rounds": self.num_rounds >= 1,
            "fraction_train": 0 < self.fraction_train <= 1,
            "fraction_evaluate": 0 <= self.fraction_evaluate <= 1,
            "min_train_clients": 1 <= self.min_train_clients <= self.num_clients,
            "min_evaluate_clients": 0 <= self.min_evaluate_clients <= self.num_clients,
            "round_timeout": self.round_timeout > 0,
            "cpus_per_client": self.cpus_per_client > 0,
            "gpus_per_client": self.gpus_per_client >= 0,
            "evaluate_every": self.evaluate_every >= 1,
            "connect_timeout": self.connect_timeout >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"federation.{key}={getattr(self, key)} is out of range "
                    f"(num_clients={self.num_clients}); fractions lie in (0, 1], minimums between 1 and num_clients."
                )

    def evaluates_after(self, server_round: int) -> bool:
        """Whether evaluation runs after ``server_round``."""
        return server_round % self.evaluate_every == 0 or server_round == self.num_rounds

    def num_sampled(self, available: int, fraction: float) -> int:
        """How many of ``available`` clients to sample for a step with the given fraction (at least one)."""
        return max(1, min(available, round(available * fraction)))

    def planned_train_clients(self) -> int:
        """A training round's size as the config plans it, whoever connects: public, so organisation-level DP
        samples that many and divides the sum by it."""
        return self.num_sampled(self.num_clients, self.fraction_train)
