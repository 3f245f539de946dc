"""Tensor sizes and the dtype names the command-line tools accept."""
from __future__ import annotations

import math
from typing import Iterable

import torch

# --dtype choices of the checkpoint tools (auto = keep the stored dtype)
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16}


def numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return numel(shape) * dtype.itemsize
