"""Gradient accumulation: k micro-batches of b sequences give the gradients of one batch of k*b
(float64 model, tolerance ~1e-6 of each gradient's scale), and a whole run with accumulation matches
one without."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import models
from helpers.checkpoints import checkpoint_tensors
from helpers.runs import tiny_config
from pretrain.loop import fit
from pretrain.step import forward_backward


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_accumulated_micro_batches_equal_one_big_batch(float64_default):
    torch.manual_seed(0)
    cfg = models.get_config("debug")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="64-true")
    with fabric.init_module():
        model = models.build_model(cfg, device=None)
    models.init_model(model, cfg.n_layer, cfg.n_embd)
    model = fabric.setup_module(model)
    batch = torch.randint(0, cfg.padded_vocab_size, (8, 33))

    big = forward_backward(fabric, model, [batch])
    g_big = _grads(model.module)
    model.zero_grad(set_to_none=True)
    small = forward_backward(fabric, model, batch.split(2))  # 4 micro-batches of 2
    g_small = _grads(model.module)

    assert next(model.parameters()).dtype == torch.float64 and big.dtype == torch.float64
    assert small.item() == pytest.approx(big.item(), rel=1e-12)
    for name in g_big:
        assert g_big[name].abs().max() > 0, name
        # litgpt's RMSNorm computes in float32 even for a float64 model, so the batch sums of its
        # gradients carry float32 rounding (~1e-7 relative, more where terms cancel); all the rest is float64.
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-5, atol=1e-6 * g_big[name].abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
    # the 1/k scaling matters: without it the gradients would be 4 times larger
    model.zero_grad(set_to_none=True)
    for mb in batch.split(2):
        logp = model(mb[:, :-1]).flatten(0, 1).log_softmax(-1)
        fabric.backward(logp.gather(1, mb[:, 1:].reshape(-1, 1)).mean().neg())
    name = "lm_head.weight"
    torch.testing.assert_close(model.module.get_parameter(name).grad, 4 * g_big[name], rtol=1e-10, atol=1e-14)


def test_run_with_accumulation_matches_run_without(data_dir, tmp_path):
    data = data_dir
    common = dict(train__global_batch_tokens=4 * 32 * 2, train__max_steps=3, eval__interval=0,
                  checkpoint__interval=0, optimizer__name="adamw")
    one = fit(tiny_config(data, tmp_path / "one", train__micro_batch_size=4, **common))
    two = fit(tiny_config(data, tmp_path / "two", train__micro_batch_size=2, **common))
    four = fit(tiny_config(data, tmp_path / "four", train__micro_batch_size=1, **common))
    for step in (1, 2, 3):
        assert two.losses[step] == pytest.approx(one.losses[step], rel=2e-5, abs=0)
        assert four.losses[step] == pytest.approx(one.losses[step], rel=2e-5, abs=0)
    a = {k: v for k, v in checkpoint_tensors(tmp_path / "one" / "step-00000003").items() if k.startswith("model.")}
    b = {k: v for k, v in checkpoint_tensors(tmp_path / "four" / "step-00000003").items() if k.startswith("model.")}
    # float32 rounding differs with the batch split; Adam turns it into update differences of a few
    # 1e-6 (lr 3e-3, 3 steps): far below what a wrong accumulation would change
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
