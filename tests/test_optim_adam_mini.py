"""AdamMini against an independent float64 reference written from the formula in ADAM_MINI.md.

The reference expands every block to a per-element block id (fine for a test, forbidden in the
optimizer) and applies the update with index_add / gather, so it shares no code path with the
chunked implementation. Sharding is simulated in one process with threads standing in for ranks and a
fake all-reduce, which exercises the exact protocol (partial sums, one reduction per unit per step).
"""
from __future__ import annotations

import copy
import io
import os
import threading

import pytest
import torch
import torch.distributed as dist

import models
from helpers.dist import spawn
from helpers.optim_reference import (
    HP,
    Reference,
    adopt_ties,
    debug_model,
    near_bf16_tie,
    random_grads,
    rel_err,
    round_bf16,
    set_grads,
    step_both,
)
from optim.adam_mini import AdamMini
from optim.build import build_optimizer, optimizer_state_bytes
from optim.layout import Partition, model_layout
from optim.memory import adam_mini_state_bytes, adamw_state_bytes, v_entries
from optim.units import Segment, Unit, units_from_module
from pretrain.step import batch_loss


# ----------------------------------------------------------------------------- unsharded update
@pytest.mark.parametrize("grad_scale, eps", [(1.0, 1e-8), (1e-4, 1e-4)])  # second case: eps placement matters
def test_matches_float64_reference_on_debug_model(grad_scale, eps):
    config, model = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    hp = dict(HP, eps=eps)
    opt = AdamMini(units_from_module(model), layouts, implementation="eager", **hp)
    ref = Reference(dict(model.named_parameters()), layouts, **hp)
    wrong = Reference(dict(model.named_parameters()), layouts, **hp, eps_inside_sqrt=True)
    p0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(10):
        grads = random_grads(model, step, scale=grad_scale)
        lr = HP["lr"] * (1 + 0.1 * step)  # the training loop changes lr every step
        opt.param_groups[0]["lr"] = lr
        set_grads(model, grads)
        opt.step()
        ref.step(grads, lr=lr)
        wrong.step(grads, lr=lr)
    for n, p in model.named_parameters():
        assert rel_err(p, ref.p[n]) <= 1e-6, n
        moved = ref.p[n] - p0[n]
        assert rel_err(p.detach().double() - p0[n], moved) <= 1e-5, n
        st = opt.state[p]
        assert rel_err(st["exp_avg_sq"], ref.v[n]) <= 1e-5 and float(st["step"]) == 10
    if eps > 1e-6:  # the comparison is sensitive to where eps goes
        assert max(rel_err(ref.p[n], wrong.p[n]) for n in ref.p) > 1e-4


def test_none_grads_are_skipped_and_closure_works():
    config, model = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    opt = AdamMini(units_from_module(model), layouts, implementation="eager", **HP)
    ref = Reference(dict(model.named_parameters()), layouts, **HP)
    skipped = {"transformer.h.1.attn.qkv.weight", "transformer.ln_f.weight"}
    before = {n: dict(model.named_parameters())[n].detach().clone() for n in skipped}
    for step in range(3):
        grads = random_grads(model, step, none=skipped if step < 2 else ())

        def closure():
            set_grads(model, grads)
            return torch.tensor(float(step))

        assert float(opt.step(closure)) == step
        ref.step(grads)
    params = dict(model.named_parameters())
    for n in skipped:
        assert float(opt.state[params[n]]["step"]) == 1
        assert not torch.equal(params[n], before[n])
    for n, p in params.items():
        assert rel_err(p, ref.p[n]) <= 1e-6, n


def _run(model, opt, steps):
    for step in steps:
        set_grads(model, random_grads(model, step))
        opt.param_groups[0]["lr"] = HP["lr"] / (1 + step)
        opt.step()


