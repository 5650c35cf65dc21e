"""Fixed, platform-independent 64-bit hashing (SplitMix64) for seeded, batch-independent randomness."""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(z).astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each element: SplitMix64's step (add the golden gamma, then mix)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(x).astype(np.uint64) + GOLDEN)


# Each use of a seed XORs its own tag in before hashing, so that no two uses (the train/validation
# split, bootstrap replicates, --equal-n order, null groups) ever draw the same stream.
PURPOSE_TAGS = {
    "bootstrap": np.uint64(0xB0075A4B1E5EED01),
    "order": np.uint64(0x0DE4E45A3B1E5EED),
    "null": np.uint64(0x2B11C0DE5EED0F00),
}


def salt(seed: int, purpose: str, index: np.ndarray | int = 0) -> np.ndarray:
    """A uint64 salt per ``index`` for ``purpose`` ("bootstrap", "order", "null"), fixed by ``seed``."""
    with np.errstate(over="ignore"):
        base = splitmix64(np.asarray([seed], dtype=np.uint64) ^ PURPOSE_TAGS[purpose])
        return splitmix64(base + np.asarray(index, dtype=np.uint64))


def unit_interval(z: np.ndarray) -> np.ndarray:
    """uint64 hashes -> uniform float64 in [0, 1) (the top 53 bits)."""
    return (np.asarray(z, np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
