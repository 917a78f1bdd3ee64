"""Seeds: reproducible streams for training, and secret ones for differential-privacy noise."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import torch

NOISE_SECRET = "noise_secret"  # key of the secret in a privacy state


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the experiment seed and context (round, client): independent streams, reproducible."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def noise_generator(state: dict[str, Any], reproducible_from: int | None, *context: object) -> torch.Generator:
    """The generator for DP noise and sampling in ``context`` (round, client...).

    DP noise must be unpredictable to whoever could subtract it: seeded from the public config, the server
    (or anyone holding the config) could regenerate the noise and remove it. So by default the seed comes
    from a random secret created once and kept in ``state`` (the owner's privacy state, never sent). A
    replayed round uses the same secret and gives the same noise. ``reproducible_from`` (the config seed)
    opts out, for research simulations only.
    """
    if reproducible_from is not None:
        return torch.Generator().manual_seed(derive_seed(reproducible_from, "noise", *context))
    secret = state.setdefault(NOISE_SECRET, secrets.token_hex(32))
    return torch.Generator().manual_seed(derive_seed(secret, *context))