def test_state_dict_round_trip_continues_exactly():
    config, model_a = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model_a.named_parameters()])
    model_b = copy.deepcopy(model_a)
    opt_a = AdamMini(units_from_module(model_a), layouts, implementation="eager", **HP)
    _run(model_a, opt_a, range(10))

    opt_b = AdamMini(units_from_module(model_b), layouts, implementation="eager", **HP)
    _run(model_b, opt_b, range(5))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _, model_c = debug_model(seed=123)  # different weights: everything must come from the checkpoint
    model_c.load_state_dict(saved["model"])
    opt_c = AdamMini(units_from_module(model_c), layouts, implementation="eager", lr=0.5, betas=(0.5, 0.5), eps=1.0,
                     weight_decay=0.0)
    opt_c.load_state_dict(saved["optim"])
    assert opt_c.param_groups[0]["betas"] == HP["betas"] and opt_c.param_groups[0]["weight_decay"] == HP["weight_decay"]
    _run(model_c, opt_c, range(5, 10))
    for (n, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), n


@pytest.mark.parametrize("path", ["eager", "native"])
def test_bf16_params_keep_fp32_state(path):
    _skip_unavailable(path)
    config, model = debug_model(dtype=torch.bfloat16)
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    opt = AdamMini(units_from_module(model), layouts, implementation=path, **HP)
    assert opt.implementation == path
    # reference: float64 math, rounded to bf16 after every step like the optimizer's write-back
    ref = Reference(dict(model.named_parameters()), layouts, **HP)
    for step in range(5):
        grads = random_grads(model, step)
        set_grads(model, grads)
        opt.step()
        ref.step(grads)
        for n in ref.p:
            ref.p[n] = ref.p[n].to(torch.bfloat16).double()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        ulp = ref.p[n].abs().clamp_min(1e-3) * 2.0 ** -7
        off = (p.double() - ref.p[n]).abs() > ulp
        assert float(off.double().mean()) < 1e-3, n  # at most rare rounding-boundary differences


def _skip_unavailable(implementation: str) -> None:
    from optim import kernels, native

    if implementation == "native" and not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    if implementation == "compiled" and not kernels.compile_available():
        pytest.skip("torch.compile is not usable here")


def test_round_bf16_helpers_by_hand():
    """The reference's own rounding, on hand-picked float64 values (8 significant bits)."""
    x = torch.tensor([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8), 3.0, 0.0],
                     dtype=torch.float64)
    want = torch.tensor([1.0, 1.0, 1 + 2 ** -6, 1 + 2 ** -7, -1.0, 3.0, 0.0], dtype=torch.float64)
    assert torch.equal(round_bf16(x), want)
    assert near_bf16_tie(x, torch.full_like(x, 2.0 ** -31)).tolist() == [False, True, True, False, True, False, False]
    assert near_bf16_tie(x, torch.full_like(x, 2.0 ** -29)).tolist() == [False, True, True, True, True, False, False]


@pytest.mark.parametrize("implementation", ["eager", "native", "compiled"])
def test_bf16_momentum_matches_float64_reference_that_rounds_m(implementation):
    """bf16 m: every write is m rounded to nearest even, and the step uses the stored m: 10 steps against a
    float64 reference that rounds its m to bf16 after each step (ties within float32 precision excepted)."""
    _skip_unavailable(implementation)
    config, model = debug_model()
    params = dict(model.named_parameters())
    layouts = model_layout(config, [(n, p.shape) for n, p in params.items()])
    opt = AdamMini(units_from_module(model), layouts, implementation=implementation, momentum_dtype=torch.bfloat16,
                   **HP)
    assert opt.implementation == implementation
    ref = Reference(params, layouts, **HP, bf16_momentum=True)
    adopted = [0]
    for step in range(10):
        grads = random_grads(model, step)
        lr = HP["lr"] * (1 + 0.1 * step)
        opt.param_groups[0]["lr"] = lr
        set_grads(model, grads)
        opt.step()
        stored = {n: opt.state[p]["exp_avg"].double() for n, p in params.items()}
        ref.step(grads, lr=lr, ties=adopt_ties(stored, adopted))
    writes = 10 * sum(p.numel() for p in params.values())
    assert adopted[0] <= 1e-4 * writes, f"{adopted[0]} of {writes} writes off the float64 rounding"
    for n, p in params.items():
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(st["exp_avg"].double(), ref.m[n]), n
        assert rel_err(p, ref.p[n]) <= 1e-6, n
        assert rel_err(st["exp_avg_sq"], ref.v[n]) <= 1e-5, n


