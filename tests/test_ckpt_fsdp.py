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


def _small_files(path: str, out_dir: str, optimizer: str, optimizer_file: str) -> None:
    """What rank 0 of save.py writes besides the DCP folders."""
    torch.save({}, os.path.join(path, "model", "meta.pt"))  # Lightning's metadata file
    with open(os.path.join(path, "model_config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(model_config()), f, sort_keys=False)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(train_config_dict(out_dir), f, sort_keys=False)
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump({"format": 1, "step": STEP, "world_size": WORLD, "strategy": "FSDPStrategy",
                   "model_file": "model", "optimizer_file": optimizer_file, "tokens_seen": STEP * 4096,
                   "optimizer": optimizer, "precision": "32-true", "reason": "interval"}, f)


def _worker(rank: int, out_dir: str, adamw_dir: str, init_file: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from litgpt.model import Block
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, ShardedOptimStateDictConfig
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from optim.build import build_optimizer
    from optim.layout import model_layout
    from optim.state import full_state_dict, save_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    cfg = model_config()
    x = torch.randint(0, cfg.padded_vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))

    def stepped(name: str):
        """FSDP1 (use_orig_params=False, one unit per Block) + optimizer after one step on the same tokens."""
        fsdp = FSDP(random_model(), device_id=torch.device("cpu"), use_orig_params=False,
                    auto_wrap_policy=ModuleWrapPolicy({Block}))  # same seed on both ranks: same weights
        assert sum(p.numel() for p in fsdp.parameters()) < sum(p.numel() for p in random_model().parameters()) * 0.75
        opt = build_optimizer(fsdp, cfg, name, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        torch.nn.functional.cross_entropy(fsdp(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return fsdp, opt

    def full_model(fsdp):
        # offload_to_cpu=False: with a CPU compute device, offload_to_cpu=True frees the unsharded storage
        # before it is read (torch 2.13: "setStorage ... out of bounds for storage of size 0")
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            return fsdp.state_dict()

    try:
        # --- Adam-mini: model/ by Fabric's sharded save, optimizer/ by optim/state.py (save.py's layout)
        fsdp, opt = stepped("adam_mini")
        path = os.path.join(out_dir, f"step-{STEP:08d}")
        layouts = model_layout(cfg, [(n, tuple(p.shape)) for n, p in random_model().named_parameters()])
        save_optimizer(opt, os.path.join(path, "optimizer"), layouts=layouts)
        reference = full_state_dict(opt, layouts)  # gathered through collectives, not through DCP
        full = full_model(fsdp)
        if rank == 0:
            torch.save(reference, os.path.join(out_dir, "reference_optimizer.pt"))
            torch.save(full, os.path.join(out_dir, "reference_model.pt"))
        with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True)):
            sd = fsdp.state_dict()
        dcp.save({"model": sd}, checkpoint_id=os.path.join(path, "model"))
        torch.save({"rank": rank, "world_size": WORLD, "loader": {}, "rng": {}}, os.path.join(path, f"rank-{rank:05d}.pt"))
        dist.barrier()
        if rank == 0:
            _small_files(path, out_dir, "adam_mini", "optimizer")

        # --- AdamW: model and FSDP.optim_state_dict together in model/, as Fabric's sharded save does
        fsdp, opt = stepped("adamw")
        path = os.path.join(adamw_dir, f"step-{STEP:08d}")
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            full_opt = FSDP.optim_state_dict(fsdp, opt)
        if rank == 0:
            torch.save(full_opt, os.path.join(adamw_dir, "reference_optimizer.pt"))
        with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True),
                                  ShardedOptimStateDictConfig(offload_to_cpu=True)):
            sd = {"model": fsdp.state_dict(), "optimizer": FSDP.optim_state_dict(fsdp, opt)}
        dcp.save(sd, checkpoint_id=os.path.join(path, "model"))
        dist.barrier()
        if rank == 0:
            _small_files(path, adamw_dir, "adamw", "model")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out, adamw = root / "run", root / "run-adamw"
    for d in (out, adamw):
        (d / f"step-{STEP:08d}").mkdir(parents=True)
    mp.start_processes(_worker, args=(str(out), str(adamw), str(root / "init")), nprocs=WORLD, join=True,
                       start_method="spawn")
    return out / f"step-{STEP:08d}", adamw / f"step-{STEP:08d}"


@pytest.fixture(scope="module")
def fsdp_ckpt(fsdp_runs):
    return fsdp_runs[0]


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



def test_fsdp_adamw_checkpoint_optimizer_inside_model_folder(fsdp_runs, tmp_path):
    """FSDP + AdamW (save.py: optimizer_file "model"): weights and the optimizer state by name."""
    from checkpoints_util.consolidate import consolidate
    from checkpoints_util.inspect import inspect_checkpoint

    ckpt = fsdp_runs[1]
    r = inspect_checkpoint(ckpt)
    params = dict(random_model().named_parameters())
    n = sum(p.numel() for p in params.values())
    assert r["optimizer"]["kind"] == "adamw" and r["model"]["bytes"] == n * 4
    # exp_avg + exp_avg_sq per element, plus one step scalar per parameter; the weights are not counted
    assert r["optimizer"]["state_bytes"] == 2 * n * 4 + len(params) * 4
    got = torch.load(consolidate(ckpt, tmp_path / "adamw.pt", with_optimizer=True), weights_only=True)
    ref = torch.load(ckpt.parent / "reference_optimizer.pt", weights_only=True)  # FSDP's full optim state dict
    state = got["optimizer"]["state"]
    assert sorted(state) == sorted(params) == sorted(ref["state"])
    for name in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name][key], ref["state"][name][key]), (name, key)
    assert got["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert sorted(got["model"]) == sorted(params)
