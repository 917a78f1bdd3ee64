"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025,
https://arxiv.org/abs/2410.01463).

Guo et al. find that LoRA's A learns what clients share and B what is specific to each: clients train
both, but upload only A; each keeps its own B (and here its classification head) across rounds, on its
own disk, so that a resumed run continues from the same tensors. There is no single global model: the
server's adapter holds the mean A with B and the head at their initial values, and evaluation is
personalised (each client's own B and head on its own validation split, the federated metrics); the
model card says so. Uploads A only, so it runs under ``secure=masking``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.client_settings import ClientSettings
from fedtune.interfaces import Strategy
from strategies._client_side import ClientSideMethod


class FedSALoRA(ClientSideMethod):
    """Share A, keep B (and the head) on each client.

    Args:
        local: Name fragments of the tensors each client keeps (``[lora_B, classifier]``; a causal LM has no
            classifier: ``[lora_B]``).
        server: The server's strategy for A (None: FedAvg).
    """

    def __init__(self, local: Sequence[str] = ("lora_B", "classifier"), server: Strategy | None = None) -> None:
        super().__init__(server)
        self.local = tuple(local)

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client keeps its own B and head."""
        return ClientSettings(local=self.local)
