"""Adam-mini: Adam with one second moment per block (head, neuron, token), exact under sharding.

Update (per /work/shared/ADAM_MINI.md), for every unit with a gradient:

    t   <- t + 1
    v_B <- b2 v_B + (1 - b2) mean_{i in B} g_i^2               (one fp32 entry per block)
    m   <- b1 m + (1 - b1) g                                     (fp32, like the local buffer)
    p   <- p (1 - lr wd)                                         (only blocks of decayed parameters)
    p_i <- p_i - lr (m_i / (1 - b1^t)) / (sqrt(v_B / (1 - b2^t)) + eps)

A unit's local buffer holds segments of parameters that may cut blocks anywhere (FSDP shards). The
precomputed chunks of `optim.blocks` give, per step, each rank's partial sum of g^2 for every block it
touches; if `unit.group` is set, one all-reduce(SUM) of that block vector per unit completes the sums,
after which every rank updates the (replicated) v identically and steps its own elements. Elements
outside the segments (FSDP padding) are never read or written.

Three implementations of the same update:
- eager: `torch._foreach_*` over all units for the element-wise parts, a loop over chunks (a few per
  unit) for the block-scaled step;
- native (CPU): units whose local chunks are complete blocks and need no all-reduce (any unsharded
  parameter) run the whole update, block sums and v included, in one call per step of a small C++
  kernel (`optim.native`, built on first use) that reads each block's gradient from memory once;
- compiled (`torch.compile`): the same whole-block units off CPU run as compiled kernels, one call per
  group of equally shaped chunks across units (`optim.kernels.rows_update`); other units (sharded,
  partial blocks) keep the eager block sums and all-reduce and run the moment update, decay and step as
  one compiled, fused pass per chunk (`optim.kernels.chunk_update`).
The native and compiled block sums add in another order than eager's, so v matches it to rounding.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from optim import kernels, native as native_kernel
from optim.blocks import UnitPlan, plan_unit
from optim.layout import ParamLayout
from optim.units import Unit, local_1d

# Below this many local elements the default (`fast=None`) stays eager: compiling costs seconds per
# distinct chunk shape, which only pays off for real models (tests and the `debug` model stay eager).
FAST_MIN_NUMEL = 1 << 22


class AdamMini(torch.optim.Optimizer):
    """Adam-mini over `units` (see `optim.units`), with blocks from `layouts` (see `optim.layout`).

    `fast`: False = everything eager. True = the native CPU kernel for whole-block units on CPU and
    compiled kernels for the rest (each falls back to eager where it cannot be built). None (default) =
    like True, but compiled kernels only when the units hold at least `FAST_MIN_NUMEL` elements (a
    compile costs seconds per chunk shape; the native kernel is built once per machine and cached).
    The environment variable `ADAM_MINI_FAST=0/1` overrides None.
    `native`: None = use the native CPU kernel where it applies and builds; False = never (compiled or
    eager instead); True = require it (RuntimeError if it cannot be built).

    State per unit param: `step` (fp32 scalar, CPU), `exp_avg` (fp32, like the local 1-D buffer),
    `exp_avg_sq` (fp32, one entry per block of `unit.names`, replicated over `unit.group`).
    """

    def __init__(self, units: Sequence[Unit], layouts: Mapping[str, ParamLayout], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 fast: bool | None = None, native: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid hyper-parameters lr={lr}, eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        units = list(units)
        if not units:
            raise ValueError("AdamMini got no units")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__([u.param for u in units], defaults)
        self.units: list[Unit] = units
        self.plans: list[UnitPlan] = [plan_unit(u, layouts) for u in units]
        self._index = {id(u.param): i for i, u in enumerate(units)}
        if len(self._index) != len(units):
            raise ValueError("two units register the same tensor")
        for unit, plan in zip(units, self.plans):
            numel = local_1d(unit.param.detach()).numel()
            if numel < plan.min_local_numel:
                raise ValueError(f"unit {unit.label!r}: segments need {plan.min_local_numel} local elements, buffer has {numel}")
        self._inv_numel: dict[tuple, torch.Tensor] = {}
        # units whose local chunks are all complete blocks and need no all-reduce: the fast paths run their
        # whole update (block sums included) in one native call (CPU) or compiled kernels by chunk shape
        self._whole = [unit.group is None and _complete_blocks(plan) for unit, plan in zip(units, self.plans)]
        self.fast, self.native = self._resolve_fast(fast, native)
        # units the native kernel serves (when their dtypes suit it, checked per step)
        candidates = self._native_candidates() if self.native else set()
        self._on_native = [i in candidates for i in range(len(units))]
        self._native_steps: dict[tuple[int, ...], native_kernel.RowsStep] = {}

    @property
    def implementation(self) -> str:
        """Which update paths serve the units: 'native', 'compiled', 'eager', or several joined with '+'.

        (A unit whose dtypes the native kernel does not take uses the compiled or eager path instead.)"""
        other = "compiled" if self.fast else "eager"
        used = {"native" if on else other for on in self._on_native}
        return "+".join(k for k in ("native", "compiled", "eager") if k in used)

    def _native_candidates(self) -> set[int]:
        """Units the native kernel can take: complete blocks, no all-reduce, on CPU."""
        return {i for i, (u, w) in enumerate(zip(self.units, self._whole)) if w and u.param.device.type == "cpu"}

    # ------------------------------------------------------------------ configuration
    def _resolve_fast(self, fast: bool | None, native: bool | None) -> tuple[bool, bool]:
        """(compiled kernels on, native CPU kernel on), see the class docstring."""
        if fast is None:
            env = os.environ.get("ADAM_MINI_FAST")
            if env is not None:
                fast = env.strip().lower() not in ("0", "false", "no", "")
        if fast is False:
            if native:
                raise ValueError("native=True needs fast=True or None")
            return False, False
        if fast is None:
            compiled = sum(sum(c.numel for c in p.chunks) for p in self.plans) >= FAST_MIN_NUMEL
        else:
            compiled = bool(fast)
        compiled = compiled and kernels.compile_available()
        if native is False:
            return compiled, False
        if native:
            if not native_kernel.available():
                raise RuntimeError(f"AdamMini(native=True): {native_kernel.unavailable_reason()}")
            return compiled, True
        return compiled, bool(self._native_candidates()) and native_kernel.available()

    def inv_block_numel(self, i: int, device: torch.device) -> torch.Tensor:
        """1 / (static element count) of every block of unit i, cached per geometry and device."""
        plan = self.plans[i]
        key = (plan.n_blocks, plan.block_runs, str(device))
        t = self._inv_numel.get(key)
        if t is None:
            t = plan.block_numel_tensor(device).reciprocal_()
            self._inv_numel[key] = t
        return t

    # ------------------------------------------------------------------ state
    def _init_state(self, i: int) -> dict:
        unit, plan = self.units[i], self.plans[i]
        state = self.state[unit.param]
        if not state:
            local = local_1d(unit.param.detach())
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(local.numel(), dtype=torch.float32, device=local.device)
            state["exp_avg_sq"] = torch.zeros(plan.n_blocks, dtype=torch.float32, device=local.device)
        return state

    def init_state(self) -> None:
        """Create all states now (they are otherwise created at the first step); free on the meta device."""
        for i in range(len(self.units)):
            self._init_state(i)

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but keeps every state tensor fp32 (torch would cast to a bf16 param's dtype)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        order = [p for g in self.param_groups for p in g["params"]]
        for idx, p in enumerate(order):
            if idx not in saved and str(idx) not in saved:
                continue
            src = saved[idx] if idx in saved else saved[str(idx)]
            i = self._index[id(p)]
            local = local_1d(p.detach())
            expected = {"exp_avg": (local.numel(),), "exp_avg_sq": (self.plans[i].n_blocks,), "step": ()}
            new = {}
            for key, shape in expected.items():
                if key not in src:
                    raise KeyError(f"unit {self.units[i].label!r}: state has no {key!r}")
                value = torch.as_tensor(src[key])
                if tuple(value.shape) != shape:
                    raise ValueError(f"unit {self.units[i].label!r}: {key} has shape {tuple(value.shape)}, expected {shape}")
                device = torch.device("cpu") if key == "step" else local.device
                new[key] = value.detach().to(device=device, dtype=torch.float32, copy=True)
            self.state[p] = new

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            todo = [self._index[id(p)] for p in group["params"] if p.grad is not None]
            if todo:
                self._step_group(group, todo)
        return loss

    def _step_group(self, group: dict, todo: list[int]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        states = [self._init_state(i) for i in todo]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        grads = []
        for i in todo:
            g = self.units[i].param.grad
            g = g.to_local() if hasattr(g, "to_local") else g
            grads.append(g.reshape(-1))
        steps = [float(s["step"]) for s in states]
        if self.native:
            mine = [k for k, i in enumerate(todo) if self._on_native[i] and native_kernel.supports(self.units[i].param, grads[k])]
            if mine:
                self._apply_native([todo[k] for k in mine], [states[k] for k in mine], [grads[k] for k in mine],
                                   [steps[k] for k in mine], lr, beta1, beta2, eps, wd)
                taken = set(mine)
                rest = [k for k in range(len(todo)) if k not in taken]
                if not rest:
                    return
                todo, states, grads, steps = ([xs[k] for k in rest] for xs in (todo, states, grads, steps))
        if self.fast and any(self._whole[i] for i in todo):
            whole = [k for k, i in enumerate(todo) if self._whole[i]]
            self._apply_rows([todo[k] for k in whole], [states[k] for k in whole], [grads[k] for k in whole],
                             [steps[k] for k in whole], lr, beta1, beta2, eps, wd)
            rest = [k for k, i in enumerate(todo) if not self._whole[i]]
            if not rest:
                return
            todo, states, grads, steps = ([xs[k] for k in rest] for xs in (todo, states, grads, steps))
        # partial block sums of g^2, completed across ranks by one all-reduce per sharded unit
        sumsqs = [block_sumsq_eager(self.plans[i], g) for i, g in zip(todo, grads)]
        for i, bsq in zip(todo, sumsqs):
            if self.units[i].group is not None:
                dist.all_reduce(bsq, op=dist.ReduceOp.SUM, group=self.units[i].group)
        self._apply_eager(todo, states, grads, sumsqs, steps, lr, beta1, beta2, eps, wd)

    def _apply_eager(self, todo, states, grads, sumsqs, steps, lr, beta1, beta2, eps, wd) -> None:
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        invs = [self.inv_block_numel(i, v.device) for i, v in zip(todo, exp_avg_sqs)]
        # v_B <- b2 v_B + (1 - b2) * sum_B / n_B
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, sumsqs, invs, value=1.0 - beta2)
        # per-block step size lr / (1 - b1^t) / (sqrt(v_B / (1 - b2^t)) + eps)
        bc1 = [1.0 - beta1 ** t for t in steps]
        bc2 = [1.0 - beta2 ** t for t in steps]
        scales = torch._foreach_div(exp_avg_sqs, bc2)
        torch._foreach_sqrt_(scales)
        torch._foreach_add_(scales, eps)
        torch._foreach_reciprocal_(scales)
        torch._foreach_mul_(scales, [lr / b for b in bc1])

        if self.fast:
            self._apply_fast(todo, states, grads, scales, lr, beta1, wd)
            return
        m_views, g_views, decay_views = [], [], []
        steps_p, steps_m, steps_s = [], [], []
        writeback = []
        for i, state, g, scale in zip(todo, states, grads, scales):
            plan = self.plans[i]
            local = local_1d(self.units[i].param)
            work = local if local.dtype == torch.float32 else local.float()
            if work is not local:
                writeback.append((local, work))
            g32 = g if g.dtype == torch.float32 else g.float()
            m = state["exp_avg"]
            for off, n, decay in plan.spans:
                m_views.append(m[off:off + n])
                g_views.append(g32[off:off + n])
                if decay:
                    decay_views.append(work[off:off + n])
            for c in plan.chunks:
                sl = slice(c.offset, c.offset + c.numel)
                steps_p.append(work[sl].view(c.rows, c.length))
                steps_m.append(m[sl].view(c.rows, c.length))
                steps_s.append(scale[c.block:c.block + c.rows].unsqueeze(1))
        if m_views:
            torch._foreach_lerp_(m_views, g_views, 1.0 - beta1)
        if decay_views and lr * wd != 0.0:
            torch._foreach_mul_(decay_views, 1.0 - lr * wd)
        for p, m, s in zip(steps_p, steps_m, steps_s):
            p.addcmul_(m, s, value=-1.0)
        for local, work in writeback:
            local.copy_(work)

    def _apply_fast(self, todo, states, grads, scales, lr, beta1, wd) -> None:
        """m update, decay and step fused per chunk (`optim.kernels`); never touches uncovered elements."""
        device_hp: dict[tuple, torch.Tensor] = {}
        for i, state, g, scale in zip(todo, states, grads, scales):
            local = local_1d(self.units[i].param.detach())
            m = state["exp_avg"]
            for c in self.plans[i].chunks:
                key = (c.decay, local.device)
                hp = device_hp.get(key)
                if hp is None:
                    decay = 1.0 - lr * wd if c.decay else 1.0
                    hp = device_hp[key] = torch.tensor([beta1, decay], dtype=torch.float32, device=local.device)
                sl = slice(c.offset, c.offset + c.numel)
                p_c, g_c = local[sl], g[sl]
                kernels.chunk_kernel(c.numel, c.rows, p_c, g_c)(p_c, g_c, m[sl], scale[c.block:c.block + c.rows], hp)

    def _apply_native(self, todo, states, grads, steps, lr, beta1, beta2, eps, wd) -> None:
        """CPU units of complete blocks: the whole update in one native call per distinct step count."""
        by_step: dict[float, list] = {}
        for i, state, g, t in zip(todo, states, grads, steps):
            by_step.setdefault(t, []).append((i, state, g))
        for t, entries in by_step.items():
            key = tuple(i for i, _, _ in entries)
            run = self._native_steps.get(key)
            if run is None:
                if len(self._native_steps) >= 16:  # another pattern of None grads: keep the cache small
                    self._native_steps.clear()
                run = self._native_steps[key] = native_kernel.RowsStep([self.plans[i].chunks for i in key])
            tensors = [(local_1d(self.units[i].param.detach()), g, s["exp_avg"], s["exp_avg_sq"]) for i, s, g in entries]
            run(tensors, (beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - beta2 ** t, lr / (1.0 - beta1 ** t), eps,
                          1.0 - lr * wd))

    def _apply_rows(self, todo, states, grads, steps, lr, beta1, beta2, eps, wd) -> None:
        """Fast path for units of complete blocks: block sums, v, m, decay and step in one compiled pass per
        group of equally shaped chunks (e.g. the same parameter of every transformer block): one call each."""
        groups: dict[tuple, list] = {}
        for i, state, g, t in zip(todo, states, grads, steps):
            local = local_1d(self.units[i].param.detach())
            m, v = state["exp_avg"], state["exp_avg_sq"]
            for c in self.plans[i].chunks:
                key = (c.rows, c.length, c.decay, t, local.dtype, g.dtype, local.device)
                sl = slice(c.offset, c.offset + c.numel)
                views = (local[sl].view(c.rows, c.length), g[sl].view(c.rows, c.length),
                         m[sl].view(c.rows, c.length), v[c.block:c.block + c.rows])
                groups.setdefault(key, []).append(views)
        for (rows, length, decay, t, p_dtype, g_dtype, device), entries in groups.items():
            hp = torch.tensor([beta1, 1.0 - beta1, 1.0 - lr * wd if decay else 1.0, beta2, 1.0 - beta2,
                               1.0 - beta2 ** t, lr / (1.0 - beta1 ** t), eps], dtype=torch.float32, device=device)
            kernel = kernels.rows_kernel((rows, length, len(entries), p_dtype, g_dtype, device.type))
            kernel(*(list(x) for x in zip(*entries)), hp)


def _complete_blocks(plan: UnitPlan) -> bool:
    """Whether every local chunk of `plan` consists of whole blocks (true for any unsharded parameter)."""
    starts, sizes, first = [], [], 0
    for n, b in plan.block_runs:
        starts.append(first)
        sizes.append(b)
        first += n
    for c in plan.chunks:
        run = max(r for r, s in enumerate(starts) if s <= c.block)
        if c.length != sizes[run]:
            return False
    return True


def block_sumsq_eager(plan: UnitPlan, g: torch.Tensor) -> torch.Tensor:
    """Σ g² per block of the unit's block vector over the chunks held locally (fp32)."""
    out = torch.zeros(plan.n_blocks, dtype=torch.float32, device=g.device)
    for c in plan.chunks:
        gv = g[c.offset:c.offset + c.numel].view(c.rows, c.length)
        if gv.dtype != torch.float32:
            gv = gv.float()
        out[c.block:c.block + c.rows] += torch.linalg.vector_norm(gv, dim=1).square_()
    return out

