"""What the optimizer updates, independent of how the model was sharded.

A `Unit` is one tensor the optimizer registers (an `nn.Parameter`, an FSDP1 `FlatParameter` shard or
an FSDP2 `DTensor`) together with the pieces (`Segment`s) of original parameters it holds locally.
Segments may start and end anywhere, also in the middle of an Adam-mini block, so a block can straddle
two ranks; `unit.group` names the ranks whose partial block sums must be added. The unsharded case
(this module's `units_from_module`) is one unit per parameter with one whole segment and no group;
the FSDP adapters (`optim/flat.py`, `optim/dtensor.py`) build the sharded units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Module-path components added by wrappers (DDP, Fabric, torch.compile, FSDP, activation checkpointing).
WRAPPER_PREFIXES = ("module", "_forward_module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclass(frozen=True)
class Segment:
    """Elements `[start, end)` of parameter `name` (flattened, row-major) sit at `offset` in the local 1-D buffer."""

    name: str
    start: int
    end: int
    offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class Unit:
    """One optimizer-registered tensor and the parameter pieces it holds (see module docstring).

    `names` lists ALL parameters of the unit in the same order on every rank: it defines the unit's
    block vector (their blocks concatenated), which is what gets all-reduced over `group`.
    """

    param: torch.Tensor
    names: tuple[str, ...]
    segments: tuple[Segment, ...]
    group: Any = None  # torch.distributed.ProcessGroup | None
    label: str = ""


def local_1d(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the local data of `t` (a DTensor's local shard); writes through to `t`."""
    if hasattr(t, "to_local") and callable(getattr(t, "to_local")):
        t = t.to_local()
    if not t.is_contiguous():
        raise ValueError(f"expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t.view(-1)


def canonical_name(name: str) -> str:
    """The parameter FQN without wrapper components (`module.`, `_forward_module.`, `_orig_mod.`, ...)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PREFIXES)


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """`model.named_parameters()` that need a gradient, with canonical names (duplicates are an error)."""
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[str] = set()
    for raw, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = canonical_name(raw)
        if name in seen:
            raise ValueError(f"two parameters map to the same name {name!r} after stripping wrapper prefixes")
        seen.add(name)
        out.append((name, p))
    return out


def whole_unit(name: str, p: torch.Tensor, label: str | None = None) -> Unit:
    """The unit of a parameter held whole by this rank (no process group): one segment covering it."""
    numel = p.numel()
    return Unit(param=p, names=(name,), segments=(Segment(name, 0, numel, 0),) if numel else (), group=None,
                label=name if label is None else label)


def units_from_module(model: nn.Module) -> list[Unit]:
    """Unsharded (plain or DDP-wrapped) model: one unit per trainable parameter, no process group."""
    return [whole_unit(name, p) for name, p in named_parameters(model)]
