"""Optimizer state (Adam-mini's and AdamW's) keyed by ORIGINAL parameter names, for checkpoints that reshard.

The optimizer's own `state_dict()` is keyed by the tensors it registers (FSDP1 FlatParameters,
DTensors, plain parameters), so it only loads into the same sharding. This module writes and reads a
name-keyed form that does not depend on the sharding:

    {"exp_avg":    {name: 1-D, numel(name) elements, the parameter's flattened first moment, in the
                    optimizer's momentum dtype (fp32 or bf16; loading casts to the loading optimizer's)},
     "exp_avg_sq": {name: 1-D fp32, one entry per Adam-mini block of the parameter (AdamW: per element,
                    like exp_avg)},
     "step":       {name: fp32 scalar},
     "hparams":    {"lr", "beta1", "beta2", "eps", "weight_decay": 0-d float64}}

- `sharded_state_dict(opt)`: for `torch.distributed.checkpoint` (DCP). Under FSDP each rank holds
  pieces `[start, end)` of a parameter's flattened first moment (the unit's segments); `exp_avg[name]`
  is then a 1-D `ShardedTensor` whose local shards are VIEWS of the optimizer's state at those
  offsets, so DCP writes them without a copy and loads into them in place. `exp_avg_sq` (replicated
  over the unit's ranks) and `step` are plain tensors, which DCP writes once. Unsharded optimizers
  (single device, DDP) give plain full tensors. DCP reshards on load: a checkpoint written on W ranks
  loads on W' ranks, FSDP1 or FSDP2 or unsharded, because only the names and the global 1-D shapes
  are stored.
- `load_sharded_state_dict(opt, sd)`: after `dcp.load(sd)` filled the dict made by
  `sharded_state_dict(opt)`, copies what is not already in place (v, step, hparams) into `opt`.
  It also accepts full tensors by name (from `full_state_dict` or torch.save).
- `full_state_dict(opt)`: everything by name as full tensors, gathered on rank 0 (consolidation).
- `save_optimizer(opt, path)` / `load_optimizer(opt, path)`: the DCP round trip in one call each,
  and `OptimizerState(opt)`, a `Stateful` that DCP's save/load call by themselves.

Which keys are per element and which per block is the optimizer's to say (`ELEMENT_STATES`,
`BLOCK_STATES`: AdamMini and the AdamW classes of optim/adamw.py); both carry `units` and `layouts`.

Note on Lightning Fabric: `FSDPStrategy.save_checkpoint(state)` (sharded) treats every entry that is
not a module or an optimizer as metadata that rank 0 `torch.save`s into `meta.pt` (Lightning 2.6.6);
a `ShardedTensor` there would lose the other ranks' pieces. The app saves `OptimizerState(opt)` as an entry
of its own DCP save (checkpoints_util/store.py), never through `fabric.save` (FSDP.optim_state_dict
cannot handle a per-block v).

Hybrid sharding (HSDP): the replicas hold the same pieces; each is listed once in the ShardedTensor's metadata
and DCP writes it once (the folder has the bytes of a FULL_SHARD save), and every replica loads its own copy.
`ShardedTensor` is deprecated in favour of
DTensor (FutureWarning in torch 2.13, still fully supported by DCP there); DTensor cannot express
FSDP1's irregular flat pieces, so a replacement would be DCP's `__create_write_items__` protocol.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from amp_common.dist import distributed, gather_objects, rank
from amp_common.quiet import quiet_checkpoint_warnings
from optim.units import local_1d

# --------------------------------------------------------------------------------------------------
# What every name maps to inside the optimizer
# --------------------------------------------------------------------------------------------------

def _entries(optimizer, layouts: Mapping | None = None) -> list[dict]:
    """Per parameter name: its unit index, block range in the unit's vector, numel and local segments.

    Sizes and blocks come from `layouts`, by default the optimizer's own (`AdamMini.layouts`)."""
    layouts = optimizer.layouts if layouts is None else layouts
    out = []
    for i, unit in enumerate(optimizer.units):
        base = 0
        segs: dict[str, list] = {}
        for s in unit.segments:
            if s.end > s.start:
                segs.setdefault(s.name, []).append(s)
        for name in unit.names:
            n_blocks = layouts[name].n_blocks
            out.append(dict(name=name, unit=i, blocks=(base, base + n_blocks), numel=layouts[name].numel,
                            segments=sorted(segs.get(name, []), key=lambda s: s.start),
                            sharded=unit.group is not None))
            base += n_blocks
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise ValueError("a parameter name appears in two units")
    return out


def _state(optimizer, i: int) -> dict:
    state = optimizer.state[optimizer.units[i].param]
    if not state and hasattr(optimizer, "init_state"):  # before the first step: zeros, step 0
        optimizer.init_state()
        state = optimizer.state[optimizer.units[i].param]
    if not state:
        raise RuntimeError(f"unit {optimizer.units[i].label!r} has no optimizer state")
    return state


