"""Where the token batches come from: the data package's resumable loader, split by rank.

Training: each optimizer step takes the next `train.global_batch_tokens / data.seq_len` windows of the
epoch's order, whatever the world size (data/windows.py); the position saved in checkpoints is global.
Validation: the first `eval.batches × eval.micro_batch_size` windows of the val split, dealt round-robin
to the ranks, so every world size evaluates the same sequences.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from data.errors import DataError
from pretrain.config import PretrainConfig


def make_loader(cfg: PretrainConfig, split: str, batch_size: int, rank: int, world_size: int,
                global_batch: int | None = None):
    from data.loader import build_loader

    data_dir = Path(cfg.data.dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, "no such folder (data.dir); prepare one with `python -m data.prepare`")
    return build_loader(str(data_dir), split, cfg.data.seq_len, batch_size, rank=rank, world_size=world_size,
                        num_workers=cfg.data.num_workers if split == "train" else 0, seed=cfg.seed,
                        shuffle=split == "train", global_batch=global_batch)


class BatchStream:
    """Endless stream of this rank's training micro-batches; its state is the loader's global data position."""

    def __init__(self, cfg: PretrainConfig, rank: int, world_size: int, vocab_size: int) -> None:
        self.loader = make_loader(cfg, "train", cfg.train.micro_batch_size, rank, world_size,
                                  global_batch=cfg.train.global_batch_tokens // cfg.data.seq_len)
        self.vocab_size = vocab_size
        self._it = None
        tokenizer_vocab = self.loader.vocab_size  # refused here, on every rank at once, before any collective
        if tokenizer_vocab > vocab_size:
            raise DataError(self.loader.split_dir, f"was tokenised with a {tokenizer_vocab:,}-piece tokenizer "
                            f"(manifest.json), but the model has {vocab_size:,} embeddings: prepare the data with "
                            f"the model's tokenizer or set --model.overrides '{{vocab_size: ...}}'")

    def next(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        check_batch(batch, self.vocab_size, self.loader)
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def check_batch(batch: torch.Tensor, vocab_size: int, loader) -> None:
    """Token ids must fit the model's embedding; checked on the CPU, before CUDA turns a mismatch into a
    device-side assert (or the embedding into an IndexError). The manifest's vocabulary is checked once at the
    start (BatchStream); this catches ids that a damaged shard holds beyond it."""
    hi = int(batch.max())
    if hi >= vocab_size:
        raise DataError(loader.split_dir, f"holds token id {hi}, but the model has {vocab_size:,} embeddings: the "
                        f"data was tokenised with another tokenizer (see its manifest.json) or needs "
                        f"--model.overrides '{{vocab_size: ...}}'")


def validation_batches(cfg: PretrainConfig, rank: int, world_size: int, vocab_size: int, say=print
                       ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """This rank's validation batches as (tokens, weights) and the number of sequences in all.

    All ranks get the same number of batches (FSDP runs every forward on all ranks): where the sequences
    do not divide evenly, a rank repeats one of its rows with weight 0.
    """
    bs = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    loader = make_loader(cfg, "val", bs, 0, 1)
    wanted = cfg.eval.batches * bs
    available = loader.steps_per_epoch * bs
    if wanted > available:
        say(f"eval.batches={cfg.eval.batches} x {bs} sequences, but the val split holds {available} sequences "
              f"of {cfg.data.seq_len + 1} tokens: using {available}")
        wanted = available
    rows = torch.cat(list(itertools.islice(loader, math.ceil(wanted / bs))))[:wanted]
    check_batch(rows, vocab_size, loader)
    mine = rows[rank::world_size]
    n_batches = math.ceil(math.ceil(wanted / world_size) / bs)
    out = []
    for i in range(n_batches):
        tokens = mine[i * bs:(i + 1) * bs]
        weights = torch.ones(len(tokens))
        if len(tokens) < bs:
            pad = bs - len(tokens)
            filler = rows[:1].expand(pad, -1)
            tokens, weights = torch.cat([tokens, filler]), torch.cat([weights, torch.zeros(pad)])
        out.append((tokens, weights))
    return out, wanted
