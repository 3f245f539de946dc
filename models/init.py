"""Weight initialisation as TinyLlama and litgpt's pretraining recipe do it."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_weights(module: nn.Module, n_layer: int, n_embd: int) -> None:
    """Initialise one module's own tensors (not its children's), so it can serve as an FSDP param_init_fn.

    Embeddings and linear layers: normal(0, sqrt(2 / (5·d))) (small-init, Nguyen & Salazar 2019).
    Output projections of attention and MLP (`*.proj`): normal(0, 1 / sqrt(d) / n_layer) (GPT-NeoX
    "wang init"). Norm weights: ones. Biases: zeros.
    """
    std = math.sqrt(2.0 / 5 / n_embd)
    for name, p in module.named_parameters(recurse=False):
        if isinstance(module, (nn.Embedding, nn.Linear)) and name == "weight":
            nn.init.normal_(p, mean=0.0, std=std)
        elif name == "bias":
            nn.init.zeros_(p)
        else:  # norm scales
            nn.init.ones_(p)
    if isinstance(module, nn.Linear) and getattr(module, "_is_residual_proj", False):
        nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(n_embd) / n_layer)


def mark_residual_projections(model: nn.Module) -> None:
    """Tag the attention/MLP output projections that get the scaled init."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (name.endswith("attn.proj") or name.endswith("mlp.proj")):
            m._is_residual_proj = True


def init_model(model: nn.Module, n_layer: int, n_embd: int) -> None:
    """Initialise a whole (materialised) model in place."""
    mark_residual_projections(model)
    for m in model.modules():
        init_weights(m, n_layer, n_embd)
