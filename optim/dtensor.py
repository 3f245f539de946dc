"""FSDP2 (`fully_shard`) adapter: one optimizer `Unit` per DTensor parameter.

FSDP2 keeps every parameter as its own DTensor, sharded on dim 0 (`Shard(0)`) over the data-parallel
mesh dimension, like ``torch.chunk``: uneven shards are allowed (a (101, 64) weight is 51/50 rows on
2 ranks) and a rank may hold no rows. Rows stay whole, so this rank's elements of the flattened
parameter are ``[row0 * cols, (row0 + rows) * cols)`` at local offset 0.

- `Shard(0)` on one mesh dimension (FSDP2; or HSDP, `(Replicate(), Shard(0))`): ``group`` is that mesh
  dimension's process group; the block sums are all-reduced there. Replicated mesh dimensions hold
  identical gradients (FSDP2 all-reduces them), so they need no reduction.
- All `Replicate()`: every rank holds the whole parameter; ``group`` is None.
- Anything else (`Shard(d)` with d > 0, `Partial`, dim 0 sharded twice, i.e. tensor parallelism)
  raises: the block layout would not be a row range.
Non-DTensor parameters of the same model (not managed by `fully_shard`) become unsharded units.
"""
from __future__ import annotations

from torch import nn

from optim.units import Segment, Unit, named_parameters, whole_unit


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def row_shard(n_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(first_row, n_local_rows)`` of `rank` when `n_rows` are split over `world_size` like torch.chunk."""
    if world_size <= 0 or not 0 <= rank < world_size or n_rows < 0:
        raise ValueError(f"bad row shard: n_rows={n_rows} world_size={world_size} rank={rank}")
    chunk = -(-n_rows // world_size) if n_rows else 0
    first = min(rank * chunk, n_rows)
    return first, min(first + chunk, n_rows) - first


def dtensor_unit(name: str, p) -> Unit:
    """The `Unit` of one DTensor parameter (see module docstring)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_dims = []
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and type(placement) is Shard and placement.dim == 0:
            shard_dims.append(mesh_dim)
            continue
        raise NotImplementedError(
            f"optim.dtensor: parameter {name!r} has placements {placements}; Adam-mini supports Shard(0) over "
            f"one mesh dimension (FSDP2/HSDP) and Replicate(), not tensor parallelism")
    if len(shard_dims) > 1:
        raise NotImplementedError(f"optim.dtensor: parameter {name!r} is sharded on dim 0 twice ({placements})")

    local = p.to_local()
    numel = p.numel()
    if not shard_dims:
        if local.numel() != numel:
            raise RuntimeError(f"optim.dtensor: replicated {name!r} holds {local.numel()} of {numel} elements")
        return whole_unit(name, p, label=f"dtensor:{name}")

    mesh_dim = shard_dims[0]
    shape = tuple(p.shape)
    if len(shape) == 0:
        raise RuntimeError(f"optim.dtensor: 0-dim parameter {name!r} cannot be Shard(0)")
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    row0, rows = row_shard(shape[0], world, rank)
    cols = numel // shape[0] if shape[0] else 0
    if tuple(local.shape) != (rows, *shape[1:]):
        raise RuntimeError(
            f"optim.dtensor: {name!r} local shard has shape {tuple(local.shape)} on mesh rank {rank}/{world}; "
            f"expected torch.chunk rows {rows} of {shape} (rows {row0}..{row0 + rows})")
    segments = (Segment(name, row0 * cols, (row0 + rows) * cols, 0),) if rows * cols else ()
    group = mesh.get_group(mesh_dim) if world > 1 else None
    return Unit(param=p, names=(name,), segments=segments, group=group, label=f"dtensor:{name}")


def dtensor_units(model: nn.Module) -> tuple[list[Unit], list[tuple[str, tuple[int, ...]]]]:
    """One unit per trainable parameter of an FSDP2 model (DTensors as above, plain tensors unsharded) and the
    global ``(fqn, shape)`` of every parameter (what `model_layout` takes)."""
    units, shapes = [], []
    for name, p in named_parameters(model):
        units.append(dtensor_unit(name, p) if is_dtensor(p) else whole_unit(name, p))
        shapes.append((name, tuple(int(x) for x in p.shape)))
    return units, shapes


__all__ = ["dtensor_unit", "dtensor_units", "is_dtensor", "row_shard"]
