"""Which token windows make up an epoch, and which rank / step / worker gets which — pure arithmetic.

Rules (also in data/README.md):

* The split's shards, in manifest order, form one token stream of T tokens.
* Window i holds tokens ``[i*L, i*L + L + 1)`` (L = seq_len): inputs are the first L tokens, targets the
  last L. Consecutive windows share one token and never overlap otherwise. There are
  ``N = (T - 1) // L`` windows: the last partial window is dropped only when fewer than L + 1 tokens
  remain for it (at most L tokens of the stream are never a target).
* Each epoch orders the N windows by a permutation seeded by ``(seed, epoch)`` (identity when
  shuffle is off), so every epoch has a new, reproducible order. The permutation is a function
  evaluated per position (data/permutation.py), so no process stores an N-long order.
* A global step takes the next ``W * B`` windows of that order (W = world size, B = batch size); rank r
  takes the r-th block of B. An epoch has ``S = N // (W * B)`` steps; the last ``N - S*W*B < W*B``
  windows of each epoch's order are not used in that epoch (the next epoch's order differs, so no
  window is excluded forever), and every rank takes exactly S steps per epoch.
* Steps are numbered globally across epochs (g = epoch * S + s). Dataloader worker k of K produces
  steps ``g0 + k, g0 + k + K, ...`` (g0 = first step of this iteration), which is the order in which
  torch's DataLoader collects worker outputs, so batches come out in step order for any K.
"""

from __future__ import annotations

import numpy as np

from data.permutation import Permutation


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Number of (seq_len + 1)-token windows with stride seq_len in a stream of `num_tokens`."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(0, (num_tokens - 1) // seq_len)


def epoch_order(n_windows: int, seed: int, epoch: int, shuffle: bool):
    """The window order of one epoch, indexable by position (``order[a:b]`` -> int64 array).

    A seeded O(1)-memory permutation (data/permutation.py) when shuffling, else the identity.
    """
    return Permutation(n_windows, seed, epoch) if shuffle else _Identity(n_windows)


class _Identity:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        return np.arange(*key.indices(self.n), dtype=np.int64)


class Schedule:
    """Maps a global step and a rank to window indices (the order is computed, never stored)."""

    def __init__(self, n_windows: int, batch_size: int, world_size: int, seed: int, shuffle: bool):
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        self.n_windows, self.batch_size, self.world_size = n_windows, batch_size, world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = n_windows // (world_size * batch_size)
        self._epoch, self._order = None, None

    def windows(self, step: int, rank: int) -> np.ndarray:
        """Window indices (length batch_size) that `rank` takes at global step `step`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        epoch, s = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = epoch_order(self.n_windows, self.seed, epoch, self.shuffle)
            self._epoch = epoch
        start = (s * self.world_size + rank) * self.batch_size
        return np.asarray(self._order[start:start + self.batch_size], dtype=np.int64)


def worker_steps(start_step: int, worker_id: int, num_workers: int):
    """Global steps produced by dataloader worker `worker_id` of `num_workers`, in order, forever."""
    step = start_step + worker_id
    while True:
        yield step
        step += num_workers
