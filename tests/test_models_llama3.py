"""The Llama-3 layout (`llama3.2-1b`): litgpt's config field for field, parameters and Adam-mini blocks by hand,
the update on a scaled-down model of the same layout against the float64 reference, and a tied embedding
(one parameter for wte and lm_head, as in Meta's checkpoint) getting one block per token row."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import benchmarks.memory_table as mt
import models
from helpers.optim_reference import HP, Reference, rel_err
from optim.adam_mini import AdamMini
from optim.layout import format_layout, model_layout
from optim.units import units_from_module

V, D, L, NH, NG, HS, FF = 128256, 2048, 16, 32, 8, 64, 8192


def test_llama32_1b_is_litgpts_config():
    from litgpt import Config

    ours = dataclasses.asdict(models.get_config("llama3.2-1b"))
    theirs = dataclasses.asdict(Config.from_name("Llama-3.2-1B"))
    assert {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k] and k not in ("name", "hf_config")} == {}
    assert ours["padded_vocab_size"] == V and ours["n_query_groups"] == NG and ours["rope_base"] == 500000


def test_llama32_1b_parameters_and_adam_mini_blocks_by_hand():
    config = models.get_config("llama3.2-1b")
    per_layer = D * (NH + 2 * NG) * HS + NH * HS * D + 3 * D * FF + 2 * D
    untied = 2 * V * D + L * per_layer + D
    assert untied - V * D == 1_235_814_400  # Meta's published count, one embedding matrix
    assert models.count_params(config) == untied == 1_498_482_688
    shapes = [(n, tuple(p.shape)) for n, p in models.build_model(config).named_parameters()]
    layouts = model_layout(config, shapes)
    assert layouts["transformer.wte.weight"].runs == layouts["lm_head.weight"].runs == ((V, D),)
    assert layouts["lm_head.weight"].kind == "tokens"
    assert layouts["transformer.h.0.attn.qkv.weight"].runs == ((NH, HS * D), (NG, HS * D), (NG * HS, D))
    # per layer: 32 Q heads + 8 K groups + 512 V rows + 2048 proj rows + 2 x 8192 MLP rows + 2048 rows + 2 norms
    n_v = 2 * V + L * (NH + NG + NG * HS + D + 2 * FF + D + 2) + 1
    assert sum(lay.n_blocks for lay in layouts.values()) == n_v == 593_057
    assert f"{n_v:,}" in format_layout(layouts).splitlines()[-1]
    units = mt.fsdp_units(config)  # the memory table's row
    assert (units[0]["numel"], units[0]["blocks"]) == (2 * V * D + D, 2 * V + 1)
    assert [(u["numel"], u["blocks"]) for u in units[1:]] == [(per_layer, 21_034)] * L
    assert "llama3.2-1b" in mt.MODELS


def _small_llama3(tied: bool, seed: int = 0):
    """The Llama-3 layout scaled down: GQA 4:1, a vocabulary padded past the tokenizer's, rope adjustments."""
    config = models.get_config("llama3.2-1b", block_size=32, vocab_size=300, padded_vocab_size=320, n_layer=2,
                               n_embd=64, n_head=8, n_query_groups=2, head_size=8, intermediate_size=96)
    model = models.build_model(config, device="cpu")
    models.init_model(model, config.n_layer, config.n_embd, seed=seed)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight  # one parameter, as in Meta's checkpoint
    return config, model


@pytest.mark.parametrize("tied", [False, True], ids=["separate", "tied"])
def test_llama3_layout_matches_float64_reference(tied):
    """Real forward/backward gradients (a tied matrix gets the sum of its two uses), 4 steps, eager AdamMini vs
    the float64 reference. Tied, the one parameter is named lm_head.weight (registered first) and gets one
    block per token row."""
    config, model = _small_llama3(tied)
    named = dict(model.named_parameters())
    assert ("transformer.wte.weight" in named) != tied and "lm_head.weight" in named
    layouts = model_layout(config, [(n, p.shape) for n, p in named.items()])
    assert layouts["lm_head.weight"].runs == ((320, 64),)
    opt = AdamMini(units_from_module(model), layouts, implementation="eager", **HP)
    ref = Reference(named, layouts, **HP)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        tokens = torch.randint(0, 300, (2, 17), generator=gen)
        model.zero_grad()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads = {n: p.grad.detach().clone() for n, p in named.items()}
        opt.step()
        ref.step(grads)
    for n, p in named.items():
        assert rel_err(p, ref.p[n]) <= 1e-6, n
        assert rel_err(opt.state[p]["exp_avg_sq"], ref.v[n]) <= 1e-5, n
    if tied:
        assert model.lm_head.weight is model.transformer.wte.weight
