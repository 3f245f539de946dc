"""The concatenated, memory-mapped token stream of one split.

Shards are opened lazily (in the process that reads them, e.g. each dataloader worker), because a
numpy memmap pickled into a worker would be copied into memory. Only the pages a window touches are
read; nothing is loaded up front.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Sequence

import numpy as np

from data.shards import open_shard


class TokenStream:
    def __init__(self, shards: Sequence[tuple[Path, int]]):
        self.paths = [Path(p) for p, _ in shards]
        self.counts = [int(n) for _, n in shards]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64).tolist()
        self.num_tokens = self.starts[-1]
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [open_shard(p) for p in self.paths]
        return self._maps

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as int64 (may span shards)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside stream of {self.num_tokens}")
        maps = self._open()
        out = np.empty(length, dtype=np.int64)
        i = bisect.bisect_right(self.starts, start) - 1
        pos = 0
        while pos < length:
            off = start + pos - self.starts[i]
            take = min(length - pos, self.counts[i] - off)
            out[pos:pos + take] = maps[i][off:off + take]
            pos += take
            i += 1
        return out
