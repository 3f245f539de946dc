"""Fabric, strategy and precision for the hardware at hand; the model built, initialised, compiled and wrapped.

- `fsdp`: Fabric's `FSDPStrategy(use_orig_params=False)` (Adam-mini sees FSDP1's flat parameters), one unit
  per litgpt `Block`; on CPU through `pretrain.cpu_fsdp.CPUFSDPStrategy` (gloo). The model is created on
  the meta device and each unit is materialised and initialised by `param_init_fn` before sharding.
- `fsdp2`: Fabric's `ModelParallelStrategy` with `fully_shard` on every `Block` and on the root (DTensor
  `Shard(0)` parameters); bf16-mixed is FSDP2's `MixedPrecisionPolicy` (bf16 parameters in forward and
  backward, fp32 gradient reduction). Each Block is materialised, initialised and sharded in turn.
- `ddp` / `single`: DDP over NCCL or gloo, or one process.
- `system.replicas` N > 1 (null: one per node on several multi-GPU nodes): hybrid sharding (HSDP) for fsdp/fsdp2, N
  replicas of world/N consecutive ranks each (`Plan.replicas` x `Plan.shard_size`): FSDP1 `HYBRID_SHARD` on a
  `(replicate, shard)` device mesh, FSDP2 `fully_shard` on that 2-D mesh. Adam-mini's block sums then go over the
  shard group only (the group FSDP gives its units: optim/flat.py, optim/dtensor.py).
Initial weights are the same for every strategy and world size (`models.init`: one generator per parameter).
`system.compile` compiles each `Block` (`Block.compile()`, in place, so parameter names do not change);
`system.activation_checkpointing` recomputes each `Block` in the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import lightning as L
import torch
from litgpt import Config
from litgpt.model import GPT, Block
from torch import nn

import models
from pretrain.config import ConfigError, PretrainConfig


@dataclass(frozen=True)
class Plan:
    accelerator: str               # "cuda" | "cpu"
    strategy: str                  # "fsdp" | "fsdp2" | "ddp" | "single"
    precision: str
    world_size: int
    compile: bool
    activation_checkpointing: bool
    replicas: int = 1              # > 1: hybrid sharding, `replicas` x `shard_size` ranks (fsdp/fsdp2 only)

    @property
    def shard_size(self) -> int:
        """Ranks that shard the model together (all of them under FULL_SHARD)."""
        return self.world_size // self.replicas

    def describe(self) -> str:
        extras = [x for x, on in (("compiled", self.compile), ("activation checkpointing",
                                                               self.activation_checkpointing)) if on]
        layout = f"hsdp {self.replicas}x{self.shard_size}" if self.replicas > 1 else f"x {self.world_size}"
        return f"{self.strategy} {layout} {self.accelerator} ({', '.join([self.precision, *extras])})"


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
        # On CPU, DDP runs the same math as FSDP at less cost (no all-gathers); fsdp/fsdp2 are there to try.
        strategy = "fsdp" if accelerator == "cuda" else ("ddp" if world > 1 else "single")
    if strategy == "single" and world != 1:
        raise ConfigError(f"system.strategy=single runs one process, but devices x num_nodes = {world}")
    precision = s.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "cuda" else "32-true"
    compile_ = accelerator == "cuda" if s.compile is None else s.compile
    return Plan(accelerator, strategy, precision, world, compile_, s.activation_checkpointing,
                replicas=_replicas(s.replicas, strategy, world, s.num_nodes))


def _replicas(asked: int | None, strategy: str, world: int, num_nodes: int) -> int:
    """The number of model replicas (HSDP when > 1): `system.replicas`, or one per node for fsdp/fsdp2 on
    several nodes of several GPUs each (a replica of one rank would shard nothing: refused)."""
    sharded = strategy in ("fsdp", "fsdp2")
    if asked is None:
        return num_nodes if sharded and num_nodes > 1 and world // num_nodes > 1 else 1
    if asked > 1 and not sharded:
        raise ConfigError(f"system.replicas={asked} is a layout of fsdp/fsdp2 (hybrid sharding); "
                          f"system.strategy={strategy} shards nothing: leave system.replicas null or 1")
    if world % asked:
        raise ConfigError(f"system.replicas={asked} does not divide the world size devices x num_nodes = {world}")
    if asked > 1 and world == asked:
        # FSDP1 clamps a shard group of one to NO_SHARD, which does not average across the replicas (measured)
        raise ConfigError(f"system.replicas={asked} leaves one rank per replica (world size {world}): nothing is "
                          f"sharded; use system.strategy=ddp, or fewer replicas")
    return asked


def build_fabric(cfg: PretrainConfig, p: Plan, model_config: Config) -> L.Fabric:
    precision = p.precision
    if p.strategy == "fsdp":
        strategy = _fsdp1_strategy(cfg, p, model_config)
    elif p.strategy == "fsdp2":
        strategy = _fsdp2_strategy(cfg, p, model_config)
        if precision == "bf16-mixed":
            precision = "32-true"  # FSDP2's MixedPrecisionPolicy casts; no autocast on top
    elif p.strategy == "ddp":
        from lightning.fabric.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="nccl" if p.accelerator == "cuda" else "gloo",
                               timeout=collective_timeout(cfg))
    else:
        strategy = "auto"
    return L.Fabric(accelerator=p.accelerator, strategy=strategy, devices=cfg.system.devices,
                    num_nodes=cfg.system.num_nodes, precision=precision)


def _fsdp1_strategy(cfg: PretrainConfig, p: Plan, model_config: Config):
    from lightning.fabric.strategies import FSDPStrategy

    from pretrain.cpu_fsdp import CPUFSDPStrategy

    cls = FSDPStrategy if p.accelerator == "cuda" else CPUFSDPStrategy
    return cls(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if p.activation_checkpointing else None,
        state_dict_type="sharded",
        # HSDP: shard over the mesh's inner dimension ("shard", the ranks of one node), replicate over the outer
        sharding_strategy="HYBRID_SHARD" if p.replicas > 1 else "FULL_SHARD",
        device_mesh=(p.replicas, p.shard_size) if p.replicas > 1 else None,
        use_orig_params=False,  # Adam-mini works on FSDP1 FlatParameters (optim/flat.py)
        limit_all_gathers=True,
        param_init_fn=partial(materialize, model_config=model_config, seed=cfg.seed, recurse=False),
        timeout=collective_timeout(cfg),
    )


def _fsdp2_strategy(cfg: PretrainConfig, p: Plan, model_config: Config):
    from lightning.fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        parallelize_fn=partial(_fsdp2_parallelize, p=p, model_config=model_config, seed=cfg.seed),
        data_parallel_size=p.world_size, tensor_parallel_size=1,
        process_group_backend="nccl" if p.accelerator == "cuda" else "gloo", timeout=collective_timeout(cfg))


def collective_timeout(cfg: PretrainConfig) -> timedelta:
    """How long a rank waits in a collective or the rendezvous (system.collective_timeout_s; gloo and NCCL honour
    it): a stopped or dead peer ends the run with exit 4 instead of a 30-minute hang."""
    return timedelta(seconds=cfg.system.collective_timeout_s)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def materialize(module: nn.Module, model_config: Config, seed: int, recurse: bool = True) -> None:
    """Move a meta module's own tensors (and its children's, if `recurse`) to this device and initialise them."""
    for m in module.modules() if recurse else [module]:
        if any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]):
            m.to_empty(device=_device(), recurse=False)
            models.init_weights(m, model_config.n_layer, model_config.n_embd, seed)
        if isinstance(m, GPT):
            m.reset_parameters()  # the RoPE cos/sin buffers


def _fsdp2_parallelize(model: GPT, mesh, p: Plan, model_config: Config, seed: int) -> GPT:
    """`ModelParallelStrategy`'s parallelize_fn: per Block materialise, initialise, (checkpoint, compile,) shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = hsdp_mesh(mesh, p.replicas) if p.replicas > 1 else mesh["data_parallel"]
    policy = MixedPrecisionPolicy()
    if p.precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        materialize(block, model_config, seed)
    wrap_blocks(model, p)
    for block in model.transformer.h:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    materialize(model, model_config, seed)  # the rest (embeddings, final norm, head): the Blocks hold no meta tensor
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model


