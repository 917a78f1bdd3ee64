"""Fixed-point encoding of example-weighted adapter updates as integers mod 2^32.

A client encodes ``weight * update`` (flattened in sorted tensor order) followed by ``weight`` itself,
as 32-bit two's-complement integers with a common ``scale``. Masks are added mod 2^32, so the masked
upload is exactly as large as the float32 update (plus one slot for the weight). The scale is chosen so
that the sum over all clients of the round cannot overflow: each client's values lie within
``±value_range`` and its weight within ``max_weight``, so ``|sum| <= clients * max_weight * value_range``,
which must fit below 2^31. A value outside those ranges is an error, never clipped.

Decoding is exact up to rounding: each client's encoded values are off by at most ``0.5 / scale``, so
the decoded weighted mean is within ``clients / (2 * scale * total_weight)`` of the plaintext one per
coordinate (:meth:`FixedPoint.error_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.adapters import AdapterState

MODULUS_BITS = 32
_LIMIT = 2 ** (MODULUS_BITS - 1) - 1


@dataclass(frozen=True)
class FixedPoint:
    """A fixed-point code for one round.

    Args:
        scale: Integer units per unit of ``weight * value``.
        value_range: Largest absolute value of an update coordinate that may be encoded.
        max_weight: Largest client weight (training example count) that may be encoded.
    """

    scale: float
    value_range: float
    max_weight: int

    @classmethod
    def for_round(cls, value_range: float, max_weight: int, num_clients: int) -> FixedPoint:
        """The finest scale for which the sum of ``num_clients`` encoded updates cannot overflow.

        Raises:
            ValueError: Even a scale of 1 could overflow; the message names the settings to lower.
        """
        scale = math.floor(_LIMIT / (num_clients * max_weight * value_range))
        if scale < 1:
            raise ValueError(
                f"{num_clients} clients x secure.max_examples={max_weight} x secure.value_range={value_range} "
                f"exceeds what a {MODULUS_BITS}-bit sum can hold; lower secure.max_examples or secure.value_range."
            )
        return cls(float(scale), value_range, max_weight)

    def encode(self, update: Mapping[str, torch.Tensor], weight: int) -> np.ndarray:
        """``weight * update`` and ``weight`` as uint32 (two's complement), length = parameters + 1.

        Raises:
            ValueError: A non-finite value, a value outside ``±value_range`` or a weight outside
                ``1..max_weight``; the message names the setting to change.
        """
        if not 1 <= weight <= self.max_weight:
            raise ValueError(
                f"This client has {weight} training examples; secure aggregation is set up for at most "
                f"secure.max_examples={self.max_weight}. Raise secure.max_examples (costs precision)."
            )
        values = flatten(update)
        largest = float(np.abs(values).max(initial=0.0))  # NaN or inf propagate to here
        if not math.isfinite(largest):
            raise ValueError("The update holds NaN or infinite values; it cannot be encoded.")
        if largest > self.value_range:
            raise ValueError(
                f"An update value of magnitude {largest:.4g} lies outside secure.value_range={self.value_range}; "
                "raise secure.value_range (costs precision) or lower train.learning_rate."
            )
        values *= weight * self.scale  # |values| < 2^31 now (for_round's scale), so int32 holds them exactly
        encoded = np.empty(len(values) + 1, dtype=np.int32)
        encoded[:-1] = np.rint(values, out=values)
        encoded[-1] = weight
        return encoded.view(np.uint32)  # two's complement: negative values wrap mod 2^32

    def decode(self, total: np.ndarray, template: Mapping[str, torch.Tensor]) -> tuple[AdapterState, int]:
        """The weighted sum (float64 tensors shaped like ``template``) and the total weight in ``total``."""
        expected = num_slots(template)
        if total.dtype != np.uint32 or total.shape != (expected,):
            raise ValueError(f"An aggregate must be {expected} uint32 values, got {total.dtype} {total.shape}.")
        signed = total.view(np.int32).astype(np.float64)
        weighted, weight = signed[:-1] / self.scale, int(total[-1])
        summed, offset = {}, 0
        for key in sorted(template):
            count = template[key].numel()
            summed[key] = torch.from_numpy(weighted[offset : offset + count].copy()).reshape(template[key].shape)
            offset += count
        return summed, weight

    def error_bound(self, num_clients: int, total_weight: int) -> float:
        """Largest absolute error per coordinate of the decoded weighted mean against the plaintext one."""
        return num_clients / (2 * self.scale * total_weight)


def flatten(update: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All tensors of ``update`` in sorted key order, as one float64 vector."""
    return np.concatenate([update[key].detach().to(torch.float64).reshape(-1).numpy() for key in sorted(update)])


def num_slots(template: Mapping[str, torch.Tensor]) -> int:
    """Length of an encoded update: every parameter plus the weight."""
    return sum(t.numel() for t in template.values()) + 1
