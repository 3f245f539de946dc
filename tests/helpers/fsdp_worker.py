"""Spawned workers for tests/test_optim_fsdp.py and tests/test_optim_adamw_fsdp.py (CPU, gloo): FSDP1/FSDP2
Adam-mini (and AdamW) vs single process, with the app's loss (`pretrain.step.batch_loss`).

One spawn per world size runs every variant, so the ~10 s process start-up is paid once. Rank 0 also
runs the single-process reference and writes a results file that the test asserts on.
"""
from __future__ import annotations

import contextlib
import os
import traceback
import zlib

import torch
import torch.distributed as dist

import models
from optim.build import build_optimizer, model_units
from optim.layout import Partition, model_layout
from optim.state import full_state_dict, load_optimizer, save_optimizer
from optim.units import canonical_name, local_1d
from pretrain.step import batch_loss

# The `debug` model with a small MLP: its FSDP1 Block units are cut inside a K group at W=3 and inside
# a Q head at W=4 (the default `debug` sizes cut no qkv block at any W <= 4); the test asserts it.
CONFIG_OVERRIDES = dict(intermediate_size=20)
SEQ, BATCH, STEPS = 16, 12, 10
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


@contextlib.contextmanager
def one_thread():
    """Run the enclosed computation on one torch thread, as the spawned workers do (`run`).

    CPU matmuls round differently with another thread count: a reference computed on 2 threads differs from
    the same computation on 1 by up to 3e-6 relative after 10 Adam steps (measured), above the tests' 1e-6.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def config():
    return models.get_config("debug", **CONFIG_OVERRIDES)


def batch(step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Global batch of step `step` (same on every world size); rows of `rank`."""
    g = torch.Generator().manual_seed(1234 + step)
    data = torch.randint(0, config().padded_vocab_size, (BATCH, SEQ + 1), generator=g)
    per = BATCH // world
    return data[rank * per:(rank + 1) * per]


def new_model():
    from litgpt.model import GPT
    torch.manual_seed(0)
    cfg = config()
    model = GPT(cfg)
    models.init_model(model, cfg.n_layer, cfg.n_embd)
    return model


def partition_of(options: dict) -> Partition:
    """The `Partition` that the Adam-mini `options` (build_optimizer keywords) choose."""
    return Partition(**{k: v for k, v in options.items() if k in ("embedding_blocks", "value_blocks")})


def train(model, opt, steps, rank=0, world=1, first=0, synthetic=False):
    """Sharded training: this rank's rows of each global batch (FSDP averages the gradients); with `synthetic`,
    the gradients are then replaced by this rank's pieces of `synthetic_grad` (the same on any sharding)."""
    for t in range(first, first + steps):
        opt.zero_grad(set_to_none=True)
        batch_loss(model, batch(t, rank, world)).backward()
        if synthetic:
            put_synthetic_grads(opt, t)
        opt.step()


def train_reference(model, opt, steps, world, first=0, synthetic=False):
    """Single process, same data: the gradient of each of the `world` micro-batches, summed, / world.

    That is what the sharded run's gradient is mathematically (FSDP sums the ranks' gradients and
    divides by the world size); computing it the same way keeps rounding differences in the gradient
    (~1e-7 relative when the full batch is used instead) out of the comparison of the optimizers.
    """
    params = list(model.parameters())
    for t in range(first, first + steps):
        total = [torch.zeros_like(p) for p in params]
        for r in range(world):
            model.zero_grad(set_to_none=True)
            batch_loss(model, batch(t, r, world)).backward()
            for acc, p in zip(total, params):
                acc += p.grad
        for acc, p in zip(total, params):
            p.grad = acc / world
        if synthetic:
            put_synthetic_grads(opt, t)
        opt.step()


def initial_params() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in new_model().named_parameters()}


# ---------------------------------------------------------------------------------------- wrapping
# HSDP kinds ("hsdp1": FSDP1 HYBRID_SHARD, "hsdp2": FSDP2 on a 2-D mesh): 2 replicas x world/2 shards
HSDP_REPLICAS = 2


def hsdp_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (HSDP_REPLICAS, world // HSDP_REPLICAS), mesh_dim_names=("replicate", "shard"))


def shard_of(kind: str, rank: int, world: int) -> tuple[int, int]:
    """(rank in its shard group, shard group size) of `rank` under `kind`."""
    if kind.startswith("hsdp"):
        size = world // HSDP_REPLICAS
        return rank % size, size
    return rank, world


def wrap_fsdp1(model, hybrid: bool = False, world: int = 0):
    from litgpt.model import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    extra = dict(sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=hsdp_mesh(world)) if hybrid else \
        dict(sharding_strategy=ShardingStrategy.FULL_SHARD)
    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"),
                use_orig_params=False, **extra)


