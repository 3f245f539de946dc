"""The FSDP paths' initialisation: FSDP1's `param_init_fn` (unit by unit, on the meta-device model) and
FSDP2's per-Block materialisation give, on every rank, exactly the weights that one device initialises
(`models.init_model`: one generator per parameter, seeded by name), whatever the order; and those are
TinyLlama's: normal(0, sqrt(2/5d)), output projections normal(0, 1/sqrt(d)/L), norms 1."""
from __future__ import annotations

import math
import os

import pytest
import torch

import models
from helpers.dist import spawn

SEED = 42


def _worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from litgpt.model import GPT, Block
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from pretrain.strategy import Plan, _fsdp2_parallelize, materialize

    cfg = models.get_config("debug")
    torch.manual_seed(rank)  # the global RNG differs per rank: init must not depend on it
    with torch.device("meta"):
        model = GPT(cfg)
    models.mark_for_init(model)
    from functools import partial

    fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=False,
                device_id=torch.device("cpu"), param_init_fn=partial(materialize, model_config=cfg, seed=SEED,
                                                                     recurse=False))
    with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        sd1 = {k: v.detach().clone() for k, v in fsdp.state_dict().items()}
    meta = [n for n, t in list(fsdp.named_parameters()) + list(fsdp.named_buffers()) if t.is_meta]

    from torch.distributed.device_mesh import init_device_mesh

    with torch.device("meta"):
        model2 = GPT(cfg)
    models.mark_for_init(model2)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    plan = Plan("cpu", "fsdp2", "32-true", world, compile=False, activation_checkpointing=False)
    model2 = _fsdp2_parallelize(model2, mesh, plan, cfg, SEED)
    sd2 = {k: v.full_tensor() for k, v in model2.state_dict().items()}
    torch.save({"fsdp": sd1, "fsdp2": sd2, "cos": fsdp.module.cos.clone(), "meta": meta},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


@pytest.mark.slow
def test_fsdp_and_fsdp2_init_equal_one_device_init_on_every_rank(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    cfg = models.get_config("debug")
    reference = models.build_model(cfg, device="cpu")
    models.init_model(reference, cfg.n_layer, cfg.n_embd, SEED)
    ref = reference.state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["meta"] == []
        torch.testing.assert_close(got["cos"], reference.cos, rtol=0, atol=0)
        for kind in ("fsdp", "fsdp2"):
            assert got[kind].keys() == ref.keys(), kind
            for name, t in got[kind].items():
                assert torch.equal(t, ref[name]), f"{kind} rank {rank}: {name}"

    d, L = cfg.n_embd, cfg.n_layer
    small, wang = math.sqrt(2 / (5 * d)), 1 / math.sqrt(d) / L
    for name, t in ref.items():
        if "norm" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(t, torch.ones_like(t)), name
            continue
        want = wang if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else small
        assert abs(t.mean().item()) < 4 * want / math.sqrt(t.numel()) + 1e-6, name
        assert abs(t.std().item() / want - 1) < 0.1, f"{name}: std {t.std().item():.4f}, expected {want:.4f}"
    # one generator per parameter: two matrices of the same shape differ, and another seed changes them
    assert not torch.equal(ref["transformer.h.0.attn.proj.weight"], ref["transformer.h.1.attn.proj.weight"])
    other = models.build_model(cfg, device="cpu")
    models.init_model(other, cfg.n_layer, cfg.n_embd, SEED + 1)
    assert not torch.equal(other.lm_head.weight, reference.lm_head.weight)