def hsdp_mesh(mesh, replicas: int):
    """The 2-D `("replicate", "shard")` mesh of HSDP over the ranks of ModelParallelStrategy's data-parallel
    dimension (Fabric builds that one 1-D; `fully_shard` on a 2-D mesh replicates over dim 0, shards over dim 1).
    Consecutive ranks shard together: with one replica per node, the shards stay inside a node."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = mesh["data_parallel"]
    world = dp.size()
    if dp.size() != mesh.size():
        raise ConfigError("hybrid sharding (system.replicas > 1) needs tensor_parallel_size 1")
    return init_device_mesh(mesh.device_type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def wrap_blocks(model: GPT, p: Plan) -> None:
    """Activation checkpointing (a wrapper around each Block) and/or `Block.compile()`, in place.

    (FSDP1's activation checkpointing is Lightning's, applied after wrapping: only compile here.)"""
    if p.activation_checkpointing and p.strategy != "fsdp":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.transformer.h):
            model.transformer.h[i] = checkpoint_wrapper(block)
    if p.compile:
        for block in model.transformer.h:
            block.compile()


def setup_model(fabric: L.Fabric, p: Plan, model_config: Config, seed: int):
    """Build, initialise (same weights on every strategy) and wrap the model. Returns the Fabric module."""
    with fabric.init_module(empty_init=True):
        model = GPT(model_config)
    models.mark_for_init(model)
    if p.strategy == "fsdp":
        # meta device: FSDP materialises and initialises each unit through param_init_fn before sharding
        wrap_blocks(model, p)
    elif p.strategy != "fsdp2":
        # not meta: `empty_init` left the parameters uninitialised on the device
        models.init_model(model, model_config.n_layer, model_config.n_embd, seed)
        wrap_blocks(model, p)
    # fsdp2: _fsdp2_parallelize (ModelParallelStrategy's parallelize_fn) does all of it, Block by Block
    return fabric.setup_module(model)


def optimizer_target(fabric_module) -> nn.Module:
    """The module whose parameters the optimizer must own.

    FSDP1: the FSDP root (its FlatParameters; the original GPT no longer holds them with
    use_orig_params=False). Otherwise: the plain GPT (DTensors under FSDP2), whose parameter names carry no
    wrapper prefix.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    forward = fabric_module._forward_module
    return forward if isinstance(forward, FSDP) else fabric_module.module


def state_dict_module(fabric_module) -> nn.Module:
    """The module whose state dict is saved: torch's `get_model_state_dict` names it by original FQNs."""
    return fabric_module._forward_module


def end_process_group(fabric: L.Fabric) -> None:
    """Tear the process group down while the interpreter is whole, once every rank is done with it.

    Left to the interpreter's exit, a gloo worker thread may still hold the last collective's work object and
    the process aborts ("terminate called without an active exception", exit -6 instead of the app's code).
    Called only where all ranks end together (done, stopped by a signal, non-finite loss): after an error on
    one rank the others may be inside a collective, and NCCL's teardown could then wait for them.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        fabric.barrier()  # no rank closes its connections while another still reads from them
        torch.distributed.destroy_process_group()


def abandon_process_group() -> None:
    """Tear the process group down without waiting for the other ranks (one of them stopped answering or died):
    left to the interpreter's exit, gloo could abort the process (see `end_process_group`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort: the run ends with exit 4 either way
            pass