def test_bf16_momentum_state_dict_resume_keeps_bf16_and_casts_other_dtypes():
    config, model_a = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model_a.named_parameters()])
    model_b = copy.deepcopy(model_a)
    bf16 = dict(momentum_dtype=torch.bfloat16, **HP)
    opt_a = AdamMini(units_from_module(model_a), layouts, **bf16)
    _run(model_a, opt_a, range(6))
    opt_b = AdamMini(units_from_module(model_b), layouts, **bf16)
    _run(model_b, opt_b, range(3))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _, model_c = debug_model(seed=5)
    model_c.load_state_dict(saved["model"])
    opt_c = AdamMini(units_from_module(model_c), layouts, **bf16)
    opt_c.load_state_dict(saved["optim"])
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt_c.state.values())
    _run(model_c, opt_c, range(3, 6))
    for (n, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), n
        assert torch.equal(opt_a.state[pa]["exp_avg"], opt_c.state[pc]["exp_avg"]), n
    # another momentum dtype in the checkpoint: cast to the configured one (bf16: round to nearest even)
    widened = AdamMini(units_from_module(model_c), layouts, **HP)
    widened.load_state_dict(saved["optim"])
    model_d = copy.deepcopy(model_c)
    fp32 = AdamMini(units_from_module(model_d), layouts, **HP)
    _run(model_d, fp32, range(2))
    narrowed = AdamMini(units_from_module(model_d), layouts, **bf16)
    narrowed.load_state_dict(fp32.state_dict())
    for (pb, pc), pd in zip(zip(model_b.parameters(), model_c.parameters()), model_d.parameters()):
        assert torch.equal(widened.state[pc]["exp_avg"], opt_b.state[pb]["exp_avg"].float())
        m32 = fp32.state[pd]["exp_avg"]
        assert narrowed.state[pd]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(narrowed.state[pd]["exp_avg"], m32.to(torch.bfloat16)) and m32.abs().max() > 0


# ----------------------------------------------------------------------------- simulated sharding
class FakeGroup:
    """Threads as ranks: all_reduce(SUM) via a barrier; counts reductions per rank."""

    def __init__(self, world):
        self.world, self.barrier = world, threading.Barrier(world)
        self.slots, self.calls, self.local = [None] * world, [0] * world, threading.local()

    def all_reduce(self, tensor, op=None, group=None):
        assert group is self and op == dist.ReduceOp.SUM
        rank = self.local.rank
        self.calls[rank] += 1
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        tensor.copy_(total)


def shard_units(names, layouts, flat, cuts, group, pad):
    """Split a flat concatenation of `names` at `cuts` (FSDP-style), one Unit per simulated rank."""
    starts, pos = {}, 0
    for n in names:
        starts[n] = pos
        pos += layouts[n].numel
    units = []
    for r, (a, b) in enumerate(zip(cuts, cuts[1:])):
        segs = []
        for n in names:
            s, e = max(a, starts[n]), min(b, starts[n] + layouts[n].numel)
            if s < e:
                segs.append(Segment(n, s - starts[n], e - starts[n], s - a))
        size = (b - a) + (pad if r == len(cuts) - 2 else 0)
        local = torch.full((size,), 7.0)  # padding sentinel
        local[: b - a] = flat[a:b]
        units.append(Unit(param=torch.nn.Parameter(local), names=tuple(names), segments=tuple(segs),
                          group=group, label=f"rank{r}"))
    return units