def wrap_fsdp2(model, world, hybrid: bool = False):
    from litgpt.model import Block
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = hsdp_mesh(world) if hybrid else init_device_mesh("cpu", (world,))
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class FabricLike(torch.nn.Module):
    """Registers the wrapped model twice, as Lightning's _FabricModule does."""

    def __init__(self, model):
        super().__init__()
        self._forward_module = model
        self._original_module = model


def full_params(model, kind) -> dict[str, torch.Tensor]:
    if kind in ("plain", "ddp"):
        return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}
    if kind in ("fsdp1", "hsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, writeback=False):
            return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}
    return {canonical_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------- geometry
def describe_units(units, layouts, rank: int = 0, world: int = 1) -> list[dict]:
    """Per unit, what this rank holds and which block kinds its segment boundaries cut mid-block.

    For FSDP1 units also whether `optim.flat.flat_shard_segments` (the pure replica of FSDP1's split
    that the benchmark uses) gives the same segments and padding as FSDP's own fields.
    """
    from optim.flat import flat_shard_segments
    out = []
    for u in units:
        local = u.param.to_local() if hasattr(u.param, "to_local") else u.param
        held = sum(s.end - s.start for s in u.segments)
        cuts = []
        for s in u.segments:
            lay = layouts[s.name]
            for x in (s.start, s.end):
                if 0 < x < lay.numel:
                    kind = cut_kind(lay, x)
                    if kind:
                        cuts.append((s.name, x, kind))
        replica_ok = None
        if u.label.startswith("fsdp1:"):
            segs, shard_numel, pad = flat_shard_segments([layouts[n].numel for n in u.names], rank, world)
            replica_ok = (shard_numel == local.numel() and pad == local.numel() - held and
                          [(u.names[i], a, b, o) for i, a, b, o in segs]
                          == [(s.name, s.start, s.end, s.offset) for s in u.segments])
        group_ranks = None if u.group is None else tuple(dist.get_process_group_ranks(u.group))
        out.append(dict(label=u.label, names=u.names, local_numel=local.numel(), held=held, replica_ok=replica_ok,
                        group_ranks=group_ranks,
                        padding=local.numel() - held,
                        segments=[(s.name, s.start, s.end, s.offset) for s in u.segments],
                        partial_only=len(u.segments) == 1 and (u.segments[0].end - u.segments[0].start)
                        < layouts[u.segments[0].name].numel,
                        cuts=cuts))
    return out


def cut_kind(lay, x: int) -> str | None:
    """The kind of block that element boundary `x` cuts in the middle, or None on a block boundary."""
    begin = 0
    for run_index, (n, b) in enumerate(lay.runs):
        if x < begin + n * b:
            if (x - begin) % b == 0:
                return None
            if lay.kind == "qkv":
                return ("q_head", "k_group", "v_block")[run_index]
            return {"rows": "row", "tokens": "token_row", "whole": "whole", "elements": None}[lay.kind]
        begin += n * b
    return None


def rel_err(a: dict, b: dict, base: dict | None = None) -> dict[str, tuple[float, float]]:
    """Per name: (max|a-b| / max|b|, max|a-b| / max|b-base|)."""
    out = {}
    for n in b:
        d = (a[n] - b[n]).abs().max().item()
        scale = b[n].abs().max().item()
        upd = (b[n] - base[n]).abs().max().item() if base is not None else float("nan")
        out[n] = (d / scale if scale else d, d / upd if upd else d)
    return out


# ---------------------------------------------------------------------------------------- tasks
def synthetic_grad(name: str, shape, step: int) -> torch.Tensor:
    """A deterministic gradient for `name` at `step`, with row scales spread over two decades."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 31 + step)
    grad = torch.randn(tuple(shape), generator=g)
    if grad.dim() == 2:
        grad *= torch.exp(2.3 * torch.rand(grad.shape[0], 1, generator=g))
    return grad * 1e-2


def put_synthetic_grads(opt, step: int) -> None:
    """Overwrite the local gradients of `opt`'s units with this rank's pieces of the synthetic full gradients."""
    for u in opt.units:
        grad = local_1d(u.param.grad)
        for s in u.segments:
            full = synthetic_grad(s.name, opt.layouts[s.name].shape, step).reshape(-1)
            grad[s.offset:s.offset + s.end - s.start].copy_(full[s.start:s.end])


def reference_model(wd: float, options: dict):
    """The unsharded model and its Adam-mini (default implementation: native on CPU) with `options`."""
    model = new_model()
    return model, build_optimizer(model, config(), "adam_mini", weight_decay=wd, **options, **HP)


def reference_run(wd: float, options: dict, splits: list[tuple[int, int]], synthetic: bool):
    """Uninterrupted single-process run: for each `(steps, world)`, `steps` steps with the batch split like `world`
    (or synthetic gradients); its final parameters and name-keyed state."""
    model, opt = reference_model(wd, options)
    first = 0
    for steps, world in splits:
        train_reference(model, opt, steps, world, first=first, synthetic=synthetic)
        first += steps
    return {n: p.detach().clone() for n, p in model.named_parameters()}, full_state_dict(opt)


def state_err(got: dict, ref: dict) -> dict[str, float]:
    """Max over names of max|a-b| / max|b| for exp_avg and exp_avg_sq, whether the steps agree, and
    whether exp_avg has the reference's dtype."""
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        worst = 0.0
        for n, b in ref[key].items():
            a, b = got[key][n].double(), b.double()
            scale = b.abs().max().item()
            worst = max(worst, (a - b).abs().max().item() / (scale if scale else 1.0))
        out[key] = worst
    out["step"] = float(all(float(got["step"][n]) == float(ref["step"][n]) for n in ref["step"]))
    out["dtype"] = float(all(got["exp_avg"][n].dtype == m.dtype for n, m in ref["exp_avg"].items()))
    return out


def build(kind: str, world: int, wd: float, options: dict, init: dict | None = None, drop_groups: bool = False,
          world_groups: bool = False):
    """A model (optionally loaded with full `init` parameters), wrapped as `kind`, and its Adam-mini
    from `optim.build.build_optimizer` (which dispatches on the wrapping) with Adam-mini `options`.

    Negative controls: `drop_groups` (no all-reduce of the block sums), `world_groups` (the block sums of the
    sharded units all-reduced over the whole world, i.e. also across HSDP replicas)."""
    model = new_model()
    if init is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(init[n])
    if kind in ("fsdp1", "hsdp1"):
        model = wrap_fsdp1(model, kind == "hsdp1", world)
    elif kind in ("fsdp2", "hsdp2"):
        model = wrap_fsdp2(model, world, kind == "hsdp2")
    elif kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
    elif kind != "plain":
        raise ValueError(kind)
    opt = build_optimizer(model, config(), "adam_mini", weight_decay=wd, **options, **HP)
    if drop_groups:  # negative control: no all-reduce of the block sums
        for u in opt.units:
            u.group = None
    if world_groups:
        for u in opt.units:
            if u.group is not None:
                u.group = dist.group.WORLD
    return model, opt


def run_steps(kind: str, model, opt, rank: int, world: int, first: int, steps: int, synthetic: bool) -> None:
    if kind == "plain":
        train_reference(model, opt, steps, world, first=first, synthetic=synthetic)
    else:
        train(model, opt, steps, rank, world, first=first, synthetic=synthetic)


def task_eq(task: dict, rank: int, world: int, base, refs: dict) -> dict | None:
    """Sharded Adam-mini for STEPS steps vs the single-process one on the same data (or gradients)."""
    kind, wd, flags, options = task["kind"], task["wd"], task.get("flags", ()), task.get("options", {})
    model, opt = build(kind, world, wd, options, drop_groups="nogroup" in flags, world_groups="worldgroup" in flags)
    # optim.state reads each parameter's blocks and size from the layouts the optimizer keeps
    layouts = model_layout(config(), model_units(model)[1], partition_of(options))
    assert opt.layouts == layouts, "the optimizer's layouts differ from the model's"
    geo = describe_units(opt.units, layouts, *shard_of(kind, rank, world))
    if kind == "fsdp1":  # names are the same seen through a Fabric-like wrapper (`_forward_module`)
        from optim.flat import fsdp1_units
        assert [u.names for u in fsdp1_units(FabricLike(model))[0]] == [u.names for u in opt.units]
    synthetic = "synthetic" in flags
    run_steps(kind, model, opt, rank, world, 0, STEPS, synthetic)
    got = full_params(model, kind)
    # (the negative control dropped the groups, so its pieces cannot be gathered by full_state_dict)
    got_state = None if {"nogroup", "worldgroup"} & set(flags) else full_state_dict(opt)
    geos = [None] * world
    dist.all_gather_object(geos, geo)
    if rank != 0:
        return None
    key = (wd, synthetic, tuple(sorted(options.items())), None if synthetic else world)
    if key not in refs:
        refs[key] = reference_run(wd, options, [(STEPS, world)], synthetic)
    ref_params, ref_state = refs[key]
    return dict(err=rel_err(got, ref_params, base), geometry=geos, options=options,
                state_err=None if got_state is None else state_err(got_state, ref_state))


def task_save(task: dict, rank: int, world: int) -> dict | None:
    """Train 5 steps as `kind` on this world, write model.pt (full parameters) and the DCP optimizer state."""
    kind, wd, path, options = task["kind"], task["wd"], task["path"], task.get("options", {})
    synthetic = "synthetic" in task.get("flags", ())
    model, opt = build(kind, world, wd, options)
    run_steps(kind, model, opt, rank, world, 0, 5, synthetic)
    params = full_params(model, kind)
    save_optimizer(opt, os.path.join(path, "optimizer"))
    if rank == 0:
        torch.save(dict(params=params, world=world, wd=wd, options=options, synthetic=synthetic),
                   os.path.join(path, "model.pt"))
    if world > 1:
        dist.barrier()
    return dict(saved=path) if rank == 0 else None


def task_load(task: dict, rank: int, world: int) -> dict | None:
    """Load a checkpoint written on another world size / sharding, train 5 more steps, vs uninterrupted."""
    kind, path = task["kind"], task["path"]
    saved = torch.load(os.path.join(path, "model.pt"), weights_only=True)
    # built with a different weight decay on purpose: load_optimizer must restore the saved hparams
    model, opt = build(kind, world, 0.5, saved["options"], init=saved["params"])
    load_optimizer(opt, os.path.join(path, "optimizer"))
    assert opt.param_groups[0]["weight_decay"] == saved["wd"], "hparams not restored"
    if kind.startswith("hsdp"):  # every replica loaded its own copy of the pieces it holds
        assert_replicas_agree(opt, rank, world)
    dtypes = {opt.state[u.param]["exp_avg"].dtype for u in opt.units}
    assert dtypes == {opt.momentum_dtype}, f"first moment loaded as {dtypes}"
    run_steps(kind, model, opt, rank, world, 5, 5, saved["synthetic"])
    got = full_params(model, kind)
    if rank != 0:
        return None
    ref, _ = reference_run(saved["wd"], saved["options"], [(5, saved["world"]), (5, world)], saved["synthetic"])
    return dict(err=rel_err(got, ref, saved["params"]), saved_world=saved["world"], options=saved["options"])


def assert_replicas_agree(opt, rank: int, world: int) -> None:
    """Under HSDP the replicas' optimizer states are bitwise equal (each rank against its shard-rank peer)."""
    digest = [zlib.crc32(local_1d(opt.state[u.param][k]).detach().contiguous().view(torch.uint8).numpy().tobytes())
              for u in opt.units for k in ("exp_avg", "exp_avg_sq")]
    everyone = [None] * world
    dist.all_gather_object(everyone, digest)
    shard, size = shard_of("hsdp", rank, world)
    assert everyone[rank] == everyone[shard], f"rank {rank}: optimizer state differs from its replica peer {shard}"


def run_tasks(tasks, rank: int, world: int) -> dict:
    results: dict = {"world": world}
    base = initial_params() if rank == 0 else None
    refs: dict = {}
    for task in tasks:
        op = task["op"]
        if op == "eq":
            res = task_eq(task, rank, world, base, refs)
        elif op == "save":
            res = task_save(task, rank, world)
        elif op == "load":
            res = task_load(task, rank, world)
        else:
            raise ValueError(task)
        if world > 1:
            dist.barrier()
        results[task["name"]] = res
    return results


# ---------------------------------------------------------------------------------------- main
def run(rank: int, world: int, out_dir: str, tasks) -> None:
    """`helpers.dist.spawn(run, world, out_dir, tasks)`: every task on every rank; rank 0 saves the results."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        results = run_tasks(tasks, rank, world)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, f"result_w{world}.pt"))
    except Exception:
        traceback.print_exc()
        raise
