"""Randomness from (seed, key, purpose) only: never from a global RNG.

A sample's partner, texture and noise fill depend on nothing but the build
seed and the sample key, so any worker on any machine draws the same values.
The plan's single draws (a partner, a texture, the per-class order; millions
for ImageNet train) come straight from a SHA-256 of ``(seed, purpose, key)``;
pixel work that needs many numbers (noise fills, texture crops, GrabCut)
gets a numpy Generator seeded the same way.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, key: str, purpose: str) -> np.random.Generator:
    """A Generator determined by ``(seed, key, purpose)``."""
    digest = hashlib.sha256(f"{purpose}\x00{key}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words])))


def _word(seed: int, key: str, purpose: str) -> int:
    """64 uniform bits from ``(seed, key, purpose)``."""
    digest = hashlib.sha256(f"{int(seed) & 0xFFFFFFFF}\x00{purpose}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_index(seed: int, key: str, purpose: str, n: int) -> int:
    """Uniform in ``[0, n)``: the 64-bit word scaled by ``n`` (bias below ``n / 2**64``).

    About a microsecond, against some 80 for building a Generator to draw one number.
    """
    if n < 1:
        raise ValueError(f"draw_index needs n >= 1, got {n}")
    return (_word(seed, key, purpose) * n) >> 64


def draw_unit(seed: int, key: str, purpose: str) -> float:
    """Uniform in ``[0, 1)`` with 53 bits, like ``Generator.random()``."""
    return (_word(seed, key, purpose) >> 11) * 2.0**-53
