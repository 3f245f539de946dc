"""Which Adam-mini blocks a world size cuts, computed from the layout alone (no processes): FSDP1's flat,
evenly split units (one per Block plus the root, in registration order) and FSDP2's torch.chunk rows."""
from __future__ import annotations

import math
import re

import models
from optim.blocks import plan_unit
from optim.dtensor import row_shard
from optim.flat import flat_shard_segments
from optim.layout import model_layout
from optim.units import Segment, Unit


def cut_blocks(config, world: int, strategy: str) -> dict[str, set[str]]:
    """{parameter name: layout kinds of its blocks that a rank boundary cuts} for "fsdp" or "fsdp2"."""
    shapes = [(n, tuple(p.shape)) for n, p in models.build_model(config, device="meta").named_parameters()]
    layouts = model_layout(config, shapes)
    cut: dict[str, set[str]] = {}
    for rank in range(world):
        for seg in _segments(shapes, rank, world, strategy):
            lay = layouts[seg.name]
            starts = [sum(n for n, _ in lay.runs[:i]) for i in range(len(lay.runs))]
            for c in plan_unit(Unit(param=None, names=(seg.name,), segments=(seg,)), layouts).chunks:
                run = max(i for i, s in enumerate(starts) if s <= c.block)
                if c.length < lay.runs[run][1]:
                    cut.setdefault(seg.name, set()).add(lay.kind)
    return cut


def _segments(shapes, rank: int, world: int, strategy: str) -> list[Segment]:
    if strategy == "fsdp2":  # every parameter its own DTensor, rows split like torch.chunk
        out = []
        for name, shape in shapes:
            row0, rows = row_shard(shape[0], world, rank)
            cols = math.prod(shape) // shape[0]
            if rows:
                out.append(Segment(name, row0 * cols, (row0 + rows) * cols, 0))
        return out
    units: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in shapes:  # one FlatParameter per Block, the rest in the root's
        m = re.match(r"^(transformer\.h\.\d+)\.", name)
        units.setdefault(m.group(1) if m else "", []).append((name, shape))
    out = []
    for members in units.values():
        segs, _, _ = flat_shard_segments([math.prod(s) for _, s in members], rank, world)
        out += [Segment(members[i][0], a, b, 0) for i, a, b, _ in segs]
    return out
