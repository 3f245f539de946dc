"""The native CPU kernel (optim/native.py, optim/csrc/adam_mini_rows.cpp) against float64 computations.

Kernel level: random chunks of every awkward shape (one element, below/at/above the 64 accumulator
lanes, rows longer than a task) and every p/g dtype pair, checked against the update formula evaluated
in float64 from the same inputs. Optimizer level: a whole model over 10 steps against the independent
float64 `Reference` of test_optim_adam_mini, thread-count invariance, exact resume, and the fallback
when no compiler is there. (bf16 models: test_optim_adam_mini.test_bf16_params_keep_fp32_state.)
"""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch

from helpers.optim_reference import HP, Reference, debug_model, random_grads, rel_err, set_grads, step_both
from optim import native
from optim.adam_mini import AdamMini
from optim.blocks import Chunk
from optim.layout import model_layout
from optim.units import Segment, Unit, units_from_module
from optim.update import StepHyper

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernel unavailable: {native.unavailable_reason()}")

B1, B2, EPS = 0.9, 0.95, 1e-8

# (rows, length): one element per block (biases), tails of the 64 lanes, exactly 64, a row longer than a task
SHAPES = [(7, 1), (3, 63), (5, 64), (4, 65), (9, 200), (2, native.TASK_NUMEL + 13), (300, 384)]


def _hyper(t: int, lr: float, wd: float) -> StepHyper:
    return StepHyper.of(dict(betas=(B1, B2), lr=lr, eps=EPS, weight_decay=wd), t)


def _chunks(shapes, decays) -> tuple[list[Chunk], int, int]:
    """Chunks laid end to end in one buffer, with a gap of 5 elements between them (must stay untouched)."""
    chunks, offset, block = [], 0, 0
    for (rows, length), decay in zip(shapes, decays):
        chunks.append(Chunk(offset, rows, length, block, decay))
        offset += rows * length + 5
        block += rows
    return chunks, offset, block


def _expected(p, g, m, v, chunks, t, lr, wd):
    """The update of ADAM_MINI.md in float64 from the same inputs (p, g upcast), except m: its contract is
    fl(fl(b1·m) + fl((1 - b1)·g)) in float32 (torch's own ops here), stored in m's dtype (torch's cast, round to
    nearest even); the step uses the stored m."""
    m_stored = m.clone()
    p, g, v = (x.double().clone() for x in (p, g, v))
    for c in chunks:
        sl = slice(c.offset, c.offset + c.numel)
        gr = g[sl].view(c.rows, c.length)
        v[c.block:c.block + c.rows] = B2 * v[c.block:c.block + c.rows] + (1 - B2) * (gr * gr).mean(1)
        m_stored[sl] = (m_stored[sl].float() * B1 + g[sl].float() * (1 - B1)).to(m.dtype)
        vhat = v[c.block:c.block + c.rows] / (1 - B2 ** t)
        scale = lr / (1 - B1 ** t) / (vhat.sqrt() + EPS)
        decay = 1 - lr * wd if c.decay else 1.0
        m_used = m_stored[sl].double().view(c.rows, c.length)
        p[sl] = (p[sl].view(c.rows, c.length) * decay - scale[:, None] * m_used).reshape(-1)
    return p, m_stored, v


@pytest.mark.parametrize("p_dtype, g_dtype, m_dtype",
                         list(itertools.product([torch.float32, torch.bfloat16], repeat=3)))
