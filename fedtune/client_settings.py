"""What a strategy tells a client for one round, beside the global adapter (the downlink).

A strategy's ``configure(server_round, client)`` returns these; the server sends them with the train
message and the client trains and uploads accordingly. Methods that change what clients do (FedProx's
proximal term, FFA-LoRA's frozen A, RoLoRA's alternation) are then a strategy file, not edits to the client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from fedtune.adapters import AdapterState, is_residual


@dataclass(frozen=True)
class ClientSettings:
    """One client's settings for one round.

    Args:
        frozen: Name fragments of adapter tensors (such as ``lora_A``) the client keeps at the global value:
            they are not trained and not uploaded (their update is zero by construction).
        proximal_mu: FedProx's mu: the client minimises its loss plus ``mu/2 ||w - w_global||^2`` over the
            adapter (0 = plain local training).
        local: Name fragments of adapter tensors the client keeps for itself (FedSA-LoRA's B and head): it
            trains them from its own copy, never uploads them, and evaluates with them.

    Raises:
        ValueError: A negative or non-finite mu, or an empty fragment.
    """

    frozen: tuple[str, ...] = ()
    proximal_mu: float = 0.0
    local: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "local", tuple(self.local))
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu={self.proximal_mu}: must be a finite number >= 0.")
        if any(not fragment for fragment in (*self.frozen, *self.local)):
            raise ValueError("frozen or local holds an empty name fragment, which would match every tensor.")

    def uploads(self, key: str) -> bool:
        """Whether the adapter tensor ``key`` is trained and uploaded this round (a residual never is)."""
        return not (is_residual(key) or self.keeps(key) or any(fragment in key for fragment in self.frozen))

    def keeps(self, key: str) -> bool:
        """Whether the client keeps the adapter tensor ``key`` for itself (trained, never uploaded)."""
        return any(fragment in key for fragment in self.local)

    def kept(self, adapter: Mapping[str, torch.Tensor]) -> AdapterState:
        """The tensors of ``adapter`` the client keeps for itself."""
        return {key: tensor for key, tensor in adapter.items() if self.keeps(key)}

    def uploaded(self, adapter: Mapping[str, torch.Tensor]) -> AdapterState:
        """The tensors of ``adapter`` that are uploaded this round (the layout of every update)."""
        return {key: tensor for key, tensor in adapter.items() if self.uploads(key)}

    def check(self, adapter: Mapping[str, torch.Tensor]) -> None:
        """Refuse settings that freeze nothing they name, or everything.

        Raises:
            ValueError: A fragment that matches no tensor of ``adapter`` (a typo would train everything), or
                one that leaves nothing to upload.
        """
        for fragment in self.frozen:
            if not any(fragment in key for key in adapter):
                raise ValueError(
                    f"frozen fragment {fragment!r} matches no adapter tensor (e.g. {next(iter(adapter))})."
                )
        if not self.uploaded(adapter):
            raise ValueError(f"frozen={list(self.frozen)} freezes every adapter tensor: nothing would be trained.")

    def to_json(self) -> str:
        """The wire form (one string in the train message's config record)."""
        return json.dumps({**asdict(self), "frozen": list(self.frozen), "local": list(self.local)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientSettings:
        """Parse the wire form; unknown fields are refused (a newer server than this client)."""
        fields = json.loads(text)
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown client settings {sorted(unknown)}: this node runs an older fedtune than the server."
            )
        return cls(
            frozen=tuple(fields.get("frozen", ())),
            proximal_mu=float(fields.get("proximal_mu", 0.0)),
            local=tuple(fields.get("local", ())),
        )