@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.bfloat16])
def test_sharded_units_with_mid_block_cuts_match_reference_and_unsharded(monkeypatch, momentum_dtype):
    """Six simulated ranks vs the float64 reference and vs the unsharded optimizer (default implementation)."""
    config, model = debug_model()
    params = dict(model.named_parameters())
    names = ["transformer.h.0.norm_1.weight", "transformer.h.0.attn.qkv.weight", "transformer.h.0.attn.proj.weight",
             "transformer.h.0.norm_2.weight", "transformer.h.0.mlp.fc_1.weight"]
    layouts = model_layout(config, [(n, params[n].shape) for n in names])
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    # cut inside Q head 1 (qkv starts at 64), inside K group 0, inside a V row, inside a proj row, in norm_2
    cuts = [0, 64 + 1024 + 517, 64 + 4096 + 700, 64 + 6144 + 33, 64 + 8192 + 100, 64 + 8192 + 4096 + 30, flat.numel()]
    world, pad = len(cuts) - 1, 5
    group = FakeGroup(world)
    monkeypatch.setattr(dist, "all_reduce", group.all_reduce)
    units = shard_units(names, layouts, flat, cuts, group, pad)
    hp = dict(HP, momentum_dtype=momentum_dtype)
    opts = [AdamMini([u], layouts, implementation="eager", **hp) for u in units]
    for left, right in zip(opts, opts[1:]):  # every cut splits a block between two ranks
        last, first = left.plans[0].chunks[-1], right.plans[0].chunks[0]
        full = left.plans[0].block_numel(last.block)
        assert last.block == first.block and last.length + first.length == full
    whole = {n: torch.nn.Parameter(params[n].detach().clone()) for n in names}
    unsharded = AdamMini([Unit(p, (n,), (Segment(n, 0, p.numel(), 0),), label=n) for n, p in whole.items()],
                         layouts, **hp)
    ref = Reference({n: params[n] for n in names}, layouts, **HP, bf16_momentum=momentum_dtype == torch.bfloat16)
    adopted = [0]

    def sharded_m():
        m = torch.cat([o.state[u.param]["exp_avg"][: b - a] for o, u, a, b in zip(opts, units, cuts, cuts[1:])])
        return dict(zip(names, m.split([layouts[n].numel for n in names])))

    for step in range(10):
        grads = {n: g for n, g in random_grads(model, step).items() if n in names}
        gflat = torch.cat([grads[n].reshape(-1) for n in names])
        for u, a, b in zip(units, cuts, cuts[1:]):
            g = torch.randn(u.param.numel())  # garbage in the padding must be ignored
            g[: b - a] = gflat[a:b]
            u.param.grad = g
        threads = [threading.Thread(target=lambda r=r: (setattr(group.local, "rank", r), opts[r].step()))
                   for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n, p in whole.items():
            p.grad = grads[n].clone()
        unsharded.step()
        ref.step(grads, ties=adopt_ties({n: m.double() for n, m in sharded_m().items()}, adopted))
    assert group.calls == [10] * world  # one all-reduce per unit per step
    assert adopted[0] <= 1e-4 * 10 * flat.numel()
    got = torch.cat([u.param.detach()[: b - a] for u, a, b in zip(units, cuts, cuts[1:])])
    assert rel_err(got, torch.cat([ref.p[n].reshape(-1) for n in names])) <= 1e-6
    assert rel_err(got, torch.cat([p.detach().reshape(-1) for p in whole.values()]).double()) <= 1e-6
    for n, m in sharded_m().items():  # the first moment of the sharded run is the unsharded one, bit for bit
        assert m.dtype == momentum_dtype and torch.equal(m, unsharded.state[whole[n]]["exp_avg"]), n
    assert torch.equal(units[-1].param.detach()[-pad:], torch.full((pad,), 7.0))
    assert torch.equal(opts[-1].state[units[-1].param]["exp_avg"][-pad:], torch.zeros(pad, dtype=momentum_dtype))
    v_ref = torch.cat([ref.v[n] for n in names])
    for opt, u in zip(opts, units):  # v is replicated and exact on every rank
        assert rel_err(opt.state[u.param]["exp_avg_sq"], v_ref) <= 1e-5


def test_compiled_chunks_equal_eager_on_full_and_partial_chunks():
    """Compiled per-chunk kernels vs the eager path, on shards with partial blocks (few shapes: compile is slow)."""
    from optim import kernels

    if not kernels.compile_available():
        pytest.skip("torch.compile is not usable here")
    config, model = debug_model()
    params = dict(model.named_parameters())
    names = ["transformer.h.0.norm_1.weight", "transformer.h.0.attn.qkv.weight"]
    layouts = model_layout(config, [(n, params[n].shape) for n in names])
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    cuts = [0, 64 + 4096 + 512, flat.numel()]  # mid K group: both ranks get a (512, 1) partial chunk
    runs = {}
    for impl in ("eager", "compiled"):
        units = shard_units(names, layouts, flat, cuts, None, pad=3)
        opts = [AdamMini([u], layouts, implementation=impl, **HP) for u in units]
        assert all(o.implementation == impl for o in opts)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for opt, u in zip(opts, units):
                u.param.grad = torch.randn(u.param.numel(), generator=gen)
                opt.param_groups[0]["lr"] = HP["lr"] / (1 + step)
                opt.step()
        runs[impl] = [(u.param.detach().clone(), o.state[u.param]) for u, o in zip(units, opts)]
    assert kernels.cached_kernels() >= 4
    for (pe, se), (pf, sf) in zip(runs["eager"], runs["compiled"]):
        assert rel_err(pf, pe.double()) <= 1e-6
        assert rel_err(sf["exp_avg"], se["exp_avg"].double()) <= 1e-6
        assert torch.equal(sf["exp_avg_sq"], se["exp_avg_sq"])
    assert torch.equal(runs["compiled"][-1][0][-3:], torch.full((3,), 7.0))  # padding untouched


def test_compiled_rows_equal_eager_and_reference():
    """Unsharded units (complete blocks): the grouped compiled kernels (block sums included) vs eager and float64.

    The compiled path serves these units off CPU (on CPU the native kernel does, see test_optim_native).

    v is summed in another order than eager's vector_norm, so it matches to rounding, not bit for bit."""
    from optim import kernels

    if not kernels.compile_available():
        pytest.skip("torch.compile is not usable here")
    config, _ = debug_model()
    runs = {}
    for impl in ("eager", "compiled"):
        _, model = debug_model()
        layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
        opt = AdamMini(units_from_module(model), layouts, implementation=impl, **HP)  # native: test_optim_native
        assert opt.implementation == impl and all(p.complete_blocks for p in opt.plans)
        ref = Reference(dict(model.named_parameters()), layouts, **HP)
        for step in range(3):
            grads = random_grads(model, step)
            lr = HP["lr"] / (1 + step)
            opt.param_groups[0]["lr"] = lr
            set_grads(model, grads)
            opt.step()
            ref.step(grads, lr=lr)
        runs[impl] = {n: (p.detach().clone(), opt.state[p]) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            assert rel_err(p, ref.p[n]) <= 1e-6, n
            assert rel_err(opt.state[p]["exp_avg_sq"], ref.v[n]) <= 1e-5, n
    for n, (pe, se) in runs["eager"].items():
        pf, sf = runs["compiled"][n]
        assert rel_err(pf, pe.double()) <= 1e-6, n
        assert rel_err(sf["exp_avg"], se["exp_avg"].double()) <= 1e-6, n
        assert rel_err(sf["exp_avg_sq"], se["exp_avg_sq"].double()) <= 1e-6, n
        assert float(sf["step"]) == 3


def test_implementation_choices_resolve_once_or_fail_naming_the_option(monkeypatch):
    from optim import dispatch, kernels, native

    config, model = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])

    def build(implementation="auto"):
        return AdamMini(units_from_module(model), layouts, implementation=implementation, **HP)

    monkeypatch.setattr(native, "available", lambda: False)  # e.g. no C++ compiler: auto has two choices left
    monkeypatch.setattr(kernels, "compile_available", lambda: True)
    assert build().implementation == "eager"  # the debug model is below FAST_MIN_NUMEL: compiling would not pay
    monkeypatch.setattr(dispatch, "FAST_MIN_NUMEL", 1)
    assert build().paths == ["compiled"] * len(layouts)
    monkeypatch.setattr(kernels, "compile_available", lambda: False)
    assert build().implementation == "eager"
    with pytest.raises(RuntimeError, match="implementation='compiled': torch.compile is not usable"):
        build("compiled")
    with pytest.raises(ValueError, match="implementation must be one of auto, native, compiled, eager; got 'fast'"):
        build("fast")