def test_kernel_matches_float64_formula_for_every_shape_and_dtype(p_dtype, g_dtype, m_dtype):
    gen = torch.Generator().manual_seed(0)
    chunks, numel, n_blocks = _chunks(SHAPES, [True, False] * 4)
    p = torch.randn(numel, generator=gen).to(p_dtype)
    g = (torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen) * 1e-2).to(g_dtype)
    m = (torch.randn(numel, generator=gen) * 1e-3).to(m_dtype)
    v = torch.rand(n_blocks, generator=gen) * 1e-5
    gaps = torch.ones(numel, dtype=torch.bool)
    for c in chunks:
        gaps[c.offset:c.offset + c.numel] = False
    p_gap, m_gap = p[gaps].clone(), m[gaps].clone()
    t, lr, wd = 3, 1e-2, 0.1
    want_p, want_m, want_v = _expected(p, g, m, v, chunks, t, lr, wd)
    native.RowsStep([chunks])([(p, g, m, v)], _hyper(t, lr, wd), threads=2)

    assert rel_err(v, want_v) <= 1e-6
    assert m.dtype == m_dtype and torch.equal(m, want_m)  # bit for bit, rounding included
    if p_dtype == torch.float32:
        assert rel_err(p[~gaps], want_p[~gaps]) <= 1e-6
    else:  # the float64 result rounded to bf16, up to one ulp where fp32 arithmetic lands across a tie
        want = want_p[~gaps].to(torch.bfloat16)
        got = p[~gaps]
        ulp = (want.float().abs() * 2.0 ** -7).clamp_min(1e-30)
        assert ((got.float() - want.float()).abs() <= ulp).all()
        assert (got == want).float().mean() >= 0.99
    assert torch.equal(p[gaps], p_gap) and torch.equal(m[gaps], m_gap)  # outside the chunks: untouched


def test_kernel_bf16_momentum_rounds_to_nearest_even_and_the_step_uses_it():
    """m bf16 with b1 = 0, 1 - b1 = 1: m <- g exactly in fp32, so the stored m is g rounded to bf16. Checked
    against torch's cast on ties (two go down to even, two up), NaN with every payload bit set (a bare
    round-to-nearest would carry into the sign), and ±inf; the step (scale 1: v = 0, lr/bc1 = 1, eps = 1)
    subtracts the stored, rounded m from p."""
    one = 1.0 + 2.0 ** -8  # halfway between bf16 1.0 and 1.0078125
    g = torch.tensor([one, -one, 1.0 + 3 * 2.0 ** -8, 3.0 * one, 0.1, float("inf"), -float("inf"), 0.0])
    g[7:] = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    hyper = StepHyper(beta1=0.0, one_minus_beta1=1.0, beta2=0.0, one_minus_beta2=0.0, bias_correction2=1.0,
                      lr_over_bias_correction1=1.0, eps=1.0, decay=1.0)
    p, m = torch.zeros(8), torch.full((8,), 5.0, dtype=torch.bfloat16)
    native.RowsStep([[Chunk(0, 8, 1, 0, False)]])([(p, g, m, torch.zeros(8))], hyper)
    want = g.to(torch.bfloat16)
    assert torch.equal(m[:7], want[:7]) and m[:3].tolist() == [1.0, -1.0, 1.015625]
    assert torch.isnan(m[7]) and not torch.signbit(m[7].float())
    assert torch.equal(p[:5], -want[:5].float())  # (the infinite rows have v = 0·inf = NaN)


