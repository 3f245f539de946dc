"""Fabric, strategy and precision for the hardware at hand; the model built, initialised and set up.

GPU: Fabric `FSDPStrategy(use_orig_params=False)` so Adam-mini sees FSDP's flat parameters, one FSDP unit
per litgpt `Block`, optional activation checkpointing per `Block`, sharded state dicts, bf16-mixed.
CPU: Lightning's FSDPStrategy refuses CPU, so one process (single device) or DDP over gloo.
The model is created on the meta device (FSDP) or uninitialised (others) and initialised like TinyLlama
(`models.init_weights`), with the same seed on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt import Config
from litgpt.model import GPT, Block

import models
from pretrain.config import ConfigError, PretrainConfig


@dataclass(frozen=True)
class Plan:
    accelerator: str  # "cuda" | "cpu"
    strategy: str     # "fsdp" | "ddp" | "single"
    precision: str
    world_size: int


def plan(cfg: PretrainConfig) -> Plan:
    """Resolve the `auto` choices and refuse combinations that cannot work, before starting anything."""
    s = cfg.system
    accelerator = s.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.accelerator=cuda but torch sees no CUDA device")
    world = s.devices * s.num_nodes
    strategy = s.strategy
    if strategy == "auto":
        strategy = "fsdp" if accelerator == "cuda" else ("ddp" if world > 1 else "single")
    if strategy == "fsdp" and accelerator == "cpu":
        raise ConfigError("system.strategy=fsdp needs GPUs (Lightning's FSDPStrategy refuses CPU); "
                          "use system.strategy=ddp or single on CPU")
    if strategy == "single" and world != 1:
        raise ConfigError(f"system.strategy=single runs one process, but devices x num_nodes = {world}")
    if s.activation_checkpointing and strategy != "fsdp":
        raise ConfigError("system.activation_checkpointing is implemented for strategy=fsdp only")
    precision = s.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "cuda" else "32-true"
    return Plan(accelerator, strategy, precision, world)


def fsdp_param_init_fn(module: torch.nn.Module, n_layer: int, n_embd: int) -> None:
    """FSDP `param_init_fn`: materialise one module's own tensors on this GPU (CPU in tests) and initialise them.

    FSDP calls it for every module of a unit that still has meta tensors, before sharding. The root
    GPT's own tensors are the RoPE cos/sin buffers, recomputed by `GPT.reset_parameters`.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    module.to_empty(device=device, recurse=False)
    models.init_weights(module, n_layer, n_embd)
    if isinstance(module, GPT):
        module.reset_parameters()


def build_fabric(cfg: PretrainConfig, p: Plan, model_config: Config, tb_purge_step: int | None) -> L.Fabric:
    if p.strategy == "fsdp":
        strategy = FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if cfg.system.activation_checkpointing else None,
            state_dict_type="sharded",
            sharding_strategy="FULL_SHARD",
            use_orig_params=False,  # Adam-mini works on FSDP1 FlatParameters (optim/flat.py)
            limit_all_gathers=True,
            param_init_fn=partial(fsdp_param_init_fn, n_layer=model_config.n_layer, n_embd=model_config.n_embd),
        )
    elif p.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="nccl" if p.accelerator == "cuda" else "gloo")
    else:
        strategy = "auto"
    loggers = []
    if cfg.logging.tensorboard:
        kwargs = {"purge_step": tb_purge_step} if tb_purge_step else {}
        # One event folder per out_dir: a resumed run continues the same curves; purge_step drops the
        # events a crashed run wrote after its last checkpoint.
        loggers.append(TensorBoardLogger(root_dir=Path(cfg.out_dir), name="tensorboard", version="",
                                         default_hp_metric=False, **kwargs))
    return L.Fabric(accelerator=p.accelerator, strategy=strategy, devices=cfg.system.devices,
                    num_nodes=cfg.system.num_nodes, precision=p.precision, loggers=loggers)


def setup_model(fabric: L.Fabric, p: Plan, model_config: Config):
    """Build, initialise and wrap the model. Returns the Fabric module."""
    with fabric.init_module(empty_init=True):
        model = GPT(model_config)
    models.mark_residual_projections(model)
    if p.strategy != "fsdp":
        # Not meta: `empty_init` left the parameters uninitialised on the device.
        models.init_model(model, model_config.n_layer, model_config.n_embd)
    # FSDP: the module is on the meta device; FSDP materialises and initialises it unit by unit through
    # fsdp_param_init_fn (given to FSDPStrategy) before sharding.
    return fabric.setup_module(model)


def optimizer_target(fabric_module) -> torch.nn.Module:
    """The module whose parameters the optimizer must own.

    FSDP: the FSDP root (its FlatParameters; the original GPT no longer holds them with
    use_orig_params=False). Otherwise: the plain GPT, whose parameter names carry no wrapper prefix.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    forward = fabric_module._forward_module
    return forward if isinstance(forward, FSDP) else fabric_module.module
