"""Adam-mini: Adam with one second moment per block (head, neuron, token), exact under sharding.

Update (per the project's Adam-mini notes, shared/ADAM_MINI.md), for every unit with a gradient:

    t   <- t + 1
    v_B <- b2 v_B + (1 - b2) mean_{i in B} g_i^2               (one fp32 entry per block)
    m   <- b1 m + (1 - b1) g                                     (computed in fp32, stored in `momentum_dtype`)
    p   <- p (1 - lr wd)                                         (only blocks of decayed parameters)
    p_i <- p_i - lr (m_i / (1 - b1^t)) / (sqrt(v_B / (1 - b2^t)) + eps)

With `momentum_dtype=torch.bfloat16` the first moment is rounded to nearest even on every write and the
step uses the stored, rounded m: every path then depends only on the state, and a float64 reference that
rounds m to bf16 after each step reproduces it.

A unit's local buffer holds segments of parameters that may cut blocks anywhere (FSDP shards). The
precomputed chunks of `optim.blocks` give, per step, each rank's partial sum of g^2 for every block it
touches; if `unit.group` is set, one all-reduce(SUM) of that block vector per unit completes the sums,
after which every rank updates the (replicated) v identically and steps its own elements. Elements
outside the segments (FSDP padding) are never read or written.

Three implementations of the same update, chosen per unit when the optimizer is built
(`implementation`, see `optim.dispatch`), all reading one `optim.update.StepHyper` per step count:
- eager (`optim.eager`): `torch._foreach_*` over all units for the element-wise parts, a loop over
  chunks (a few per unit) for the block-scaled step;
- native (`optim.native`, CPU): units of complete blocks without all-reduce (any unsharded parameter)
  run the whole update, block sums and v included, in one call per step of a small C++ kernel that
  reads each block's gradient from memory once;
- compiled (`optim.kernels`, torch.compile): units of complete blocks run as one compiled call per group
  of equally shaped chunks; other units (sharded, partial blocks) keep the eager block sums and
  all-reduce and run the moment update, decay and step as one compiled pass per chunk.
The paths store the same first moment bit for bit; their block sums add in different orders, so v and
p match to rounding.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from optim import eager, kernels, native
from optim.blocks import UnitPlan, plan_unit
from optim.dispatch import PATHS, Implementation, resolve_paths
from optim.layout import ParamLayout
from optim.units import Unit, local_1d
from optim.update import StepHyper, UnitStep

MOMENTUM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def momentum_dtype_of(value: torch.dtype | str) -> torch.dtype:
    """`torch.float32` / `torch.bfloat16` from a dtype or its name; ValueError for anything else."""
    dtype = MOMENTUM_DTYPES.get(value) if isinstance(value, str) else value
    if dtype not in MOMENTUM_DTYPES.values():
        raise ValueError(f"momentum_dtype must be float32 or bfloat16, got {value!r}")
    return dtype


class AdamMini(torch.optim.Optimizer):
    """Adam-mini over `units` (see `optim.units`), with blocks from `layouts` (see `optim.layout`).

    `implementation`: auto | native | compiled | eager, resolved per unit here, once (`optim.dispatch`);
    the `implementation` property names what runs. `momentum_dtype`: float32 (default) or bfloat16 for the
    first moment (the 2 bytes per parameter that remain of Adam-mini's state with bf16; v stays fp32).

    State per unit param: `step` (fp32 scalar, CPU), `exp_avg` (`momentum_dtype`, like the local 1-D buffer),
    `exp_avg_sq` (fp32, one entry per block of `unit.names`, replicated over `unit.group`).
    `layouts` stays on the optimizer (`optim.state` reads parameter sizes and blocks from it).
    """

    ELEMENT_STATES = ("exp_avg",)     # optim.state: per-element state, saved by parameter name
    BLOCK_STATES = ("exp_avg_sq",)    # and per-block state

    def __init__(self, units: Sequence[Unit], layouts: Mapping[str, ParamLayout], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 implementation: Implementation = "auto", momentum_dtype: torch.dtype | str = torch.float32):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid hyper-parameters lr={lr}, eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        units = list(units)
        if not units:
            raise ValueError("AdamMini got no units")
        self.momentum_dtype = momentum_dtype_of(momentum_dtype)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__([u.param for u in units], defaults)
        self.units: list[Unit] = units
        self.layouts: dict[str, ParamLayout] = dict(layouts)
        self.plans: list[UnitPlan] = [plan_unit(u, self.layouts) for u in units]
        self._index = {id(u.param): i for i, u in enumerate(units)}
        if len(self._index) != len(units):
            raise ValueError("two units register the same tensor")
        for unit, plan in zip(units, self.plans):
            numel = local_1d(unit.param.detach()).numel()
            if numel < plan.min_local_numel:
                raise ValueError(f"unit {unit.label!r}: segments need {plan.min_local_numel} local elements, "
                                 f"buffer has {numel}")
        self.paths: list[str] = resolve_paths(implementation, units, self.plans)
        # the units of each path, stepped in this order
        self.groups: list[tuple[str, tuple[int, ...]]] = [
            (path, tuple(i for i, q in enumerate(self.paths) if q == path)) for path in PATHS if path in self.paths]
        self._runners: dict[str, Callable[[list[UnitStep]], None]] = {
            "native": self._step_native, "compiled": kernels.step, "eager": eager.step}
        self._native_steps: dict[tuple[int, ...], native.RowsStep] = {}

    @property
    def implementation(self) -> str:
        """Which paths serve the units: 'native', 'compiled', 'eager', or several joined with '+'."""
        return "+".join(path for path, _ in self.groups)

    # ------------------------------------------------------------------ state
    def _init_state(self, i: int) -> dict:
        unit, plan = self.units[i], self.plans[i]
        state = self.state[unit.param]
        if not state:
            local = local_1d(unit.param.detach())
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(local.numel(), dtype=self.momentum_dtype, device=local.device)
            state["exp_avg_sq"] = torch.zeros(plan.n_blocks, dtype=torch.float32, device=local.device)
        return state

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    def set_weight_decay(self, value: float) -> None:
        for group in self.param_groups:
            group["weight_decay"] = value

    def init_state(self) -> None:
        """Create all states now (they are otherwise created at the first step); free on the meta device."""
        for i in range(len(self.units)):
            self._init_state(i)

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but keeps `exp_avg` in `momentum_dtype` (cast, rounding to nearest even, when the
        checkpoint holds another dtype) and `exp_avg_sq`, `step` fp32 (torch would cast to a bf16 param's dtype)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        order = [p for g in self.param_groups for p in g["params"]]
        for idx, p in enumerate(order):
            if idx not in saved and str(idx) not in saved:
                continue
            src = saved[idx] if idx in saved else saved[str(idx)]
            i = self._index[id(p)]
            local = local_1d(p.detach())
            expected = {"exp_avg": ((local.numel(),), self.momentum_dtype),
                        "exp_avg_sq": ((self.plans[i].n_blocks,), torch.float32), "step": ((), torch.float32)}
            new = {}
            for key, (shape, dtype) in expected.items():
                if key not in src:
                    raise KeyError(f"unit {self.units[i].label!r}: state has no {key!r}")
                value = torch.as_tensor(src[key])
                if tuple(value.shape) != shape:
                    raise ValueError(f"unit {self.units[i].label!r}: {key} has shape {tuple(value.shape)}, expected "
                                     f"{shape} (another Adam-mini partition?)")
                device = torch.device("cpu") if key == "step" else local.device
                new[key] = value.detach().to(device=device, dtype=dtype, copy=True)
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
        states = [self._init_state(i) for i in todo]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        hypers: dict[float, StepHyper] = {}
        items: dict[int, UnitStep] = {}
        for i, state in zip(todo, states):
            t = float(state["step"])
            if t not in hypers:
                hypers[t] = StepHyper.of(group, t)
            g = self.units[i].param.grad
            g = g.to_local() if hasattr(g, "to_local") else g
            items[i] = UnitStep(i, self.plans[i], self.units[i].group, local_1d(self.units[i].param.detach()),
                                g.reshape(-1), state["exp_avg"], state["exp_avg_sq"], hypers[t])
        for path, indices in self.groups:
            mine = [i for i in indices if i in items]
            if mine:
                self._runners[path]([items[i] for i in mine])

    def _step_native(self, items: list[UnitStep]) -> None:
        """The whole update of these units in one native call per distinct step count."""
        by_hyper: dict[StepHyper, list[UnitStep]] = {}
        for it in items:
            if not native.supports(it.g):
                raise TypeError(f"unit {self.units[it.index].label!r}: the native kernel takes fp32 or bf16 gradients "
                                f"on CPU, got {it.g.dtype} on {it.g.device.type}; use implementation eager or compiled")
            by_hyper.setdefault(it.hyper, []).append(it)
        for hyper, entries in by_hyper.items():
            key = tuple(it.index for it in entries)
            run = self._native_steps.get(key)
            if run is None:
                if len(self._native_steps) >= 16:  # another pattern of None grads: keep the cache small
                    self._native_steps.clear()
                run = self._native_steps[key] = native.RowsStep([self.plans[i].chunks for i in key])
            run([(it.p, it.g, it.m, it.v) for it in entries], hyper)
