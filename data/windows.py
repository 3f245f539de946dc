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
* An optimizer step takes the next ``G`` windows of that order (the global batch, in windows); it is
  made of ``G / (W * B)`` micro-steps (gradient accumulation), each of which takes the next ``W * B``
  windows (W = world size, B = batch size), rank r the r-th block of B. An epoch has ``N // G`` optimizer
  steps, i.e. ``S = (N // G) * G / (W * B)`` micro-steps; the last ``N mod G < G`` windows of each epoch's
  order are not used in that epoch (the next epoch's order differs, so no window is excluded forever),
  and every rank takes exactly S micro-steps per epoch. Which windows an optimizer step holds depends on
  G alone, not on W or B: a run can change its world size and continue with the same batches.
* Micro-steps are numbered globally across epochs (g = epoch * S + s). Dataloader worker k of K produces
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

    def take(self, idx) -> np.ndarray:
        return np.asarray(idx, dtype=np.int64)


class Schedule:
    """Maps a global step and a rank to window indices (the order is computed, never stored)."""

    def __init__(self, n_windows: int, batch_size: int, world_size: int, seed: int, shuffle: bool,
                 global_batch: int | None = None):
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        self.n_windows, self.batch_size, self.world_size = n_windows, batch_size, world_size
        self.seed, self.shuffle = seed, shuffle
        per_micro = world_size * batch_size
        global_batch = global_batch or per_micro
        #: micro-steps (of W x B windows) per epoch: whole optimizer steps of `global_batch` windows only
        self.steps_per_epoch = (n_windows // global_batch) * (global_batch // per_micro)
        self._epoch, self._order = None, None

    def _order_for(self, epoch: int):
        if epoch != self._epoch:
            self._order = epoch_order(self.n_windows, self.seed, epoch, self.shuffle)
            self._epoch = epoch
        return self._order

    def windows(self, step: int, rank: int) -> np.ndarray:
        """Window indices (length batch_size) that `rank` takes at global step `step`."""
        return self.windows_for_steps([step], rank)[0]

    def windows_for_steps(self, steps, rank: int) -> np.ndarray:
        """``[len(steps), batch_size]`` window indices of `rank` at each global step, computed together.

        One vectorised permutation evaluation per epoch touched instead of one per batch: evaluating
        the Feistel network costs about the same for 8 positions as for thousands.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        steps = np.asarray(steps, dtype=np.int64)
        epochs, s = np.divmod(steps, self.steps_per_epoch)
        pos = ((s * self.world_size + rank) * self.batch_size)[:, None] + np.arange(self.batch_size)
        out = np.empty(pos.shape, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            order = self._order_for(int(e))
            out[sel] = order.take(pos[sel].ravel()).reshape(-1, self.batch_size)
        return out


def worker_steps(start_step: int, worker_id: int, num_workers: int):
    """Global steps produced by dataloader worker `worker_id` of `num_workers`, in order, forever.

    (Consumers take them in blocks, see `Schedule.windows_for_steps`.)"""
    step = start_step + worker_id
    while True:
        yield step
        step += num_workers