def test_kernel_bf16_rounds_to_nearest_even_and_keeps_nan():
    """p bf16, lr = 0: p <- p·1 exactly, so the write-back is the identity; NaN gradients give NaN, not inf."""
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30, 65280.0, float("inf"), -float("inf"), 0.0], dtype=torch.bfloat16)
    chunks = [Chunk(0, 1, 8, 0, True)]
    p, g, m, v = values.clone(), torch.ones(8), torch.zeros(8), torch.zeros(1)
    native.RowsStep([chunks])([(p, g, m, v)], _hyper(1, 0.0, 0.1))
    assert torch.equal(p, values)
    # fp32 -> bf16 rounding of the result, checked against torch's cast on values exactly between two bf16
    base = torch.tensor([1.0, 1.0078125, -3.0, 256.0])  # p0; the update adds one half-ulp (a tie) or more
    ulp = torch.tensor([2.0 ** -7, 2.0 ** -7, 2.0 ** -6, 2.0 ** 1])
    for frac in (0.5, 0.25, 0.75):
        p = base.to(torch.bfloat16)
        m = torch.zeros(4)
        g = torch.zeros(4)
        # with b2 = 1 - b2 = 0 (v stays 0), lr/bc1 = 1 and eps = 1: scale = 1, so p <- p - m with
        # m = b1·0 + (1 - b1)·g = -ulp·frac
        hyper = StepHyper(beta1=0.0, one_minus_beta1=1.0, beta2=0.0, one_minus_beta2=0.0, bias_correction2=1.0,
                          lr_over_bias_correction1=1.0, eps=1.0, decay=1.0)
        g.copy_(-ulp * frac)
        native.RowsStep([[Chunk(0, 4, 1, 0, False)]])([(p, g, m, torch.zeros(4))], hyper)
        assert torch.equal(p, (base + ulp * frac).to(torch.bfloat16)), frac
    p = torch.ones(4, dtype=torch.bfloat16)
    # a NaN whose payload has all low bits set: a bare round-to-nearest would carry into the sign bit (-0.0)
    g = torch.tensor([0x7FFFFFFF, 0, 0, 0], dtype=torch.int32).view(torch.float32)
    g[1:] = 1.0
    native.RowsStep([[Chunk(0, 2, 2, 0, False)]])([(p, g, torch.zeros(4), torch.zeros(2))], _hyper(1, 1e-2, 0.0))
    assert torch.isnan(p[:2].float()).all() and torch.isfinite(p[2:].float()).all()


def test_kernel_is_identical_on_any_thread_count():
    gen = torch.Generator().manual_seed(1)
    chunks, numel, n_blocks = _chunks([(300, 384), (40, 1000), (1, 5000)], [True, True, False])
    inputs = (torch.randn(numel, generator=gen), torch.randn(numel, generator=gen), torch.randn(numel, generator=gen),
              torch.rand(n_blocks, generator=gen))
    results = []
    for threads in (1, 2, 3):
        p, g, m, v = (x.clone() for x in inputs)
        native.RowsStep([chunks])([(p, g, m, v)], _hyper(2, 1e-3, 0.1), threads=threads)
        results.append((p, m, v))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("bias", [False, True])
def test_optimizer_native_matches_float64_reference(bias):
    """10 steps on the debug model (biases: one-element blocks), lr changing, one parameter without grad twice."""
    config, model = debug_model(bias=bias)
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    opt = AdamMini(units_from_module(model), layouts, implementation="native", **HP)
    assert opt.implementation == "native"
    ref = Reference(dict(model.named_parameters()), layouts, **HP)
    for step in range(10):
        none = ("transformer.h.1.mlp.fc_2.weight",) if step in (3, 4) else ()
        grads = random_grads(model, step, none=none)
        lr = HP["lr"] * (1 + 0.1 * step)
        opt.param_groups[0]["lr"] = lr
        set_grads(model, grads)
        opt.step()
        ref.step(grads, lr=lr)
    for n, p in model.named_parameters():
        assert rel_err(p, ref.p[n]) <= 1e-6, n
        assert rel_err(opt.state[p]["exp_avg"], ref.m[n]) <= 1e-6, n
        assert rel_err(opt.state[p]["exp_avg_sq"], ref.v[n]) <= 1e-5, n
        assert float(opt.state[p]["step"]) == ref.t[n]
    assert ref.t["transformer.h.1.mlp.fc_2.weight"] == 8


