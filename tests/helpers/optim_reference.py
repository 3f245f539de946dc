"""A float64 Adam-mini written from the formula (shared/ADAM_MINI.md) and the model/gradient fixtures the
optimizer tests (tests/test_optim_*.py) compare AdamMini with.

The reference expands every block to a per-element block id (fine for a test, forbidden in the optimizer)
and applies the update with index_add / gather, so it shares no code path with the chunked implementation.
"""
from __future__ import annotations

import torch

import models

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# ----------------------------------------------------------------------------- reference
class Reference:
    """Float64 Adam-mini from the formula: v per block via per-element block ids.

    `bf16_momentum`: m is rounded to bfloat16 (to nearest, ties to even, straight from float64) after every
    step and the step uses the rounded m. `ties(name, rounded, exact, bound)` may then replace the rounded m
    where the float64 value lies within `bound` (a float32 evaluation's error bound) of a rounding midpoint
    (see `adopt_ties`)."""

    def __init__(self, params: dict[str, torch.Tensor], layouts, lr, betas, eps, weight_decay, eps_inside_sqrt=False,
                 bf16_momentum=False):
        self.p = {n: t.detach().double().clone() for n, t in params.items()}
        self.layouts, self.lr, self.betas, self.eps, self.wd = layouts, lr, betas, eps, weight_decay
        self.eps_inside_sqrt, self.bf16_momentum = eps_inside_sqrt, bf16_momentum
        self.ids, self.counts = {}, {}
        for n in params:
            sizes = torch.tensor([b for k, b in layouts[n].runs for _ in range(k)], dtype=torch.long)
            self.ids[n] = torch.arange(len(sizes)).repeat_interleave(sizes)
            self.counts[n] = sizes.double()
        self.m = {n: torch.zeros(t.numel(), dtype=torch.float64) for n, t in params.items()}
        self.v = {n: torch.zeros(len(self.counts[n]), dtype=torch.float64) for n in params}
        self.t = {n: 0 for n in params}

    def step(self, grads: dict[str, torch.Tensor | None], lr=None, ties=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        for n, g in grads.items():
            if g is None:
                continue
            g = g.detach().double().reshape(-1)
            self.t[n] += 1
            t = self.t[n]
            sq = torch.zeros_like(self.v[n]).index_add_(0, self.ids[n], g * g)
            self.v[n] = b2 * self.v[n] + (1 - b2) * sq / self.counts[n]
            decayed, fresh = b1 * self.m[n], (1 - b1) * g
            self.m[n] = decayed + fresh
            if self.bf16_momentum:
                rounded = round_bf16(self.m[n])
                # float32 evaluation: coefficients, products and sum each rounded (2^-24 relative), x2 margin
                bound = 2.0 ** -22 * (decayed.abs() + fresh.abs()) + 2.0 ** -23 * self.m[n].abs()
                self.m[n] = rounded if ties is None else ties(n, rounded, self.m[n], bound)
            p = self.p[n].reshape(-1)
            if self.layouts[n].weight_decay:
                p.mul_(1 - lr * self.wd)
            vhat = self.v[n][self.ids[n]] / (1 - b2 ** t)
            denom = (vhat + self.eps).sqrt() if self.eps_inside_sqrt else vhat.sqrt() + self.eps
            p.sub_(lr * (self.m[n] / (1 - b1 ** t)) / denom)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values (8 significant bits) around float64 `x`, as a power of two."""
    _, exp = torch.frexp(x)
    return torch.pow(2.0, (exp - 8).double())


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest bfloat16 value (ties to even), still float64; no detour through float32."""
    ulp = _bf16_ulp(x)
    return torch.round(x / ulp) * ulp  # exact scalings by powers of two; torch.round: half to even


def near_bf16_tie(x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Where float64 `x` lies within `bound` of a midpoint between two neighbouring bfloat16 values."""
    ulp = _bf16_ulp(x)
    scaled = x.abs() / ulp
    return ((scaled - scaled.floor()) - 0.5).abs() * ulp <= bound


def adopt_ties(stored: dict[str, torch.Tensor], adopted: list[int]):
    """A `Reference.step` `ties` hook: where the optimizer's `stored` bf16 m differs from the reference's rounding,
    the float64 value must be a near-tie (float32 arithmetic may land on either side); the reference then takes
    the optimizer's value there. `adopted[0]` counts such elements."""
    def ties(name, rounded, exact, bound):
        differ = rounded != stored[name]
        assert bool(near_bf16_tie(exact, bound)[differ].all()), f"{name}: m is not the bf16 rounding of the float64 m"
        adopted[0] += int(differ.sum())
        return torch.where(differ, stored[name], rounded)
    return ties


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def debug_model(seed=0, dtype=torch.float32, **overrides):
    config = models.get_config("debug", **overrides)
    model = models.build_model(config, device="cpu")
    models.init_model(model, config.n_layer, config.n_embd, seed=seed)
    model = model.to(dtype)
    return config, model


def random_grads(model, step, scale=1.0, none=()):
    gen = torch.Generator().manual_seed(1000 + step)
    out = {}
    for n, p in model.named_parameters():
        out[n] = None if n in none else (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
    return out


def set_grads(model, grads):
    for n, p in model.named_parameters():
        p.grad = None if grads[n] is None else grads[n].clone()


def step_both(opt, ref, model, steps: int, first: int = 0) -> None:
    """`steps` optimizer steps of `opt` and of the float64 `ref` on the same random gradients."""
    for step in range(first, first + steps):
        grads = random_grads(model, step)
        set_grads(model, grads)
        opt.step()
        ref.step(grads)
