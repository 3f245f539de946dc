"""Precomputed block geometry of a Unit: segments ∩ runs, decomposed into strided chunks.

The optimizer must never build a per-element index (it would cost as much memory as the state
Adam-mini saves) and must not loop over rows or heads in Python. Instead each segment ∩ run is cut,
once, into at most three *chunks*: a partial head block, `k` full blocks (viewed as `(k, b)`), and a
partial tail block. Every chunk is then "`rows` consecutive blocks of `length` local elements each,
starting at local `offset`, whose v entries are `block .. block+rows-1` of the unit's block vector".
A step is a short Python loop over chunks (a handful per unit), each a 2-D tensor operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

from optim.layout import ParamLayout
from optim.units import Segment, Unit


@dataclass(frozen=True)
class Chunk:
    """`rows` blocks of `length` local elements from local `offset`, mapping to v entries from `block`.

    `length == block_numel` for full blocks; a partial block (cut by a segment boundary) has `rows == 1`.
    """

    offset: int
    rows: int
    length: int
    block: int
    decay: bool

    @property
    def numel(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class UnitPlan:
    """Everything about a unit that does not change between steps."""

    n_blocks: int                                  # entries of the unit's block vector (all of `names`)
    block_runs: tuple[tuple[int, int], ...]        # (n_blocks, block_numel) for the whole block vector
    chunks: tuple[Chunk, ...]                      # local pieces, in local-offset order
    spans: tuple[tuple[int, int, bool], ...]       # (offset, numel, decay): maximal contiguous runs of chunks
    min_local_numel: int                           # the local buffer must be at least this long

    @cached_property
    def run_spans(self) -> tuple[tuple[int, int, int], ...]:
        """`(first block, n_blocks, block_numel)` of every run of the block vector."""
        spans, first = [], 0
        for n, b in self.block_runs:
            spans.append((first, n, b))
            first += n
        return tuple(spans)

    def block_numel(self, block: int) -> int:
        """Static element count of block `block` of the unit's block vector (the divisor of mean_B g²)."""
        for first, n, b in self.run_spans:
            if first <= block < first + n:
                return b
        raise IndexError(f"block {block} outside the unit's {self.n_blocks} blocks")

    @cached_property
    def complete_blocks(self) -> bool:
        """Whether every local chunk consists of whole blocks (true for any unsharded parameter)."""
        return all(c.length == self.block_numel(c.block) for c in self.chunks)


def stands_alone(plan: UnitPlan, group) -> bool:
    """Whether a unit's block sums are complete locally: whole blocks only and no process group to reduce over."""
    return group is None and plan.complete_blocks


def decompose_segment(seg: Segment, layout: ParamLayout, block_base: int) -> list[Chunk]:
    """Cut one segment along the block boundaries of its parameter (see module docstring)."""
    chunks: list[Chunk] = []
    elem0 = blk0 = 0
    for n, b in layout.runs:
        run_end = elem0 + n * b
        s, e = max(seg.start, elem0), min(seg.end, run_end)
        if s < e:
            off = seg.offset + (s - seg.start)
            i, r = divmod(s - elem0, b)
            blk = block_base + blk0 + i
            if r:  # partial head block
                length = min(b - r, e - s)
                chunks.append(Chunk(off, 1, length, blk, layout.weight_decay))
                s, off, blk = s + length, off + length, blk + 1
            k = (e - s) // b
            if k:  # full blocks
                chunks.append(Chunk(off, k, b, blk, layout.weight_decay))
                s, off, blk = s + k * b, off + k * b, blk + k
            if s < e:  # partial tail block
                chunks.append(Chunk(off, 1, e - s, blk, layout.weight_decay))
        elem0, blk0 = run_end, blk0 + n
    return chunks


def plan_unit(unit: Unit, layouts: Mapping[str, ParamLayout]) -> UnitPlan:
    """Validate a unit's segments against the layouts and precompute its chunks."""
    base: dict[str, int] = {}
    runs: list[tuple[int, int]] = []
    n_blocks = 0
    for name in unit.names:
        if name not in layouts:
            raise ValueError(f"unit {unit.label!r}: no layout for parameter {name!r}")
        if name in base:
            raise ValueError(f"unit {unit.label!r}: parameter {name!r} listed twice in names")
        base[name] = n_blocks
        runs.extend(layouts[name].runs)
        n_blocks += layouts[name].n_blocks
    chunks: list[Chunk] = []
    spans: list[tuple[int, int]] = []
    for seg in unit.segments:
        if seg.name not in base:
            raise ValueError(f"unit {unit.label!r}: segment of {seg.name!r}, which is not in the unit's names")
        lay = layouts[seg.name]
        if not (0 <= seg.start <= seg.end <= lay.numel) or seg.offset < 0:
            raise ValueError(f"unit {unit.label!r}: segment {seg} out of range for {seg.name!r} ({lay.numel} elements)")
        if seg.end > seg.start:
            spans.append((seg.offset, seg.offset + seg.numel))
            chunks.extend(decompose_segment(seg, lay, base[seg.name]))
    spans.sort()
    for (_, a_end), (b_start, _) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise ValueError(f"unit {unit.label!r}: segments overlap in the local buffer")
    chunks.sort(key=lambda c: c.offset)
    return UnitPlan(n_blocks, tuple(runs), tuple(chunks), merge_spans(chunks), max((e for _, e in spans), default=0))


def merge_spans(chunks: list[Chunk]) -> tuple[tuple[int, int, bool], ...]:
    """Merge offset-sorted chunks into maximal contiguous `(offset, numel, decay)` ranges of equal decay."""
    spans: list[list] = []
    for c in chunks:
        if spans and spans[-1][0] + spans[-1][1] == c.offset and spans[-1][2] == c.decay:
            spans[-1][1] += c.numel
        else:
            spans.append([c.offset, c.numel, c.decay])
    return tuple((o, n, d) for o, n, d in spans)
