"""Shamir secret sharing (Shamir 1979) of 32-byte secrets over the prime field GF(2^521 - 1).

Any ``threshold`` shares reconstruct the secret; fewer reveal nothing about it. Secure aggregation
shares each client's mask seeds this way, so the server can remove the masks of clients that drop out.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 32-byte secret
SECRET_BYTES = 32
_X_BYTES, _Y_BYTES = 2, 66


class ShareError(ValueError):
    """Shares that cannot give a secret: too few, malformed, or inconsistent with each other."""


def split(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """Split ``secret`` into ``num_shares`` shares, share ``i`` (0-based) for the party with x = i + 1."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"Shamir secrets are {SECRET_BYTES} bytes, got {len(secret)}.")
    if not 1 <= threshold <= num_shares < 2 ** (8 * _X_BYTES):
        raise ValueError(f"Need 1 <= threshold ({threshold}) <= number of shares ({num_shares}).")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [_encode(x, _evaluate(coefficients, x)) for x in range(1, num_shares + 1)]


def combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """The secret behind at least ``threshold`` shares.

    Every share beyond the first ``threshold`` is checked against the polynomial those define, so a
    wrong share (a lying or faulty party) is detected instead of giving a wrong secret.

    Raises:
        ShareError: Too few shares, a malformed share, or shares that do not lie on one polynomial.
    """
    points = dict(_decode(share) for share in shares)
    if len(points) < threshold:
        raise ShareError(f"{len(points)} distinct shares, {threshold} are needed to reconstruct the secret.")
    xs = sorted(points)
    basis = xs[:threshold]
    for x in xs[threshold:]:
        if _interpolate({b: points[b] for b in basis}, x) != points[x]:
            raise ShareError(f"Share {x} is inconsistent with the others: a party sent a wrong share.")
    secret = _interpolate({b: points[b] for b in basis}, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShareError("The shares do not encode a 32-byte secret: a party sent a wrong share.")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate(points: dict[int, int], at: int) -> int:
    """Lagrange interpolation of the polynomial through ``points``, evaluated at ``at``."""
    total = 0
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _encode(x: int, y: int) -> bytes:
    return x.to_bytes(_X_BYTES, "big") + y.to_bytes(_Y_BYTES, "big")


def _decode(share: bytes) -> tuple[int, int]:
    if len(share) != _X_BYTES + _Y_BYTES:
        raise ShareError(f"A share is {_X_BYTES + _Y_BYTES} bytes, got {len(share)}.")
    x, y = int.from_bytes(share[:_X_BYTES], "big"), int.from_bytes(share[_X_BYTES:], "big")
    if x == 0 or y >= PRIME:
        raise ShareError("Malformed share (x = 0 or y outside the field).")
    return x, y
