"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313).

LoRA's A stays frozen at the shared seeded initialisation; clients train and upload only B (and a
classification head). With A the same everywhere, the mean of the products B_i A is the product of the
mean B and A: aggregation is exact, and the upload is about half of FedAvg's. Linear, so it runs under
``secure=masking``. The paper pairs it with a larger learning rate than LoRA's (their grid: 10x).
"""

from __future__ import annotations

from fedtune.client_settings import ClientSettings
from strategies._client_side import ClientSideMethod


class FFALoRA(ClientSideMethod):
    """Freeze A, federate B.

    Args:
        server: The server's strategy (None: FedAvg).
    """

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client keeps ``lora_A`` frozen."""
        return ClientSettings(frozen=("lora_A",))
