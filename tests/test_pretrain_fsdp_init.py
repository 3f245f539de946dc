"""The FSDP path's initialisation (pretrain.strategy.fsdp_param_init_fn) with torch FSDP1 on CPU/gloo:
Lightning's FSDPStrategy refuses CPU, so this wraps the meta-device model the way FSDPStrategy does
(one unit per Block, use_orig_params=False, our param_init_fn) and checks that every tensor is
materialised, initialised like TinyLlama, and identical on all ranks (same seed, no broadcast)."""
from __future__ import annotations

import math
import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import models


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from litgpt.model import GPT, Block
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from pretrain.strategy import fsdp_param_init_fn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(42)
        cfg = models.get_config("debug")
        with torch.device("meta"):
            model = GPT(cfg)
        models.mark_residual_projections(model)
        fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=False,
                    device_id=torch.device("cpu"),
                    param_init_fn=partial(fsdp_param_init_fn, n_layer=cfg.n_layer, n_embd=cfg.n_embd))
        cfg_sd = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, cfg_sd):
            sd = {k: v.detach().clone() for k, v in fsdp.state_dict().items()}
        meta = [n for n, t in list(fsdp.named_parameters()) + list(fsdp.named_buffers()) if t.is_meta]
        torch.save({"sd": sd, "cos": fsdp.module.cos.clone(), "sin": fsdp.module.sin.clone(), "meta": meta},
                   os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still works
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_param_init_fn_matches_tinyllama_init_on_every_rank(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _port(), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world))
    assert r0["meta"] == [] and r1["meta"] == []
    cfg = models.get_config("debug")
    reference = models.build_model(cfg, device="cpu")
    assert r0["sd"].keys() == reference.state_dict().keys()
    for name, t in r0["sd"].items():
        assert torch.equal(t, r1["sd"][name]), f"{name} differs between ranks"
        assert torch.isfinite(t).all(), name
    torch.testing.assert_close(r0["cos"], reference.cos, rtol=0, atol=0)
    torch.testing.assert_close(r0["sin"], reference.sin, rtol=0, atol=0)

    d, L = cfg.n_embd, cfg.n_layer
    small, wang = math.sqrt(2 / (5 * d)), 1 / math.sqrt(d) / L
    for name, t in r0["sd"].items():
        if "norm" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(t, torch.ones_like(t)), name
            continue
        want = wang if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else small
        assert abs(t.mean().item()) < 4 * want / math.sqrt(t.numel()) + 1e-6, name
        assert abs(t.std().item() / want - 1) < 0.1, f"{name}: std {t.std().item():.4f}, expected {want:.4f}"
