"""Weight initialisation as TinyLlama and litgpt's pretraining recipe do it, reproducible per parameter.

Every parameter draws from its own generator, seeded by the run's seed and the parameter's name, so the
initial weights do not depend on the order in which modules are initialised: one device, DDP, FSDP1's
unit-by-unit `param_init_fn` and FSDP2's per-Block materialisation all start from the same weights.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def param_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """The generator that initialises parameter `name` (a canonical FQN) for run seed `seed`."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


@torch.no_grad()
def init_weights(module: nn.Module, n_layer: int, n_embd: int, seed: int = 0) -> None:
    """Initialise one module's own tensors (not its children's), so it can serve as an FSDP param_init_fn.

    The module's path in the model (set by `mark_for_init`) names its parameters' generators. Embeddings
    and linear layers: normal(0, sqrt(2 / (5·d))) (small-init, Nguyen & Salazar
    2019). Output projections of attention and MLP (`*.proj`): normal(0, 1 / sqrt(d) / n_layer) (GPT-NeoX
    "wang init"). Norm weights: ones. Biases: zeros.
    """
    std = math.sqrt(2.0 / 5 / n_embd)
    prefix = getattr(module, "_param_prefix", "")
    if isinstance(module, nn.Linear) and getattr(module, "_is_residual_proj", False):
        std = 1.0 / math.sqrt(n_embd) / n_layer
    for name, p in module.named_parameters(recurse=False):
        if isinstance(module, (nn.Embedding, nn.Linear)) and name == "weight":
            p.normal_(0.0, std, generator=param_generator(seed, prefix + name, p.device))
        elif name == "bias":
            nn.init.zeros_(p)
        else:  # norm scales
            nn.init.ones_(p)


def mark_for_init(model: nn.Module) -> None:
    """Tag every module with its path (which seeds its parameters) and the output projections that get
    the scaled init; call it on the plain model, before any wrapper changes the names."""
    for name, m in model.named_modules():
        m._param_prefix = f"{name}." if name else ""
        if isinstance(m, nn.Linear) and (name.endswith("attn.proj") or name.endswith("mlp.proj")):
            m._is_residual_proj = True


def init_model(model: nn.Module, n_layer: int, n_embd: int, seed: int = 0) -> None:
    """Initialise a whole (materialised) model in place."""
    mark_for_init(model)
    for m in model.modules():
        init_weights(m, n_layer, n_embd, seed)
