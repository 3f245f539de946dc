"""The training/validation loader: ``build_loader(data_dir, split, seq_len, batch_size, ...)``.

Iterating the returned `TokenLoader` yields ``LongTensor[batch_size, seq_len + 1]`` forever (epochs
follow each other, each with a new seeded order); ``batch[:, :-1]`` are inputs, ``batch[:, 1:]``
targets. Which windows form a batch is defined in data/windows.py: an epoch, over all ranks and
dataloader workers together, yields every used window exactly once.

Resume: the loader counts the batches it has *handed to the caller* (not what workers prefetched), and
``state_dict()`` stores the data position globally: the epoch and how many windows of that epoch's order
all ranks together have consumed. ``load_state_dict()`` makes the next iteration start at exactly the
next window; it jumps there by arithmetic, without reading any consumed tokens. The position does not
depend on the world size, batch size, gradient accumulation or worker count, so a run saved on W ranks
continues on W' ranks with the same windows in each optimizer step (the global batch, in windows, is
what defines an epoch's steps: `global_batch`).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.errors import DataError
from data.manifest import check_shards, check_tokenizer, load_complete_manifest
from data.stream import TokenStream
from data.windows import Schedule, num_windows, worker_steps

SPLITS = ("train", "val")
STATE_VERSION = 2
STEP_BLOCK = 256


class WindowDataset(IterableDataset):
    """Yields this rank's batches from global step `start_step` on, split across dataloader workers."""

    def __init__(self, stream: TokenStream, seq_len: int, schedule: Schedule, rank: int, start_step: int):
        self.stream, self.seq_len, self.schedule = stream, seq_len, schedule
        self.rank, self.start_step = rank, start_step

    def batch(self, windows) -> torch.Tensor:
        L = self.seq_len
        rows = [self.stream.read(int(w) * L, L + 1) for w in windows]
        return torch.from_numpy(np.stack(rows))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        k, K = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = worker_steps(self.start_step, k, K)
        while True:  # window indices for STEP_BLOCK of this worker's steps at a time (cheap), tokens per batch
            block = self.schedule.windows_for_steps(list(itertools.islice(steps, STEP_BLOCK)), self.rank)
            for windows in block:
                yield self.batch(windows)


class TokenLoader:
    """Infinite, resumable iterator over one split for one rank. Build it with `build_loader`."""

    def __init__(self, data_dir, split, seq_len, batch_size, rank=0, world_size=1, num_workers=0, seed=0,
                 shuffle=None, tokenizer=None, global_batch=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split_dir = Path(data_dir) / split
        self.manifest = load_complete_manifest(self.split_dir)
        if tokenizer is not None:
            check_tokenizer(self.manifest, tokenizer, self.split_dir / "manifest.json")
        self.stream = TokenStream(check_shards(self.split_dir, self.manifest))
        self.split, self.seq_len, self.batch_size = split, int(seq_len), int(batch_size)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.seed = int(seed)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.num_tokens = self.stream.num_tokens
        self.windows_per_epoch = num_windows(self.num_tokens, self.seq_len)
        #: windows per micro-step over all ranks (world_size x batch_size)
        self.windows_per_batch = self.world_size * self.batch_size
        #: windows per optimizer step over all ranks (world_size x batch_size x gradient accumulation)
        self.global_batch = int(global_batch or self.windows_per_batch)
        if self.global_batch % self.windows_per_batch:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of world_size x batch_size = "
                             f"{self.world_size} x {self.batch_size}")
        self.schedule = Schedule(self.windows_per_epoch, self.batch_size, self.world_size, self.seed, self.shuffle,
                                 self.global_batch)
        self.steps_per_epoch = self.schedule.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise DataError(self.split_dir, f"too little data: {self.num_tokens} tokens make "
                            f"{self.windows_per_epoch} windows of seq_len {self.seq_len}, fewer than one global "
                            f"batch of {self.global_batch} windows")
        #: windows of each epoch's order that no rank sees in that epoch (< global_batch)
        self.windows_left_out_per_epoch = self.windows_per_epoch - self.steps_per_epoch * self.windows_per_batch
        self.batches_consumed = 0

    # -- iteration ------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next batch (0-based)."""
        return self.batches_consumed // self.steps_per_epoch

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def __iter__(self) -> Iterator[torch.Tensor]:
        ds = WindowDataset(self.stream, self.seq_len, self.schedule, self.rank, self.batches_consumed)
        if self.num_workers > 0:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, in_order=True))
        else:
            it = iter(ds)
        for batch in it:
            self.batches_consumed += 1  # counted when handed out, so prefetched batches are not
            yield batch

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The global data position (see the module docstring) and what the window order depends on."""
        epoch, step = divmod(self.batches_consumed, self.steps_per_epoch)
        return {"version": STATE_VERSION, "epoch": epoch, "position": step * self.windows_per_batch,
                "windows_consumed": self.batches_consumed * self.windows_per_batch, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "num_tokens": self.num_tokens, "split": self.split}

    def load_state_dict(self, sd: dict) -> None:
        """Continue at the window after the last one counted in `sd`. Takes effect at the next iter()."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')} != {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "seq_len", "num_tokens", "split"):
            if sd[key] != mine[key]:
                raise ValueError(f"loader state has {key}={sd[key]!r} but this loader has {mine[key]!r}; "
                                 "resuming would not continue the same sequence of windows")
        epoch, position = int(sd["epoch"]), int(sd["position"])
        if position >= self.steps_per_epoch * self.windows_per_batch:  # a larger global batch: a shorter epoch
            epoch, position = epoch + 1, 0
        if position % self.global_batch:
            raise ValueError(f"the saved position ({position} windows into epoch {epoch}) is not a whole number of "
                             f"global batches of {self.global_batch} windows (did the global batch change?)")
        self.batches_consumed = epoch * self.steps_per_epoch + position // self.windows_per_batch

    def __repr__(self) -> str:
        return (f"TokenLoader({self.split_dir}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, workers={self.num_workers}, tokens={self.num_tokens}, "
                f"windows_per_epoch={self.windows_per_epoch}, steps_per_epoch={self.steps_per_epoch})")


def build_loader(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool | None = True,
                 tokenizer=None, global_batch: int | None = None) -> TokenLoader:
    """Loader over ``data_dir/split`` prepared by ``python -m data.prepare --out data_dir``.

    `shuffle` applies to the train split; the val split is always read in stream order (deterministic).
    `tokenizer` (optional, a model path or data.tokenizer.Tokenizer) is checked against the manifest.
    `global_batch`: windows per optimizer step over all ranks (default world_size x batch_size).
    """
    if split == "val":
        shuffle = False
    return TokenLoader(data_dir, split, seq_len, batch_size, rank, world_size, num_workers, seed, shuffle, tokenizer,
                       global_batch)


def val_batches(data_dir: str | os.PathLike, seq_len: int, batch_size: int, num_batches: int | None = None,
                rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """The first `num_batches` batches of the val split for this rank (all of one pass if None).

    Always the same batches (no shuffle), so validation losses are comparable across steps and runs.
    """
    loader = build_loader(data_dir, "val", seq_len, batch_size, rank, world_size, num_workers=0)
    n = loader.steps_per_epoch if num_batches is None else int(num_batches)
    if n > loader.steps_per_epoch:
        raise DataError(loader.split_dir, f"asked for {n} val batches but one pass has only "
                                          f"{loader.steps_per_epoch} (seq_len {seq_len}, batch {batch_size}, "
                                          f"world size {world_size})")
    it = iter(loader)
    return [next(it) for _ in range(n)]
