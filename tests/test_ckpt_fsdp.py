"""A real FSDP1 sharded checkpoint (2 ranks, gloo, CPU) consolidates and exports in ONE process.

The ranks take one Adam-mini step, then write `model/` as Lightning's FSDPStrategy does
(SHARDED_STATE_DICT, ShardedTensor chunks cut mid-tensor, `dcp.save`, plus rank 0's `meta.pt`) and
`optimizer/` with optim/state.py (as checkpoints_util/save.py does). Rank 0 also saves FSDP's own full
state dict and optim.state's gathered state (collectives, not DCP) as references. The tools then read
the checkpoint with no process group and must give back exactly those.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from test_ckpt_helpers import model_config, random_model, train_config_dict

WORLD = 2
STEP = 5


def _worker(rank: int, out_dir: str, init_file: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from litgpt.model import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = random_model()  # same seed on both ranks: identical weights before sharding
        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False,
                    auto_wrap_policy=ModuleWrapPolicy({Block}))
        # the shards really are partial: each rank holds about half of every unit
        local = sum(p.numel() for p in fsdp.parameters())
        assert local < sum(p.numel() for p in random_model().parameters()) * 0.75
        # Adam-mini on the FlatParameter shards, one step on the same tokens on both ranks
        from optim.build import build_optimizer
        from optim.layout import model_layout
        from optim.state import full_state_dict, save_optimizer

        cfg = model_config()
        layouts = model_layout(cfg, [(n, tuple(p.shape)) for n, p in random_model().named_parameters()])
        opt = build_optimizer(fsdp, cfg, "adam_mini", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        x = torch.randint(0, cfg.padded_vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
        loss = torch.nn.functional.cross_entropy(fsdp(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        path = os.path.join(out_dir, f"step-{STEP:08d}")
        save_optimizer(opt, os.path.join(path, "optimizer"), layouts=layouts)
        reference = full_state_dict(opt, layouts)  # gathered through collectives, not through DCP
        from torch.distributed.fsdp import FullStateDictConfig

        # offload_to_cpu=False: with a CPU compute device, offload_to_cpu=True frees the unsharded storage
        # before it is read (torch 2.13: "setStorage ... out of bounds for storage of size 0")
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False,
                                                                                          rank0_only=True)):
            full_model = fsdp.state_dict()
        if rank == 0:
            torch.save(reference, os.path.join(out_dir, "reference_optimizer.pt"))
            torch.save(full_model, os.path.join(out_dir, "reference_model.pt"))
        with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True)):
            sd = fsdp.state_dict()
        dcp.save({"model": sd}, checkpoint_id=os.path.join(path, "model"))
        torch.save({"rank": rank, "world_size": WORLD, "loader": {}, "rng": {}}, os.path.join(path, f"rank-{rank:05d}.pt"))
        dist.barrier()
        if rank == 0:
            torch.save({}, os.path.join(path, "model", "meta.pt"))  # Lightning's metadata file
            with open(os.path.join(path, "model_config.yaml"), "w") as f:
                yaml.safe_dump(dataclasses.asdict(model_config()), f, sort_keys=False)
            with open(os.path.join(path, "config.yaml"), "w") as f:
                yaml.safe_dump(train_config_dict(out_dir), f, sort_keys=False)
            with open(os.path.join(path, "trainer.json"), "w") as f:
                json.dump({"format": 1, "step": STEP, "world_size": WORLD, "strategy": "FSDPStrategy",
                           "model_file": "model", "optimizer_file": "optimizer", "tokens_seen": STEP * 4096,
                           "optimizer": "adam_mini", "precision": "32-true", "reason": "interval"}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = root / "run"
    (out / f"step-{STEP:08d}").mkdir(parents=True)
    mp.start_processes(_worker, args=(str(out), str(root / "init")), nprocs=WORLD, join=True, start_method="spawn")
    return out / f"step-{STEP:08d}"


def test_fsdp_sharded_checkpoint_consolidates_to_the_unsharded_weights(fsdp_ckpt, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from checkpoints_util.__main__ import main
    from checkpoints_util.inspect import inspect_checkpoint

    # one .distcp file per rank, and chunks that cut tensors (ShardedTensor metadata)
    assert len(list((fsdp_ckpt / "model").glob("*.distcp"))) == WORLD
    md = FileSystemReader(str(fsdp_ckpt / "model")).read_metadata()
    assert max(len(m.chunks) for m in md.state_dict_metadata.values() if hasattr(m, "chunks")) == WORLD

    r = inspect_checkpoint(fsdp_ckpt)
    assert (r["step"], r["world_size"], r["sharded"]) == (STEP, WORLD, True)

    out = tmp_path / "full.pth"
    assert main(["consolidate", str(fsdp_ckpt), "--out", str(out), "--quiet"]) == 0
    sd = torch.load(out, weights_only=True)
    ref = torch.load(fsdp_ckpt.parent / "reference_model.pt", weights_only=True)  # FSDP's own full state dict
    assert sorted(sd) == sorted(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    assert not torch.equal(sd["lm_head.weight"], random_model().state_dict()["lm_head.weight"])  # it stepped

    # export streams block by block from the same DCP folder
    assert main(["export", str(fsdp_ckpt), "--format", "litgpt", "--out", str(tmp_path / "lit"), "--quiet"]) == 0
    lit = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    assert all(torch.equal(lit[k], ref[k]) for k in ref)


def test_fsdp_sharded_optimizer_consolidates_by_name(fsdp_ckpt, tmp_path):
    from checkpoints_util.consolidate import consolidate

    out = consolidate(fsdp_ckpt, tmp_path / "with_opt.pt", with_optimizer=True)
    got = torch.load(out, weights_only=True)["optimizer"]["state"]
    ref = torch.load(fsdp_ckpt.parent / "reference_optimizer.pt", weights_only=True)
    params = dict(random_model().named_parameters())
    assert sorted(got) == sorted(params) == sorted(ref["exp_avg"])
    for name, p in params.items():
        assert got[name]["exp_avg"].shape == p.shape
        assert torch.equal(got[name]["exp_avg"].flatten(), ref["exp_avg"][name].flatten()), name
        assert torch.equal(got[name]["exp_avg_sq"], ref["exp_avg_sq"][name]), name
        assert float(got[name]["step"]) == float(ref["step"][name]) == 1.0
    assert any(float(v["exp_avg"].abs().sum()) > 0 for v in got.values())

