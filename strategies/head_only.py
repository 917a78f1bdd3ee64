"""Head only (linear probing): the LoRA matrices stay at their shared initialisation (B = 0, so the base
model's features are untouched); clients train and upload only the classification head.

Tramèr and Boneh ("Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021,
https://arxiv.org/abs/2011.11660) found linear models on fixed pretrained features beat end-to-end DP-SGD at
moderate privacy budgets. Under DP-SGD every trained value gets the full noise while, for MiniLM with LoRA
on query and value, the head carries about 99% of each record's gradient norm
(``benchmarks/dp_signal.py``): the LoRA matrices' run-level signal-to-noise stays below 0.5 in every
batch size and budget measured, so training them mostly adds noise to the features the head reads. Linear,
so it runs under ``secure=masking``; the upload is the head alone. Classifiers only: a causal LM has no head
to train, and the client refuses settings that would train nothing.
"""

from __future__ import annotations

from fedtune.client_settings import ClientSettings
from strategies._client_side import ClientSideMethod


class HeadOnly(ClientSideMethod):
    """Freeze every LoRA matrix, federate the head.

    Args:
        server: The server's strategy (None: FedAvg).
    """

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client keeps ``lora_A`` and ``lora_B`` frozen."""
        return ClientSettings(frozen=("lora_A", "lora_B"))
