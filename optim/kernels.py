"""The compiled implementation of AdamMini: fused `torch.compile` kernels.

`rows_update` (units of complete blocks, no all-reduce): the whole update, block sums of g², v, m,
decay and step, for a list of equally shaped chunks (the same parameter of every transformer block),
so a step costs one call per distinct chunk shape instead of ~5 eager ops plus one compiled call per
chunk (measured on the 34 M `tiny` model, 1 thread: 57 calls of ~40 us fixed cost each). Inductor
emits the row sums and the element pass as two loops per chunk. `chunk_update` serves sharded units
(partial blocks, all-reduced sums), whose block sums, all-reduce, v and per-block step sizes stay in
eager code (`optim.eager.block_scales`: they touch g once and vectors of a few thousand entries);
the moment update, decay and step are one compiled pass per chunk, reading p, g, m once and writing
p, m once (inductor emits one vectorised C++ loop on CPU, one Triton kernel on GPU).

Why per chunk and not per unit: each chunk arrives as its own 1-D contiguous views of p, g and m, so
the compiled graph mutates whole inputs, which inductor writes in place. A per-unit graph that
writes slices of one buffer made inductor allocate a temporary of the unit's size or merge all
slices into one masked loop (measured 3-7x slower than eager), and an input-aliasing graph would hit
AOTAutograd's slow synthetic-base path. The per-block scale is broadcast to elements inside the
graph with `expand(rows, length).reshape(-1)`, an index expression: no per-element tensor exists.

Numerics: the kernels compile with inductor's `emulate_precision_casts`, without which inductor skips
the float32 -> bfloat16 -> float32 round trip of a bf16 first moment and steps with the unrounded m
(measured: then the compiled and eager paths differ); inductor's C++ backend does not contract a·b + c
into an FMA (`-ffp-contract=off`), so m is fl(fl(b1·m) + fl((1 - b1)·g)) as on the other paths.

Compile cost is bounded: kernels are cached by chunk shape, dtypes, decay and device, so a transformer
needs a handful (the same parameter in every block shares one). Each key gets its own copy of the
function's code object, so torch._dynamo keeps one small cache per key and never reaches its
recompile limit. The hyper-parameters enter as one tensor (`optim.update.StepHyper.tensor`), so lr
schedules do not recompile. If compiling fails, the same function runs eagerly (identical math)
after a one-time warning.
"""
from __future__ import annotations

import shutil
import sys
import types
import warnings
from typing import Callable

import torch

from optim.eager import block_scales
from optim.update import SLOT, StepHyper, UnitStep

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


