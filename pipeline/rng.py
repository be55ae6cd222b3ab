"""Randomness from (seed, key, purpose) only: never from a global RNG.

A sample's partner, texture and noise fill depend on nothing but the build
seed and the sample key, so any worker on any machine draws the same values.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, key: str, purpose: str) -> np.random.Generator:
    """A Generator determined by ``(seed, key, purpose)``."""
    digest = hashlib.sha256(f"{purpose}\x00{key}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words])))
