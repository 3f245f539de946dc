"""Where the token batches come from: the data package's resumable loader, split by rank."""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import ConfigError, PretrainConfig


def build_loader(*args, **kwargs):
    """`data.loader.build_loader` (imported late so that `--help` works without the data package)."""
    from data.loader import build_loader as _build

    return _build(*args, **kwargs)


def make_loader(cfg: PretrainConfig, split: str, batch_size: int, rank: int, world_size: int, shuffle: bool):
    data_dir = Path(cfg.data.dir)
    if not data_dir.is_dir():
        raise ConfigError(f"data.dir={data_dir}: no such folder; prepare one with `python -m data.prepare`")
    return build_loader(str(data_dir), split, cfg.data.seq_len, batch_size, rank=rank, world_size=world_size,
                        num_workers=cfg.data.num_workers, seed=cfg.seed, shuffle=shuffle)


class BatchStream:
    """Endless stream of training batches from a resumable loader (starts a new pass when one ends)."""

    def __init__(self, loader, vocab_size: int, seq_len: int) -> None:
        self.loader = loader
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self._it = None

    def next(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            batch = next(self._it)
        check_batch(batch, self.vocab_size, self.seq_len)
        return batch

    # checkpoints hold the loader's own state: the position of the next batch
    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def check_batch(batch: torch.Tensor, vocab_size: int, seq_len: int) -> None:
    """Catch data/model mismatches on the CPU, before CUDA turns them into device-side asserts."""
    if batch.dim() != 2 or batch.shape[1] != seq_len + 1:
        raise ValueError(f"loader yielded a batch of shape {tuple(batch.shape)}, expected (B, data.seq_len + 1 = "
                         f"{seq_len + 1})")
    if batch.device.type == "cpu":
        hi = int(batch.max())
        if hi >= vocab_size:
            raise ValueError(f"token id {hi} >= the model's vocabulary ({vocab_size}): the tokenizer of data.dir "
                             f"does not match the model; set model.overrides.vocab_size")


def take_batches(loader, n: int) -> list[torch.Tensor]:
    """The first n batches of a (validation) loader, kept so that every evaluation sees the same ones."""
    out = []
    for batch in loader:
        if len(out) >= n:
            break
        out.append(batch)
    return out
