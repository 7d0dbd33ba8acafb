"""Pure seeded hashes: the same (seed, index) gives the same draw in every process, worker and resumed run.

They decide the validation split (`val_lines`, before tokenizing), the tokenizer's training sample (`uniform`)
and each example's masks (`mask_seed`), so none of them depends on batch size, worker count or process count.
"""

from __future__ import annotations

import numpy as np


def mask_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example in one epoch (SplitMix64-style mixing of the three ints)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEDA3A1F9D5B) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrapping arithmetic): a cheap, well-mixed seeded hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform(seed: int, index) -> np.ndarray:
    """A seeded uniform draw in [0, 1) per index: a pure function of (seed, index)."""
    with np.errstate(over="ignore"):
        k = np.asarray(index).astype(np.uint64)
        h = _mix(k + np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15))
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


def val_lines(seed: int, start: int, count: int, fraction: float) -> np.ndarray:
    """Which of lines `start .. start+count-1` (indices in the corpus stream) are validation lines.

    The stream is cut into blocks of 1/fraction lines and one seeded position per block is held out: a pure
    function of (seed, line index), decided before tokenizing, that holds out almost exactly `fraction` of
    any corpus (Bernoulli draws would leave a small corpus with none) and spreads them over the whole corpus.
    """
    i = np.arange(start, start + count, dtype=np.int64)
    if fraction <= 0 or count == 0:
        return np.zeros(count, dtype=bool)
    block = 1.0 / fraction
    out = np.zeros(count, dtype=bool)
    for k in (np.floor(i / block).astype(np.int64), np.floor(i / block).astype(np.int64) + 1):
        out |= np.floor(k * block + uniform(seed, k) * block).astype(np.int64) == i
    return out