# ----------------------------------------------------------------------------- build and memory
def test_build_optimizer_strips_wrappers_and_adamw_groups():
    config, model = debug_model()

    class Wrapper(torch.nn.Module):  # looks like Fabric(DDP(compile(model)))
        def __init__(self, inner):
            super().__init__()
            self._forward_module = torch.nn.Module()
            self._forward_module.module = torch.nn.Module()
            self._forward_module.module._orig_mod = inner

    wrapped = Wrapper(model)
    opt = build_optimizer(wrapped, config, "adam_mini", implementation="eager", **HP)
    assert [u.names[0] for u in opt.units] == [n for n, _ in model.named_parameters()]
    adamw = build_optimizer(wrapped, config, "adamw", **HP)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == HP["weight_decay"] and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, config, "sgd", **HP)


def test_state_bytes_formulas_match_real_optimizers_and_tinyllama_ratio():
    config, model = debug_model()
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    layouts = model_layout(config, shapes)
    for name, expected in (("adam_mini", adam_mini_state_bytes(layouts)), ("adamw", adamw_state_bytes(shapes))):
        opt = build_optimizer(model, config, name, **HP)
        set_grads(model, random_grads(model, 0))
        opt.step()
        assert optimizer_state_bytes(opt) == expected, name
    # the options: bf16 m, and the partition choices (their v entries)
    elements_whole = dict(embedding_blocks="elements", value_blocks="whole")
    for options in (dict(momentum_dtype="bfloat16"), elements_whole, dict(elements_whole, momentum_dtype="bfloat16")):
        opt = build_optimizer(model, config, "adam_mini", **options, **HP)
        opt.step()
        dtype = torch.bfloat16 if "momentum_dtype" in options else torch.float32
        partition = Partition(**{k: v for k, v in options.items() if k != "momentum_dtype"})
        assert optimizer_state_bytes(opt) == adam_mini_state_bytes(model_layout(config, shapes, partition), dtype)
    # TinyLlama 1.1B on the meta device: computed, nothing allocated
    big = models.get_config("tinyllama-1.1b")
    meta = models.build_model(big)
    shapes = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]
    layouts = model_layout(big, shapes)
    ratio = adam_mini_state_bytes(layouts) / adamw_state_bytes(shapes)
    assert 0.5 < ratio <= 0.5005
    assert 0.25 < adam_mini_state_bytes(layouts, torch.bfloat16) / adamw_state_bytes(shapes) <= 0.2505
    assert 350_000 < v_entries(layouts) < 450_000
    for dtype in (torch.float32, torch.bfloat16):
        opt = AdamMini(units_from_module(meta), layouts, implementation="eager", momentum_dtype=dtype)
        opt.init_state()  # meta tensors: the real optimizer's own accounting agrees with the formula
        assert optimizer_state_bytes(opt) == adam_mini_state_bytes(layouts, dtype)


