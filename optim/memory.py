"""Optimizer-state size from shapes alone, so 7B/13B models can be sized without allocating anything.

Counts exactly what the optimizers allocate for an unsharded model (tests check the formulas against
`optimizer_state_bytes` of real optimizers after a step): torch AdamW keeps `exp_avg` and `exp_avg_sq`
like the parameter plus a 0-d `step`; AdamMini keeps `exp_avg` like the parameter in its momentum dtype
(fp32 or bf16), one fp32 `exp_avg_sq` entry per block and a 0-d fp32 `step`.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from optim.layout import ParamLayout

_STEP_BYTES = 4  # fp32 0-d step tensor


def adamw_state_bytes(named_shapes: Iterable[tuple[str, Iterable[int]]], dtype: torch.dtype = torch.float32) -> int:
    """torch.optim.AdamW (no amsgrad): two moments in the parameter dtype + one step per parameter."""
    size = dtype.itemsize
    return sum(2 * math.prod(shape) * size + _STEP_BYTES for _, shape in named_shapes)


def adam_mini_state_bytes(layouts: Mapping[str, ParamLayout], momentum_dtype: torch.dtype = torch.float32) -> int:
    """AdamMini, one unit per parameter: m per element in `momentum_dtype`, fp32 v per block, one step."""
    m_size = momentum_dtype.itemsize
    return sum(m_size * lay.numel + 4 * lay.n_blocks + _STEP_BYTES for lay in layouts.values())


def v_entries(layouts: Mapping[str, ParamLayout]) -> int:
    """Number of second-moment entries Adam-mini keeps (one per block)."""
    return sum(lay.n_blocks for lay in layouts.values())
