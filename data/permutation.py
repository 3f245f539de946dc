"""A seeded pseudo-random permutation of range(n) evaluated element-wise in O(1) memory.

Why not ``np.random.permutation(n)``: at pretraining scale an epoch has 10^8-10^9 windows, and every
rank x dataloader worker would hold its own copy of the order (4-8 bytes per window each, e.g. 600 MB
per process for 600 B tokens at seq_len 4096). Here the order is a function: a balanced Feistel network
on 2k-bit integers (a bijection of [0, 4^k) for any round keys), restricted to [0, n) by cycle walking
(re-apply until the value falls below n, which keeps it a bijection of [0, n)). 4^k < 4n, so on average
fewer than 4 applications per element. Round keys come from numpy's seeded generator.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
ROUNDS = 6


def _mix(x: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of (x, key), truncated to the half width."""
    with np.errstate(over="ignore"):
        z = (x + key) * _GOLD
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z & mask


class Permutation:
    """``Permutation(n, seed, epoch)[i]`` / ``[a:b]`` / ``[array]``: the i-th element of the order."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 0:
            raise ValueError("n must be >= 0")
        self.n = int(n)
        bits = max(2, int(self.n - 1).bit_length()) if self.n > 1 else 2
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, size=ROUNDS, dtype=np.int64)]

    def __len__(self) -> int:
        return self.n

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ _mix(right, k, self.mask)
        return (left << h) | right

    def take(self, idx) -> np.ndarray:
        """Elements at positions `idx` (array-like of ints in [0, n)) as int64."""
        x = np.asarray(idx, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        y = self._feistel(x.astype(np.uint64))
        n = np.uint64(self.n)
        out_of_range = y >= n
        while out_of_range.any():  # cycle walking
            y[out_of_range] = self._feistel(y[out_of_range])
            out_of_range = y >= n
        return y.astype(np.int64)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(self.n), dtype=np.int64))
        if np.isscalar(key):
            return int(self.take([key])[0])
        return self.take(key)
