"""Lightning Fabric's FSDPStrategy on CPU (gloo): the app's real FSDP path without a GPU.

Lightning refuses `FSDPStrategy` on CPU only by an exact type check (`type(strategy) is FSDPStrategy` in
`lightning/fabric/connector.py`), and its `setup_module` passes `device_id=root_device.index`, which is
None on CPU, where torch's FSDP1 then asks for an accelerator. This subclass passes the check and wraps
with `device_id=torch.device("cpu")`, and builds the hybrid-sharding (HSDP) device mesh on the CPU (Lightning
builds a `device_mesh=(replicas, shard)` tuple on "cuda"); everything else (process group, auto-wrap, param_init_fn,
activation checkpointing, mixed precision, clipping, no_backward_sync) is Lightning's own code.
Checked with lightning 2.6.6 and torch 2.13 on 2 and 3 gloo processes (tests/test_pretrain_fsdp.py).
"""
from __future__ import annotations

import torch
from lightning.fabric.strategies import FSDPStrategy
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from torch import nn


class CPUFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy` whose modules are wrapped for the CPU (see the module docstring)."""

    def setup_environment(self) -> None:
        # Lightning turns a `device_mesh=(replicas, shard)` tuple into a mesh on "cuda": build it on the CPU
        shape = self._fsdp_kwargs.pop("device_mesh", None)
        super().setup_environment()
        if isinstance(shape, tuple):
            from torch.distributed.device_mesh import init_device_mesh

            shape = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        if shape is not None:
            self._fsdp_kwargs["device_mesh"] = shape

    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        module = FullyShardedDataParallel(
            module=module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self._fsdp_kwargs)
        _setup_activation_checkpointing(module, self._activation_checkpointing_kwargs)
        return module
