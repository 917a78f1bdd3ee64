"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
NeurIPS 2025, https://arxiv.org/abs/2502.01755).

Rounds alternate between training B with A frozen and training A with B frozen. In either round one
factor is the same on every client, so the mean of the products is the product of the means: aggregation
is exact, and each upload is about half of FedAvg's. Unlike FFA-LoRA, A learns too. Linear, so it runs
under ``secure=masking``.

Odd rounds train B: PEFT initialises B to zero, and with B = 0 the gradient of A is zero, so a first
A-round would train nothing but the head.
"""

from __future__ import annotations

from fedtune.client_settings import ClientSettings
from strategies._client_side import ClientSideMethod


class RoLoRA(ClientSideMethod):
    """Alternate: B in odd rounds, A in even rounds (a classification head trains in every round).

    Args:
        server: The server's strategy (None: FedAvg).
    """

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Freeze A in odd rounds and B in even ones."""
        return ClientSettings(frozen=("lora_A",) if server_round % 2 == 1 else ("lora_B",))