def test_optimizer_native_resume_equals_uninterrupted_run():
    config, model_a = debug_model()
    model_b = copy.deepcopy(model_a)
    layouts = model_layout(config, [(n, p.shape) for n, p in model_a.named_parameters()])
    opt_a = AdamMini(units_from_module(model_a), layouts, implementation="native", **HP)
    opt_b = AdamMini(units_from_module(model_b), layouts, implementation="native", **HP)
    for step in range(3):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            set_grads(model, random_grads(model, step))
            opt.step()
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    model_c = copy.deepcopy(model_b)
    opt_c = AdamMini(units_from_module(model_c), layouts, implementation="native", **HP)
    buf.seek(0)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(3, 6):
        for model, opt in ((model_a, opt_a), (model_c, opt_c)):
            set_grads(model, random_grads(model, step))
            opt.step()
    for (n, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(pa, pc), n
        assert torch.equal(opt_a.state[pa]["exp_avg_sq"], opt_c.state[pc]["exp_avg_sq"]), n


def test_auto_is_native_on_cpu():
    config, model = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    default = AdamMini(units_from_module(model), layouts, **HP)
    assert default.implementation == "native" and default.paths == ["native"] * len(layouts)
    assert AdamMini(units_from_module(model), layouts, implementation="eager", **HP).implementation == "eager"


def test_native_runs_units_it_cannot_take_eagerly_and_refuses_when_it_takes_none():
    """A unit holding qkv as two pieces, the cut inside Q head 0: not whole blocks, so not for the kernel."""
    config, model = debug_model()
    params = dict(model.named_parameters())
    layouts = model_layout(config, [(n, p.shape) for n, p in params.items()])
    name = "transformer.h.0.attn.qkv.weight"

    def units():
        out = []
        for u in units_from_module(model):
            if u.names == (name,):
                u = Unit(param=u.param, names=(name,), segments=(Segment(name, 0, 1000, 0),
                                                                 Segment(name, 1000, 8192, 1000)), label="pieces")
            out.append(u)
        return out

    start = {n: p.detach().clone() for n, p in params.items()}
    runs = {}
    for impl in ("native", "eager"):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        opt = AdamMini(units(), layouts, implementation=impl, **HP)
        ref = Reference(params, layouts, **HP)
        step_both(opt, ref, model, 3)
        for n, p in params.items():
            assert rel_err(p, ref.p[n]) <= 1e-6, (impl, n)
        runs[impl] = (opt, {n: opt.state[p]["exp_avg"].clone() for n, p in params.items()})
    opt, m_native = runs["native"]
    assert opt.implementation == "native+eager"
    assert [n for n, path in zip(params, opt.paths) if path == "eager"] == [name]
    assert all(torch.equal(m_native[n], runs["eager"][1][n]) for n in params)  # the same m, bit for bit
    pieces = [u for u in units() if u.names == (name,)]
    with pytest.raises(ValueError, match="implementation='native': no unit can use the native kernel"):
        AdamMini(pieces, layouts, implementation="native", **HP)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native module as if nothing had been loaded yet in this process, caching under tmp_path."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("ADAM_MINI_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_without_compiler_auto_falls_back_with_one_warning_and_native_refuses(fresh_native, monkeypatch):
    monkeypatch.setenv("ADAM_MINI_CXX", str(fresh_native / "no-such-compiler"))
    config, model = debug_model()
    layouts = model_layout(config, [(n, p.shape) for n, p in model.named_parameters()])
    with pytest.warns(UserWarning, match="native CPU kernel unavailable: no C\\+\\+ compiler"):
        opt = AdamMini(units_from_module(model), layouts, **HP)
    assert opt.implementation == "eager"
    set_grads(model, random_grads(model, 0))
    opt.step()  # the eager path still steps
    assert all(float(s["step"]) == 1 for s in opt.state.values())
    with pytest.raises(RuntimeError, match="implementation='native': no C\\+\\+ compiler"):
        AdamMini(units_from_module(model), layouts, implementation="native", **HP)


def test_build_is_cached_on_disk_and_reused(fresh_native, monkeypatch):
    lib = native.load()
    assert lib is not None and lib.path.parent == fresh_native and lib.path.exists()
    assert not list(fresh_native.glob("*.tmp"))  # the build wrote atomically
    monkeypatch.setattr(native, "_library", None)

    def no_build(*args):
        raise AssertionError("rebuilt although a cached library exists")

    monkeypatch.setattr(native, "_build", no_build)
    assert native.load().path == lib.path