def _hparams(optimizer) -> dict[str, torch.Tensor]:
    """`{lr, beta1, beta2, eps, weight_decay}` of the first param group, as 0-d float64 tensors.

    Tensors, not floats: on a rank that holds no piece of some parameter, DCP drops that
    ShardedTensor from its flattened state dict; the load planner (torch 2.13) then takes the
    checkpoint keys it misses for a pre-2.4 checkpoint and re-flattens with the 2.3 rules, under which
    a dict of plain scalars is a single leaf: loading failed with "Missing key ... optimizer.hparams".
    A dict holding tensors is traversed the same way by both rules.
    """
    g = optimizer.param_groups[0]
    values = dict(lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"],
                  weight_decay=optimizer.weight_decay)
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


def _set_hparams(optimizer, hp: Mapping[str, Any]) -> None:
    v = {k: float(torch.as_tensor(x).item()) for k, x in hp.items()}
    for group in optimizer.param_groups:
        group.update(lr=v["lr"], betas=(v["beta1"], v["beta2"]), eps=v["eps"])
    optimizer.set_weight_decay(v["weight_decay"])


# --------------------------------------------------------------------------------------------------
# Sharded (DCP) state dict
# --------------------------------------------------------------------------------------------------

def _kinds(optimizer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(per-element state keys, per-block state keys) of the optimizer."""
    return tuple(optimizer.ELEMENT_STATES), tuple(optimizer.BLOCK_STATES)


def _pieces(state: dict, key: str, e: dict) -> list[tuple[int, int, torch.Tensor]]:
    """`[start, end)` pieces of parameter `e` in this rank's per-element state `key`, as views."""
    flat = local_1d(state[key])
    return [(s.start, s.end, flat[s.offset:s.offset + (s.end - s.start)]) for s in e["segments"]]


def sharded_state_dict(optimizer, layouts: Mapping | None = None) -> dict[str, Any]:
    """Name-keyed state for `torch.distributed.checkpoint.save/load` (see module docstring).

    Collective when some unit is sharded (one `all_gather_object` over the default group: where every
    rank's pieces lie, the same for every per-element key): call it on every rank. The returned tensors
    alias the optimizer state where they can (per-element
    pieces, and per-block slices), so the dict is both what to save and where DCP loads to.
    """
    entries = _entries(optimizer, layouts)
    element_keys, block_keys = _kinds(optimizer)
    out: dict[str, Any] = {key: {} for key in (*element_keys, *block_keys, "step")}
    pieces: dict[str, dict[str, list]] = {key: {} for key in element_keys}
    for e in entries:
        state = _state(optimizer, e["unit"])
        lo, hi = e["blocks"]
        for key in block_keys:
            out[key][e["name"]] = state[key][lo:hi]
        out["step"][e["name"]] = state["step"].detach().clone().reshape(())
        for key in element_keys:
            views = _pieces(state, key, e)
            if e["sharded"]:
                pieces[key][e["name"]] = views
            elif len(views) != 1 or views[0][:2] != (0, e["numel"]):
                raise RuntimeError(f"{e['name']}: an unsharded unit must hold the whole parameter")
            else:
                out[key][e["name"]] = views[0][2]
    if any(pieces[key] for key in element_keys):
        if not distributed():
            raise RuntimeError("sharded optimizer units but torch.distributed is not initialised")
        # the pieces of every per-element key are cut by the same segments: where they lie is gathered once
        first = pieces[element_keys[0]]
        everyone = gather_objects({name: [(a, b, str(t.device)) for a, b, t in views] for name, views in first.items()})
        numel = {e["name"]: e["numel"] for e in entries}
        for key in element_keys:
            dtype = {e["name"]: _state(optimizer, e["unit"])[key].dtype for e in entries}
            out[key].update(_sharded_tensors(pieces[key], everyone, numel, dtype))
    out["hparams"] = _hparams(optimizer)
    return out


def _sharded_tensors(pieces: dict[str, list[tuple[int, int, torch.Tensor]]], everyone: list[dict],
                     numel: dict[str, int], dtype: dict[str, torch.dtype]) -> dict:
    """1-D ShardedTensors over the default group from this rank's `[start, end)` pieces and `everyone`, every
    rank's `{name: [(start, end, device)]}` (`amp_common.dist.gather_objects`)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    me = rank()
    out = {}
    for name in sorted(pieces):
        # Under hybrid sharding (HSDP) the replicas hold the same pieces: each distinct piece is listed once,
        # as this rank's if it holds it (so that every replica saves from and loads into its own copy), else as
        # the lowest holding rank's. DCP's save planner writes a piece that several ranks list only once.
        holder: dict[tuple[int, int], tuple[int, str]] = {}
        for r in range(len(everyone)):
            for a, b, device in (everyone[r] or {}).get(name, []):
                if (a, b) not in holder or r == me:
                    holder[(a, b)] = (r, device)
        shards_md, local = [], []
        for (a, b), (r, device) in sorted(holder.items()):
            md = ShardMetadata(shard_offsets=[a], shard_sizes=[b - a], placement=f"rank:{r}/{device}")
            shards_md.append(md)
            if r == me:
                view = next(t for x, y, t in pieces[name] if (x, y) == (a, b))
                local.append(Shard(tensor=view, metadata=md))
        if sum(md.shard_sizes[0] for md in shards_md) != numel[name]:
            raise RuntimeError(f"{name}: the ranks' pieces cover {sum(md.shard_sizes[0] for md in shards_md)} of "
                               f"{numel[name]} elements (are all ranks in the default group?)")
        props = TensorProperties(dtype=dtype[name], layout=torch.strided, requires_grad=False,
                                 memory_format=torch.contiguous_format, pin_memory=False)
        meta = ShardedTensorMetadata(shards_metadata=shards_md, size=torch.Size([numel[name]]),
                                     tensor_properties=props)
        out[name] = ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)
    return out


def load_sharded_state_dict(optimizer, state_dict: Mapping[str, Any], layouts: Mapping | None = None,
                            load_hparams: bool = True) -> None:
    """Put a name-keyed state (from `dcp.load` into `sharded_state_dict(opt)`, or full tensors) into `opt`.

    A per-element entry (`exp_avg[name]`) may be a ShardedTensor (its local shards must cover this rank's
    pieces) or a full 1-D / parameter-shaped tensor. Every name of the optimizer must be present; names of
    a unit must agree on `step`. `load_hparams`: also set lr, betas, eps and weight decay from the state.
    Not collective.
    """
    entries = _entries(optimizer, layouts)
    element_keys, block_keys = _kinds(optimizer)
    missing = [e["name"] for e in entries if e["name"] not in state_dict[element_keys[0]]]
    if missing:
        raise KeyError(f"optimizer state for {len(missing)} parameters is missing, e.g. {missing[:3]}")
    unit_steps: dict[int, float] = {}
    with torch.no_grad():
        for e in entries:
            name, state = e["name"], _state(optimizer, e["unit"])
            for key in element_keys:
                for a, b, dst in _pieces(state, key, e):
                    piece = _piece(state_dict[key][name], a, b, name, e["numel"])
                    if piece.data_ptr() != dst.data_ptr():
                        dst.copy_(piece)
            lo, hi = e["blocks"]
            for key in block_keys:
                v = torch.as_tensor(state_dict[key][name])
                if v.numel() != hi - lo:
                    raise ValueError(f"{name}: {key} has {v.numel()} entries, the layout has {hi - lo} blocks "
                                     f"(written with another Adam-mini partition?)")
                dst = state[key][lo:hi]
                if v.data_ptr() != dst.data_ptr():
                    dst.copy_(v.reshape(-1))
            t = float(torch.as_tensor(state_dict["step"][name]).item())
            if unit_steps.setdefault(e["unit"], t) != t:
                raise ValueError(f"unit {optimizer.units[e['unit']].label!r}: parameters saved with different steps "
                                 f"({unit_steps[e['unit']]} and {t} for {name})")
        for i, t in unit_steps.items():
            _state(optimizer, i)["step"].fill_(t)
    if load_hparams and state_dict.get("hparams"):
        _set_hparams(optimizer, state_dict["hparams"])


def _piece(src, start: int, end: int, name: str, numel: int) -> torch.Tensor:
    """Elements [start, end) of the flattened parameter-sized `src` (a full tensor or a ShardedTensor)."""
    if hasattr(src, "local_shards"):
        for shard in src.local_shards():
            a = shard.metadata.shard_offsets[0]
            b = a + shard.metadata.shard_sizes[0]
            if a <= start and end <= b:
                return shard.tensor.reshape(-1)[start - a:end - a]
        raise ValueError(f"{name}: no local shard of the loaded exp_avg covers [{start}, {end})")
    src = torch.as_tensor(src)
    if src.numel() != numel:
        raise ValueError(f"{name}: exp_avg has {src.numel()} elements, the parameter {numel}")
    return src.reshape(-1)[start:end]


# --------------------------------------------------------------------------------------------------
# Full (consolidated) state dict
# --------------------------------------------------------------------------------------------------

def full_state_dict(optimizer, layouts: Mapping | None = None, rank0_only: bool = True) -> dict[str, Any]:
    """The whole state by name as full tensors (per-element states parameter-sized 1-D), on CPU.

    Collective when some unit is sharded: call on every rank. With `rank0_only` the other ranks get
    an empty dict (and hold only one unit's pieces at a time while gathering).
    """
    entries = _entries(optimizer, layouts)
    element_keys, block_keys = _kinds(optimizer)
    keep = rank() == 0 or not rank0_only
    out: dict[str, Any] = {key: {} for key in (*element_keys, *block_keys, "step")}
    out["hparams"] = _hparams(optimizer)
    by_unit: dict[int, list[dict]] = {}
    for e in entries:
        by_unit.setdefault(e["unit"], []).append(e)
    for i, unit_entries in by_unit.items():
        state = _state(optimizer, i)
        local = {(key, e["name"]): [(a, b, t.detach().cpu().clone()) for a, b, t in _pieces(state, key, e)]
                 for key in element_keys for e in unit_entries}
        gathered = _gather_unit(optimizer.units[i], local, rank0_only, keep)
        if not keep:
            continue
        for e in unit_entries:
            name = e["name"]
            for key in element_keys:
                out[key][name] = _assemble(gathered, (key, name), e["numel"], local_1d(state[key]).dtype)
            lo, hi = e["blocks"]
            for key in block_keys:
                out[key][name] = state[key][lo:hi].detach().cpu().clone()
            out["step"][name] = state["step"].detach().cpu().clone().reshape(())
    return out if keep else {}


def _gather_unit(unit, local: dict, rank0_only: bool, keep: bool) -> list[dict]:
    """Every rank's pieces of one unit (on global rank 0 only with `rank0_only`)."""
    if unit.group is None:
        return [local]
    me, size = dist.get_rank(), dist.get_world_size(unit.group)
    if not rank0_only:
        gathered = [None] * size
        dist.all_gather_object(gathered, local, group=unit.group)
        return gathered
    dst = dist.get_global_rank(unit.group, 0)
    gathered = [None] * size if me == dst else None
    dist.gather_object(local, gathered, dst=dst, group=unit.group)
    if keep and me != dst:
        raise RuntimeError("full_state_dict(rank0_only=True): global rank 0 must be rank 0 of every group")
    return gathered


def _assemble(gathered: list[dict], key, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """One full 1-D tensor from the ranks' `[start, end)` pieces of `key` (each covered once)."""
    full = torch.full((numel,), float("nan"), dtype=dtype)
    covered, seen = 0, set()
    for part in gathered:
        for a, b, t in part.get(key, []):
            if (a, b) not in seen:
                seen.add((a, b))
                full[a:b] = t
                covered += b - a
    if covered != numel:
        raise RuntimeError(f"{key[1]}: gathered pieces of {key[0]} cover {covered} of {numel} elements")
    return full


# --------------------------------------------------------------------------------------------------
# DCP helpers
# --------------------------------------------------------------------------------------------------

class OptimizerState:
    """`Stateful` wrapper: put ``{"optimizer": OptimizerState(opt)}`` in a dict given to `dcp.save/load`.

    `load_hparams=False` keeps the optimizer's own lr, betas, eps and weight decay (the trainer's config
    wins over what the checkpoint was written with)."""

    def __init__(self, optimizer, layouts: Mapping | None = None, load_hparams: bool = True):
        self.optimizer, self.layouts, self.load_hparams = optimizer, layouts, load_hparams

    def state_dict(self) -> dict[str, Any]:
        return sharded_state_dict(self.optimizer, self.layouts)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_sharded_state_dict(self.optimizer, state_dict, self.layouts, load_hparams=self.load_hparams)


def save_optimizer(optimizer, path, layouts: Mapping | None = None) -> None:
    """Write the name-keyed state with DCP into directory `path` (every rank calls it; collective)."""
    import torch.distributed.checkpoint as dcp
    with quiet_checkpoint_warnings():
        dcp.save({"optimizer": sharded_state_dict(optimizer, layouts)}, checkpoint_id=str(path),
                 no_dist=not distributed())


def load_optimizer(optimizer, path, layouts: Mapping | None = None, load_hparams: bool = True) -> None:
    """Read a checkpoint written by `save_optimizer` (any world size, any sharding) into `optimizer`. Its
    `.metadata` is read through the checkpoint tools' safe reader: a crafted one is a CheckpointError, never code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from checkpoints_util.layout import CheckpointError
    from checkpoints_util.store import read_metadata, root_cause, safe_reader

    read_metadata(path)  # one CheckpointError naming a crafted or damaged .metadata, before DCP wraps it
    with quiet_checkpoint_warnings():
        sd = {"optimizer": sharded_state_dict(optimizer, layouts)}
        try:
            dcp.load(sd, storage_reader=safe_reader(path), no_dist=not distributed())
        except (Exception, CheckpointException) as e:  # DCP wraps the safe reader's refusal
            if isinstance(root_cause(e), CheckpointError):
                raise root_cause(e) from None
            raise
    load_sharded_state_dict(optimizer, sd["optimizer"], layouts, load_hparams=load_hparams)