@pytest.mark.parametrize("implementation", ["eager", "native"])
def test_elements_embeddings_and_whole_values_match_reference(implementation):
    """The non-default partition through `build_optimizer`, 5 steps against the float64 reference."""
    _skip_unavailable(implementation)
    config, model = debug_model()
    params = dict(model.named_parameters())
    opt = build_optimizer(model, config, "adam_mini", implementation=implementation, embedding_blocks="elements",
                          value_blocks="whole", **HP)
    assert opt.layouts["lm_head.weight"].kind == "elements"
    assert opt.layouts["transformer.h.0.attn.qkv.weight"].runs[-1] == (1, 32 * 64)
    ref = Reference(params, opt.layouts, **HP)
    step_both(opt, ref, model, 5)
    for n, p in params.items():
        assert rel_err(p, ref.p[n]) <= 1e-6, n
        assert rel_err(opt.state[p]["exp_avg_sq"], ref.v[n]) <= 1e-5, n


# ----------------------------------------------------------------------------- DDP, 2 gloo processes
DDP_STEPS = 3


def _batches(rank, step, vocab):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, vocab, (2, 17), generator=gen)


def _ddp_worker(rank, world, out_dir):
    torch.set_num_threads(1)
    config, model = debug_model(vocab_size=256)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(ddp, config, "adam_mini", implementation="eager", **HP)
    assert all(u.group is None for u in opt.units)
    for step in range(DDP_STEPS):
        opt.zero_grad()
        batch_loss(ddp, _batches(rank, step, 256)).backward()
        opt.step()
    torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_equal_single_process_with_averaged_grads(tmp_path):
    spawn(_ddp_worker, 2, str(tmp_path))
    config, model = debug_model(vocab_size=256)
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    opt = AdamMini(units_from_module(model), layouts, implementation="eager", **HP)
    for step in range(DDP_STEPS):
        grads = []
        for rank in range(2):
            model.zero_grad()
            batch_loss(model, _batches(rank, step, 256)).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for n, p in model.named_parameters():
        assert torch.equal(r0[n], r1[n]), n
        assert rel_err(r0[n], p.detach().double()) <= 1e-6, n
