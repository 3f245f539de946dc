"""What one Adam-mini step of a unit needs: the hyper-parameter record every kernel reads, and the unit's tensors.

`StepHyper` is built once per step and step count t (units skipped for a missing gradient may lag
behind) from a param group. Every implementation reads the same record: the native C++ kernel gets
`values()` as a double array (its `Hyper` struct has the same fields in the same order), the
compiled kernels a float32 tensor indexed by `SLOT`, the eager path the attributes. So the order and
meaning of the hyper-parameters are defined once, here.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any

import torch

from optim.blocks import UnitPlan, stands_alone


@dataclass(frozen=True)
class StepHyper:
    """The scalars of one step at step count t (the field order is the kernels' slot order)."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    bias_correction2: float          # 1 - beta2^t
    lr_over_bias_correction1: float  # lr / (1 - beta1^t)
    eps: float
    decay: float                     # 1 - lr * weight_decay, applied to decayed blocks only

    @classmethod
    def of(cls, group: dict, t: float) -> StepHyper:
        """The record for param group `group` (lr, betas, eps, weight_decay) at step count `t` (>= 1)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return cls(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
                   bias_correction2=1.0 - beta2 ** t, lr_over_bias_correction1=lr / (1.0 - beta1 ** t),
                   eps=group["eps"], decay=1.0 - lr * group["weight_decay"])

    def values(self) -> tuple[float, ...]:
        """The fields in slot order."""
        return dataclasses.astuple(self)

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The fields in slot order as a float32 tensor on `device` (compiled kernels: no recompile per lr)."""
        return torch.tensor(self.values(), dtype=torch.float32, device=device)


# SLOT.beta1 == 0, SLOT.one_minus_beta1 == 1, ...: indices into `values()` / `tensor()`
SLOT = types.SimpleNamespace(**{f.name: i for i, f in enumerate(dataclasses.fields(StepHyper))})


@dataclass(frozen=True)
class UnitStep:
    """Unit `index` for this step: its plan, the process group completing its block sums (or None), 1-D local
    views of p, g and m (exp_avg), v (exp_avg_sq, one entry per block) and its `StepHyper`."""

    index: int
    plan: UnitPlan
    group: Any
    p: torch.Tensor
    g: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    hyper: StepHyper

    @property
    def stands_alone(self) -> bool:
        """Complete blocks, no all-reduce: the whole update, block sums included, can run in one kernel."""
        return stands_alone(self.plan, self.group)
