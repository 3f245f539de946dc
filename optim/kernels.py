"""Fast path of AdamMini: compiled, fused update kernels.

`rows_update` (units of complete blocks, no all-reduce): the whole update, block sums of g², v, m,
decay and step, for a list of equally shaped chunks (the same parameter of every transformer block),
so a step costs one call per distinct chunk shape instead of ~5 eager ops plus one compiled call per
chunk (measured on the 34 M `tiny` model, 1 thread: 57 calls of ~40 us fixed cost each). Inductor
emits the row sums and the element pass as two loops per chunk. `chunk_update` below serves sharded
units (partial blocks, all-reduced sums), whose sums stay eager:

The eager path makes three passes over a chunk's memory after the block sums (m <- lerp(m, g),
p <- p·(1 - lr·wd), p <- p - scale_B·m). Here they are a single `torch.compile`d function per chunk
shape, reading p, g, m once and writing p, m once (inductor emits one vectorised C++ loop on CPU,
one Triton kernel on GPU). The block sums, the all-reduce, the v update and the per-block step
sizes stay in eager code: they touch g once and vectors of a few thousand entries.

Why per chunk and not per unit: each chunk arrives as its own 1-D contiguous views of p, g and m, so
the compiled graph mutates whole inputs, which inductor writes in place. A per-unit graph that
writes slices of one buffer made inductor allocate a temporary of the unit's size or merge all
slices into one masked loop (measured 3-7x slower than eager), and an input-aliasing graph would hit
AOTAutograd's slow synthetic-base path. The per-block scale is broadcast to elements inside the
graph with `expand(rows, length).reshape(-1)`, an index expression: no per-element tensor exists.

Compile cost is bounded: kernels are cached by (chunk numel, rows, dtypes, device), so a transformer
needs a handful (the same parameter in every block shares one). Each key gets its own copy of the
function's code object, so torch._dynamo keeps one small cache per key and never reaches its
recompile limit. beta1 and the decay factor enter as a tensor, so lr schedules do not recompile.
If compiling fails, the same function runs eagerly (identical math) after a one-time warning.
"""
from __future__ import annotations

import shutil
import sys
import types
import warnings
from typing import Callable

import torch

_kernels: dict[tuple, Callable] = {}
_compile_failed = False


def compile_available() -> bool:
    """Whether torch.compile can be expected to work here (dynamo supported, a C++ compiler for CPU)."""
    if _compile_failed or not hasattr(torch, "compile") or sys.version_info >= (3, 15):
        return False
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return False
    except Exception:  # pragma: no cover - broken installs
        return False
    return shutil.which("g++") is not None or shutil.which("c++") is not None or torch.cuda.is_available()


def chunk_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, scale: torch.Tensor, hp: torch.Tensor) -> None:
    """In place, for `rows = len(scale)` blocks of `len(p) // rows` elements (all 1-D views):

    m <- b1·m + (1 - b1)·g;  p <- p·decay - scale_B·m      with hp = [b1, decay]
    """
    rows = scale.shape[0]
    per_elem = scale.unsqueeze(1).expand(rows, p.shape[0] // rows).reshape(-1)
    m_new = m * hp[0] + g.float() * (1.0 - hp[0])
    m.copy_(m_new)
    p.copy_(p.float() * hp[1] - per_elem * m_new)


def rows_update(ps: list, gs: list, ms: list, vs: list, hp: torch.Tensor) -> None:
    """The whole Adam-mini update, in place, for chunks of complete blocks (no partial block, no all-reduce).

    Chunk j is `ps[j], gs[j], ms[j]` of shape (rows, length), one block per row, and its v entries
    `vs[j]` (rows,). With hp = [b1, 1 - b1, decay, b2, 1 - b2, bc2, lr / bc1, eps]:

    v <- b2·v + (1 - b2)·mean_row g²;  m <- b1·m + (1 - b1)·g;
    p <- p·decay - lr/bc1 / (sqrt(v / bc2) + eps)·m
    """
    for p, g, m, v in zip(ps, gs, ms, vs):
        g32 = g.float()
        ssq = (g32 * g32).sum(1)
        v_new = v * hp[3] + (ssq * (1.0 / p.shape[1])) * hp[4]
        scale = (torch.sqrt(v_new / hp[5]) + hp[7]).reciprocal() * hp[6]
        m_new = m * hp[0] + g32 * hp[1]
        p.copy_(p.float() * hp[2] - scale.unsqueeze(1) * m_new)
        m.copy_(m_new)
        v.copy_(v_new)


def _specialise(fn: Callable, tag: str) -> Callable:
    """`fn` compiled, through a private copy of its code object (its own dynamo cache)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    compiled = torch.compile(copy, dynamic=False, fullgraph=True)

    def run(*args):
        global _compile_failed
        if not _compile_failed:
            try:
                return compiled(*args)
            except Exception as exc:  # compilation happens before any input is written
                _compile_failed = True
                warnings.warn(f"AdamMini fast path: torch.compile failed ({type(exc).__name__}: {exc}); running eagerly")
        return fn(*args)

    return run


def chunk_kernel(numel: int, rows: int, p: torch.Tensor, g: torch.Tensor) -> Callable:
    """The compiled `chunk_update` for this chunk shape, dtypes and device (cached)."""
    key = (numel, rows, p.dtype, g.dtype, p.device.type)
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = _specialise(chunk_update, str(len(_kernels)))
    return k


def rows_kernel(key: tuple) -> Callable:
    """The compiled `rows_update` for one group structure `key` (chunk shapes, dtypes, device), cached."""
    key = ("rows",) + key
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = _specialise(rows_update, str(len(_kernels)))
    return k


def cached_kernels() -> int:
    """How many distinct chunk kernels exist (compile cost is proportional)."""
    return len(_kernels)