def chunk_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, scale: torch.Tensor, hp: torch.Tensor,
                 decay: bool) -> None:
    """In place, for `rows = len(scale)` blocks of `len(p) // rows` elements (all 1-D views), `hp` = `StepHyper`:

    m <- b1·m + (1 - b1)·g (stored in m's dtype);  p <- p·(decay if `decay` else 1) - scale_B·m
    """
    rows = scale.shape[0]
    per_elem = scale.unsqueeze(1).expand(rows, p.shape[0] // rows).reshape(-1)
    m_new = (m.float() * hp[SLOT.beta1] + g.float() * hp[SLOT.one_minus_beta1]).to(m.dtype)
    m.copy_(m_new)
    p.copy_(p.float() * (hp[SLOT.decay] if decay else 1.0) - per_elem * m_new.float())


def rows_update(ps: list, gs: list, ms: list, vs: list, hp: torch.Tensor, decay: bool) -> None:
    """The whole Adam-mini update, in place, for chunks of complete blocks (no partial block, no all-reduce).

    Chunk j is `ps[j], gs[j], ms[j]` of shape (rows, length), one block per row, and its v entries
    `vs[j]` (rows,); `hp` = `StepHyper`:

    v <- b2·v + (1 - b2)·mean_row g²;  m <- b1·m + (1 - b1)·g (stored in m's dtype);
    p <- p·(decay if `decay` else 1) - lr/bc1 / (sqrt(v / bc2) + eps)·m
    """
    for p, g, m, v in zip(ps, gs, ms, vs):
        g32 = g.float()
        ssq = (g32 * g32).sum(1)
        v_new = v * hp[SLOT.beta2] + (ssq * (1.0 / p.shape[1])) * hp[SLOT.one_minus_beta2]
        scale = (torch.sqrt(v_new / hp[SLOT.bias_correction2]) + hp[SLOT.eps]).reciprocal() \
            * hp[SLOT.lr_over_bias_correction1]
        m_new = (m.float() * hp[SLOT.beta1] + g32 * hp[SLOT.one_minus_beta1]).to(m.dtype)
        p.copy_(p.float() * (hp[SLOT.decay] if decay else 1.0) - scale.unsqueeze(1) * m_new.float())
        m.copy_(m_new)
        v.copy_(v_new)


def _specialise(fn: Callable, tag: str) -> Callable:
    """`fn` compiled, through a private copy of its code object (its own dynamo cache)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    compiled = torch.compile(copy, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})

    def run(*args):
        global _compile_failed
        if not _compile_failed:
            try:
                return compiled(*args)
            except Exception as exc:  # compilation happens before any input is written
                _compile_failed = True
                warnings.warn(f"AdamMini compiled path: torch.compile failed ({type(exc).__name__}: {exc}); "
                              f"running its kernels eagerly")
        return fn(*args)

    return run


def _kernel(fn: Callable, key: tuple) -> Callable:
    """The compiled `fn` for one `key` (shapes, dtypes, decay, device), cached."""
    key = (fn.__name__,) + key
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = _specialise(fn, str(len(_kernels)))
    return k


def cached_kernels() -> int:
    """How many distinct kernels exist (compile cost is proportional)."""
    return len(_kernels)


def _hyper_tensor(cache: dict, hyper: StepHyper, device: torch.device) -> torch.Tensor:
    key = (hyper, device)
    if key not in cache:
        cache[key] = hyper.tensor(device)
    return cache[key]


def step_rows(items: list[UnitStep], hps: dict) -> None:
    """Units of complete blocks without all-reduce: one `rows_update` call per group of equally shaped chunks."""
    groups: dict[tuple, list] = {}
    for it in items:
        for c in it.plan.chunks:
            key = (c.rows, c.length, c.decay, it.hyper, it.p.dtype, it.g.dtype, it.m.dtype, it.p.device)
            sl = slice(c.offset, c.offset + c.numel)
            views = (it.p[sl].view(c.rows, c.length), it.g[sl].view(c.rows, c.length),
                     it.m[sl].view(c.rows, c.length), it.v[c.block:c.block + c.rows])
            groups.setdefault(key, []).append(views)
    for (rows, length, decay, hyper, p_dtype, g_dtype, m_dtype, device), entries in groups.items():
        kernel = _kernel(rows_update, (rows, length, len(entries), decay, p_dtype, g_dtype, m_dtype, device.type))
        kernel(*(list(x) for x in zip(*entries)), _hyper_tensor(hps, hyper, device), decay)


def step_chunks(items: list[UnitStep], scales: list[torch.Tensor], hps: dict) -> None:
    """Any units, given their per-block step sizes (`optim.eager.block_scales`): one `chunk_update` call per chunk."""
    for it, scale in zip(items, scales):
        hp = _hyper_tensor(hps, it.hyper, it.p.device)
        for c in it.plan.chunks:
            sl = slice(c.offset, c.offset + c.numel)
            p, g, m = it.p[sl], it.g[sl], it.m[sl]
            kernel = _kernel(chunk_update, (c.numel, c.rows, c.decay, p.dtype, g.dtype, m.dtype, p.device.type))
            kernel(p, g, m, scale[c.block:c.block + c.rows], hp, c.decay)


def step(items: list[UnitStep]) -> None:
    """The whole compiled update of these units: `step_rows` where the blocks stand alone, else `step_chunks`."""
    rows = [it for it in items if it.stands_alone]
    rest = [it for it in items if not it.stands_alone]
    hps: dict = {}  # one hyper-parameter tensor per (step record, device), shared by both kinds of call
    if rows:
        step_rows(rows, hps)
    if rest:
        step_chunks(rest, block_scales(rest), hps)
