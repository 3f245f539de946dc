"""The AdamW baseline: torch's AdamW over the optimizer units, with weight decay per original parameter.

`AdamW` (one device, DDP, FSDP2 DTensors): torch's kernels (fused where the device has them) with a decay
and a no-decay group. `SegmentDecayAdamW` (FSDP1 flat shards): see below. Both keep their `units` and
`layouts`, so `optim.state` saves their state by original parameter name like Adam-mini's (one
checkpoint format for every strategy), and create their state on demand (`init_state`) as torch does.

torch's AdamW decides weight decay per param group, i.e. per registered tensor. Under FSDP1 with
use_orig_params=False the registered tensors are FlatParameter shards that mix matrices (decayed) with
norm weights (not decayed), so a per-tensor rule cannot be right: "ndim >= 2" sees only 1-D tensors and
decays nothing. This subclass registers the flat shards with weight_decay=0 and applies the decay
itself on the segments of decayed parameters, before the Adam update, exactly where torch's AdamW does
it (`p.mul_(1 - lr * weight_decay)`), so the result equals unsharded AdamW with decay groups.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from optim.layout import ParamLayout
from optim.units import Unit, local_1d


class _NamedStateMixin:
    """What `optim.state` needs of an AdamW: units, layouts, state kinds, the zero state, the decay rate."""

    ELEMENT_STATES = ("exp_avg", "exp_avg_sq")
    BLOCK_STATES = ()

    def init_state(self) -> None:
        """Create the state torch's AdamW creates at its first step (zeros, step 0), where it is missing."""
        from torch.optim.optimizer import _get_scalar_dtype

        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                on_device = group["fused"] or group["capturable"]
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]),
                                            device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class AdamW(_NamedStateMixin, torch.optim.AdamW):
    """torch.optim.AdamW over whole parameters (one unit each), decaying those whose layout says so."""

    def __init__(self, units: Sequence[Unit], layouts: Mapping[str, ParamLayout], lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, **kwargs):
        self.units, self.layouts = list(units), dict(layouts)
        decay = [u.param for u in self.units if self.layouts[u.names[0]].weight_decay]
        rest = [u.param for u in self.units if not self.layouts[u.names[0]].weight_decay]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}) if g["params"]]
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    @property
    def weight_decay(self) -> float:
        return max(group["weight_decay"] for group in self.param_groups)

    def set_weight_decay(self, value: float) -> None:
        for group in self.param_groups:
            if group["weight_decay"]:
                group["weight_decay"] = value


class SegmentDecayAdamW(_NamedStateMixin, torch.optim.AdamW):
    """torch.optim.AdamW over `units`, decaying only the segments whose parameter has weight_decay.

    The decay rate lives in each param group as `"segment_weight_decay"` (saved in `state_dict()`);
    torch's own `weight_decay` stays 0. Moments and the update are torch's kernels (foreach/fused).
    """

    def __init__(self, units: Sequence[Unit], layouts: Mapping[str, ParamLayout], lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, **kwargs):
        self.units, self.layouts = list(units), dict(layouts)
        params = [u.param for u in self.units]
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, **kwargs)
        for group in self.param_groups:
            group["segment_weight_decay"] = weight_decay
        # (offset, numel) runs of decayed elements in each unit's local buffer, merged when adjacent.
        self._decay_runs: dict[int, list[tuple[int, int]]] = {}
        for u in units:
            runs: list[tuple[int, int]] = []
            for seg in sorted(u.segments, key=lambda s: s.offset):
                if not layouts[seg.name].weight_decay:
                    continue
                if runs and runs[-1][0] + runs[-1][1] == seg.offset:
                    runs[-1] = (runs[-1][0], runs[-1][1] + seg.numel)
                else:
                    runs.append((seg.offset, seg.numel))
            self._decay_runs[id(u.param)] = runs

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["segment_weight_decay"]

    def set_weight_decay(self, value: float) -> None:
        for group in self.param_groups:
            group["segment_weight_decay"] = value

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # as torch's AdamW: evaluate first, then decay and update
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            factor = 1.0 - group["lr"] * group["segment_weight_decay"]
            if factor == 1.0:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                local = local_1d(p)
                for offset, numel in self._decay_runs.get(id(p), ()):
                    local[offset:offset + numel].mul_(factor)
        super().step()
        return loss
