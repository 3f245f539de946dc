"""Which implementation updates each Adam-mini unit: chosen once, when the optimizer is built.

`implementation` (the `optimizer.implementation` option):

- `eager`: every unit by plain torch ops (`optim.eager`).
- `compiled`: every unit by `torch.compile`d kernels (`optim.kernels`); RuntimeError where torch.compile
  is not usable (no C++ compiler on CPU, unsupported Python).
- `native`: the C++ kernel (`optim.native`) for every unit it can take (an unsharded fp32/bf16 parameter
  on CPU: complete blocks, no all-reduce); the other units (FSDP shards, GPU tensors) run eager.
  RuntimeError when the kernel cannot be built, ValueError when no unit can use it.
- `auto` (default): native where it can take a unit and builds (a one-time warning otherwise); the rest
  compiled when all units together hold at least `FAST_MIN_NUMEL` local elements and torch.compile is
  usable, else eager. A compile costs seconds per chunk shape, which only pays off for real models:
  tests and the `debug` model stay eager off CPU.

All paths compute the same update (see `optim.adam_mini`) and store the same first moment bit for bit;
v and p differ in rounding (the block sums of g² add in different orders), so the choice is an option of
the run, never an environment variable.
"""
from __future__ import annotations

from typing import Literal, Sequence

from optim import kernels, native
from optim.blocks import UnitPlan, stands_alone
from optim.units import Unit, local_1d

Implementation = Literal["auto", "native", "compiled", "eager"]
IMPLEMENTATIONS = ("auto", "native", "compiled", "eager")
PATHS = ("native", "compiled", "eager")  # what a unit can run on, in the order a step runs them
FAST_MIN_NUMEL = 1 << 22


def native_capable(unit: Unit, plan: UnitPlan) -> bool:
    """Whether the native kernel can take `unit`: complete blocks, no all-reduce, an fp32/bf16 tensor on CPU."""
    return stands_alone(plan, unit.group) and native.supports(local_1d(unit.param.detach()))


def resolve_paths(implementation: str, units: Sequence[Unit], plans: Sequence[UnitPlan]) -> list[str]:
    """The path (`native`, `compiled` or `eager`) of every unit for `implementation` (see module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    if implementation == "eager":
        return ["eager"] * len(units)
    if implementation == "compiled":
        if not kernels.compile_available():
            raise RuntimeError("implementation='compiled': torch.compile is not usable here (no C++ compiler for "
                               "CPU kernels, an unsupported Python, or an earlier compile failed)")
        return ["compiled"] * len(units)
    capable = [native_capable(u, p) for u, p in zip(units, plans)]
    if implementation == "native":
        if not any(capable):
            raise ValueError("implementation='native': no unit can use the native kernel (it takes unsharded fp32/bf16 "
                             "parameters on CPU); choose auto, compiled or eager")
        if not native.available():
            raise RuntimeError(f"implementation='native': {native.unavailable_reason()}")
        return ["native" if c else "eager" for c in capable]
    use_native = any(capable) and native.available()
    big = sum(c.numel for p in plans for c in p.chunks) >= FAST_MIN_NUMEL
    rest = "compiled" if big and kernels.compile_available() else "eager"
    return ["native" if c and use_native else rest for c in capable]
