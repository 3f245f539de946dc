"""FSDP1 FlatParameter adapter: one optimizer `Unit` per FlatParameter.

This is the ONLY module of the project that reads FSDP1's private FlatParameter / FlatParamHandle
fields. They were checked against torch 2.13.0 (see the project's FSDP notes, shared/FSDP_NOTES.md):

- ``FSDP.fsdp_modules(model)`` -> each FSDP module ``m``; ``m._handle`` (None for a wrapper without
  parameters of its own); ``h.flat_param``; ``h.process_group``, ``h.rank``, ``h.world_size``,
  ``h.uses_sharded_strategy``, ``h._use_orig_params``;
- ``flat_param._fqns`` (relative to the module that owns the handle), ``_shapes``, ``_numels``
  (unpadded, no alignment padding entries), ``_shard_param_infos`` (one per entry of ``_fqns``:
  ``(in_shard, offset_in_shard, numel_in_shard, intra_param_start_idx, intra_param_end_idx)``, the
  end index INCLUSIVE), ``_shard_numel_padded`` (right padding of this rank's shard).

The layout FSDP1 builds with ``use_orig_params=False`` is also replicated by the pure function
`flat_shard_segments` (parameters concatenated in registration order without gaps; the flat
parameter is split like ``torch.chunk``: rank r holds ``[r*c, min((r+1)*c, N))`` with
``c = ceil(N / W)``, right-padded to ``c``). The tests check that the replica agrees with the fields
on real FSDP1 modules; the benchmark (`benchmarks/fsdp_layout.py`) uses the replica.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from optim.units import Segment, Unit, canonical_name

_CHECKED_TORCH = "2.13.0"


# --------------------------------------------------------------------------------------------------
# Pure arithmetic (no torch.distributed, no FSDP): FSDP1's flattening and even split, replicated.
# --------------------------------------------------------------------------------------------------

def even_shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """FSDP1's split of a flat parameter of `total` elements: ``(start, end_exclusive, padding)`` of `rank`.

    Matches ``flat.chunk(world_size)`` followed by right padding to the first chunk's size
    (``FlatParamHandle._get_shard``): a rank past the last chunk holds nothing and is all padding.
    """
    if total <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad split: total={total} rank={rank} world_size={world_size}")
    chunk = -(-total // world_size)
    start = min(rank * chunk, total)
    end = min(start + chunk, total)
    return start, end, chunk - (end - start)


def flat_shard_segments(numels: Sequence[int], rank: int, world_size: int
                        ) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """Segments of `rank`'s shard of a flat parameter made of `numels` (in order, no gaps).

    Returns ``(segments, shard_numel, padding)`` where each segment is
    ``(param_index, start, end_exclusive, offset_in_shard)`` and ``shard_numel`` includes padding.
    """
    total = sum(numels)
    lo, hi, pad = even_shard_bounds(total, rank, world_size)
    segments = []
    begin = 0
    for index, n in enumerate(numels):
        s, e = max(lo, begin), min(hi, begin + n)
        if s < e:
            segments.append((index, s - begin, e - begin, s - lo))
        begin += n
    return segments, (hi - lo) + pad, pad


# --------------------------------------------------------------------------------------------------
# Real FSDP1 modules
# --------------------------------------------------------------------------------------------------

def _fsdp_class():
    from torch.distributed.fsdp import FullyShardedDataParallel
    return FullyShardedDataParallel


def is_fsdp1(model: nn.Module) -> bool:
    """True when `model` is or contains an FSDP1 (`FullyShardedDataParallel`) module."""
    try:
        fsdp = _fsdp_class()
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, fsdp) for m in model.modules())


def _field(obj: Any, name: str, what: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"optim.flat: {what} has no field {name!r}. optim/flat.py reads FSDP1's private FlatParameter "
            f"fields and was checked against torch {_CHECKED_TORCH}; this is torch {torch.__version__}. "
            f"Re-check torch/distributed/fsdp/_flat_param.py and update optim/flat.py."
        ) from None


def _info_fields(info: Any) -> tuple[bool, int | None, int | None, int | None, int | None]:
    """(in_shard, offset_in_shard, numel_in_shard, intra_param_start_idx, intra_param_end_idx incl.)."""
    names = ("in_shard", "offset_in_shard", "numel_in_shard", "intra_param_start_idx", "intra_param_end_idx")
    if all(hasattr(info, n) for n in names):
        return tuple(getattr(info, n) for n in names)  # type: ignore[return-value]
    if isinstance(info, tuple) and len(info) == 5:
        return tuple(info)  # type: ignore[return-value]
    raise RuntimeError(
        f"optim.flat: unexpected _ShardParamInfo {info!r} (checked against torch {_CHECKED_TORCH}; this is "
        f"torch {torch.__version__})")


def fsdp1_handles(model: nn.Module) -> list[tuple[str, Any]]:
    """``(clean module path, FlatParamHandle)`` of every FSDP1 module of `model` that owns parameters."""
    fsdp = _fsdp_class()
    # first path of each module (Fabric's _FabricModule registers the model as `_forward_module` first)
    paths = {id(m): canonical_name(name) for name, m in model.named_modules()}
    out = []
    for m in fsdp.fsdp_modules(model):
        handle = _field(m, "_handle", "FullyShardedDataParallel module")
        if handle is None:  # a wrapper whose parameters all belong to nested units
            continue
        if id(m) not in paths:
            raise RuntimeError("optim.flat: FSDP module not found in model.named_modules()")
        out.append((paths[id(m)], handle))
    return out


def fsdp1_units(model: nn.Module) -> tuple[list[Unit], list[tuple[str, tuple[int, ...]]]]:
    """The units of an FSDP1 model and the original ``(fqn, shape)`` of every parameter they hold.

    One unit per FlatParameter (``use_orig_params=False``): ``param`` is the FlatParameter (this
    rank's 1-D shard, padding included), ``names`` all original FQNs of the unit (wrapper components
    stripped, prefixed with the unit's module path), ``segments`` what this rank holds (never padding),
    ``group`` FSDP's process group (None when the unit is not sharded across more than one rank:
    NO_SHARD or a world of one). Under HYBRID_SHARD that is the SHARD group (the ranks of one replica;
    ``_inter_node_pg`` replicates): the replicas hold identical, already all-reduced gradients, so the block
    sums belong in the shard group only (tests/test_optim_hsdp.py asserts the ranks, and that summing over
    the world is wrong). Every trainable parameter of `model` must belong to a FlatParameter.
    """
    shapes_out: list[tuple[str, tuple[int, ...]]] = []
    units = []
    for path, handle in fsdp1_handles(model):
        what = f"FSDP1 unit {path or '<root>'!r}"
        if _field(handle, "_use_orig_params", what):
            raise NotImplementedError(
                f"optim.flat: {what} uses use_orig_params=True; the sharded Adam-mini supports FSDP1 with "
                f"use_orig_params=False (or FSDP2 fully_shard)")
        fp = _field(handle, "flat_param", what)
        fqns = _field(fp, "_fqns", what)
        shapes = _field(fp, "_shapes", what)
        numels = _field(fp, "_numels", what)
        infos = _field(fp, "_shard_param_infos", what)
        padded = int(_field(fp, "_shard_numel_padded", what))
        if not (len(fqns) == len(shapes) == len(numels) == len(infos)):
            raise RuntimeError(
                f"optim.flat: {what}: _fqns/_shapes/_numels/_shard_param_infos lengths differ "
                f"({len(fqns)}, {len(shapes)}, {len(numels)}, {len(infos)}); torch {torch.__version__}")
        if fp.dim() != 1:
            raise RuntimeError(f"optim.flat: {what}: the flat parameter is not 1-D ({tuple(fp.shape)})")
        sharded = bool(_field(handle, "uses_sharded_strategy", what))
        if sharded:
            sharded_size = _field(fp, "_sharded_size", what)
            if fp.numel() != sharded_size.numel():
                raise RuntimeError(
                    f"optim.flat: {what}: the flat parameter is not in its sharded state "
                    f"({fp.numel()} elements, shard is {sharded_size.numel()}); build the optimizer outside "
                    f"forward/backward and summon_full_params")
        local = fp.numel()
        names = tuple(canonical_name(f"{path}.{fqn}" if path else fqn) for fqn in fqns)
        if len(set(names)) != len(names):
            raise RuntimeError(f"optim.flat: {what}: duplicate parameter names {names}")
        segments = []
        shapes_out.extend((name, tuple(int(x) for x in shape)) for name, shape in zip(names, shapes))
        for name, shape, numel, info in zip(names, shapes, numels, infos):
            if int(torch.Size(shape).numel()) != int(numel):
                raise RuntimeError(f"optim.flat: {what}: {name} has shape {tuple(shape)} but numel {numel}")
            in_shard, offset, n_in, start, end_incl = _info_fields(info)
            if not in_shard:
                continue
            end = int(end_incl) + 1  # FSDP's intra_param_end_idx is inclusive
            start, offset = int(start), int(offset)
            if not (0 <= start < end <= numel and end - start == int(n_in)
                    and 0 <= offset and offset + (end - start) <= local - padded):
                raise RuntimeError(
                    f"optim.flat: {what}: inconsistent shard info for {name}: {info} (numel {numel}, local "
                    f"shard {local}, padding {padded}); torch {torch.__version__}")
            segments.append(Segment(name, start, end, offset))
        _check_disjoint(segments, what)
        group = _field(handle, "process_group", what) if sharded else None
        if group is not None and group.size() == 1:
            group = None
        units.append(Unit(param=fp, names=names, segments=tuple(segments), group=group,
                          label=f"fsdp1:{path or '<root>'}"))
    registered = {id(u.param) for u in units}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in registered]
    if stray:
        raise NotImplementedError(
            f"optim.flat: trainable parameters outside any FSDP1 FlatParameter (ignored modules?): {stray[:5]}")
    return units, shapes_out


def _check_disjoint(segments: Iterable, what: str) -> None:
    spans = sorted((s.offset, s.offset + s.end - s.start, s.name) for s in segments)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise RuntimeError(f"optim.flat: {what}: segments of {an} and {bn} overlap in the local shard")
