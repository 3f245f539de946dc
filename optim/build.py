"""Build the training optimizer (Adam-mini or the AdamW baseline) for a possibly wrapped model.

Dispatch on how the model is sharded happens in `model_units`: plain, DDP- and Fabric-wrapped modules
are handled here (one unit per parameter). FSDP1 FlatParameters (`optim/flat.py`) and FSDP2 DTensors
(`optim/dtensor.py`) plug in at the marked hook.
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from litgpt import Config
from torch import nn

from optim.adam_mini import AdamMini, momentum_dtype_of
from optim.dispatch import Implementation
from optim.layout import Partition, model_layout
from optim.units import Unit, named_parameters, units_from_module

OPTIMIZERS = ("adam_mini", "adamw")


def _is_fsdp1(model: nn.Module) -> bool:
    from optim import flat

    return flat.is_fsdp1(model) or any(type(p).__name__ == "FlatParameter" for p in model.parameters())


def _is_fsdp2(model: nn.Module) -> bool:
    return any(hasattr(p, "to_local") and hasattr(p, "placements") for p in model.parameters())


def model_units(model: nn.Module) -> tuple[list[Unit], list[tuple[str, tuple[int, ...]]]]:
    """The optimizer units of `model` and the original `(fqn, shape)` of every parameter they hold.

    FSDP HOOK: sharded models are detected here; `optim/flat.py` (FSDP1) and `optim/dtensor.py` (FSDP2)
    provide their units and the unsharded shapes (which the local tensors no longer show).
    """
    from optim import dtensor, flat

    if _is_fsdp1(model):
        return flat.fsdp1_units(model)  # one unit per FlatParameter (use_orig_params=True is refused there)
    if _is_fsdp2(model):
        return dtensor.dtensor_units(model)  # one unit per DTensor parameter (Shard(0) rows)
    units = units_from_module(model)
    shapes = [(name, tuple(p.shape)) for name, p in named_parameters(model)]
    return units, shapes


def build_optimizer(model: nn.Module, config: Config, name: str, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float, *, implementation: Implementation = "auto",
                    momentum_dtype: torch.dtype | str = torch.float32,
                    embedding_blocks: Literal["tokens", "elements"] = "tokens",
                    value_blocks: Literal["rows", "whole"] = "rows") -> torch.optim.Optimizer:
    """`adam_mini` (blocks from `config`) or `adamw` (torch's, fused when the device supports it).

    Both decay matrices (embeddings included) and no norm weight or bias. The keyword options are
    Adam-mini's: `implementation` and `momentum_dtype` (see `AdamMini`), `embedding_blocks` and
    `value_blocks` (see `optim.layout.Partition`); with `adamw` they must keep their defaults.
    """
    partition = Partition(embedding_blocks=embedding_blocks, value_blocks=value_blocks)
    if name == "adam_mini":
        units, shapes = model_units(model)
        return AdamMini(units, model_layout(config, shapes, partition), lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, implementation=implementation, momentum_dtype=momentum_dtype)
    if name == "adamw":
        _check_adamw_options(implementation=(implementation, "auto"),
                             momentum_dtype=(momentum_dtype_of(momentum_dtype), torch.float32),
                             embedding_blocks=(embedding_blocks, "tokens"), value_blocks=(value_blocks, "rows"))
        units, shapes = model_units(model)
        layouts = model_layout(config, shapes)
        if _is_fsdp1(model):
            # FlatParameters mix decayed matrices with norms: decay per original parameter instead.
            from optim.adamw import SegmentDecayAdamW

            return SegmentDecayAdamW(units, layouts, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     foreach=True)
        from optim.adamw import AdamW

        fused = _fused_supported(u.param for u in units)
        return AdamW(units, layouts, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None,
                     foreach=None if fused else True)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _check_adamw_options(**options: tuple) -> None:
    """ValueError naming the first Adam-mini option `name=(value, default)` that is not at its default."""
    for option, (value, default) in options.items():
        if value != default:
            raise ValueError(f"{option}={value} applies to adam_mini only; the adamw baseline takes the default")


def _fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel exists for these parameters' device and dtypes."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = list(params)
    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.device.type in devices and p.is_floating_point()
                                and type(p) in (torch.Tensor, nn.Parameter) for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (all of them, `step` included; local to this rank)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total
