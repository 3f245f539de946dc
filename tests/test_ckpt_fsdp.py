"""Real FSDP1 checkpoints (2 ranks, gloo, CPU) consolidate and export in ONE process.

The ranks take one step (Adam-mini, and AdamW) and write the checkpoint the app writes
(checkpoints_util.store.save_checkpoint with pretrain/checkpoint.py's entries: one DCP folder, tensors cut
mid-tensor across the ranks). They also write the same state in the old format 1 (model/ as Lightning's
FSDPStrategy did, optimizer/ with optim/state.py, or AdamW's FSDP.optim_state_dict inside model/), which
`amp-ckpt convert` must turn into the same thing. Rank 0 saves FSDP's own full state dicts and
optim.state's gathered state (collectives, not DCP) as references. The tools then read the checkpoints
with no process group and must give back exactly those.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from helpers.checkpoints import model_config, random_model, save_checkpoint_of, train_config_dict
from helpers.dist import spawn

WORLD = 2
STEP = 5
LOADER = {"version": 1, "batches_consumed": 3, "seed": 42, "shuffle": True, "seq_len": 256, "batch_size": 4,
          "world_size": WORLD, "num_tokens": 100_000, "split": "train"}  # format 1's per-rank loader state


def _small_files(path: str, out_dir: str, optimizer: str, optimizer_file: str) -> None:
    """What rank 0 wrote in format 1 besides the DCP folders."""
    torch.save({}, os.path.join(path, "model", "meta.pt"))  # Lightning's metadata file
    with open(os.path.join(path, "model_config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(model_config()), f, sort_keys=False)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(train_config_dict(out_dir), f, sort_keys=False)
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump({"format": 1, "step": STEP, "world_size": WORLD, "strategy": "FSDPStrategy",
                   "model_file": "model", "optimizer_file": optimizer_file, "tokens_seen": STEP * 4096,
                   "optimizer": optimizer, "precision": "32-true", "reason": "interval"}, f)


def _save_new_format(out_dir: str, fsdp, opt, optimizer: str) -> None:
    """What the trainer writes: one DCP folder of Stateful entries (collective)."""
    from pathlib import Path

    save_checkpoint_of(Path(out_dir), STEP, fsdp, opt, STEP * 4096, world_size=WORLD, strategy="fsdp",
                       optimizer_name=optimizer)


def _worker(rank: int, world: int, out_dir: str, adamw_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from litgpt.model import Block
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from optim.build import build_optimizer
    from optim.state import full_state_dict, save_optimizer
    from pretrain.step import batch_loss

    torch.set_num_threads(1)
    cfg = model_config()
    x = torch.randint(0, cfg.padded_vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))

    def stepped(name: str):
        """FSDP1 (use_orig_params=False, one unit per Block) + optimizer after one step on the same tokens."""
        fsdp = FSDP(random_model(), device_id=torch.device("cpu"), use_orig_params=False,
                    auto_wrap_policy=ModuleWrapPolicy({Block}))  # same seed on both ranks: same weights
        assert sum(p.numel() for p in fsdp.parameters()) < sum(p.numel() for p in random_model().parameters()) * 0.75
        opt = build_optimizer(fsdp, cfg, name, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        batch_loss(fsdp, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return fsdp, opt

    def full_model(fsdp):
        # offload_to_cpu=False: with a CPU compute device, offload_to_cpu=True frees the unsharded storage
        # before it is read (torch 2.13: "setStorage ... out of bounds for storage of size 0")
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            return fsdp.state_dict()

    # --- Adam-mini, format 1: model/ by Fabric's sharded save, optimizer/ by optim/state.py
    fsdp, opt = stepped("adam_mini")
    _save_new_format(out_dir + "-new", fsdp, opt, "adam_mini")
    path = os.path.join(out_dir, f"step-{STEP:08d}")
    save_optimizer(opt, os.path.join(path, "optimizer"))
    reference = full_state_dict(opt)  # gathered through collectives, not through DCP
    full = full_model(fsdp)
    if rank == 0:
        torch.save(reference, os.path.join(out_dir, "reference_optimizer.pt"))
        torch.save(full, os.path.join(out_dir, "reference_model.pt"))
    with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True)):
        sd = fsdp.state_dict()
    dcp.save({"model": sd}, checkpoint_id=os.path.join(path, "model"))
    torch.save({"rank": rank, "world_size": WORLD, "loader": LOADER, "rng": {}},
               os.path.join(path, f"rank-{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        _small_files(path, out_dir, "adam_mini", "optimizer")

    # --- AdamW: model and FSDP.optim_state_dict together in model/, as Fabric's sharded save does
    fsdp, opt = stepped("adamw")
    _save_new_format(adamw_dir + "-new", fsdp, opt, "adamw")
    path = os.path.join(adamw_dir, f"step-{STEP:08d}")
    with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                              FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        full_opt = FSDP.optim_state_dict(fsdp, opt)
    full = full_model(fsdp)
    if rank == 0:
        torch.save(full_opt, os.path.join(adamw_dir, "reference_optimizer.pt"))
        torch.save(full, os.path.join(adamw_dir, "reference_model.pt"))
    with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True),
                              ShardedOptimStateDictConfig(offload_to_cpu=True)):
        sd = {"model": fsdp.state_dict(), "optimizer": FSDP.optim_state_dict(fsdp, opt)}
    dcp.save(sd, checkpoint_id=os.path.join(path, "model"))
    torch.save({"rank": rank, "world_size": WORLD, "loader": LOADER, "rng": {}},
               os.path.join(path, f"rank-{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        _small_files(path, adamw_dir, "adamw", "model")
    dist.barrier()



@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out, adamw = root / "run", root / "run-adamw"
    for d in (out, adamw):
        (d / f"step-{STEP:08d}").mkdir(parents=True)
        Path(f"{d}-new").mkdir()
    spawn(_worker, WORLD, str(out), str(adamw))
    return out / f"step-{STEP:08d}", adamw / f"step-{STEP:08d}"


def new(old_path):
    """The app-format checkpoint written beside the format-1 one."""
    return Path(f"{old_path.parent}-new") / old_path.name


@pytest.fixture(scope="module")
def fsdp_ckpt(fsdp_runs):
    return new(fsdp_runs[0])


def assert_model_equals_reference(ckpt, refs, tmp_path) -> None:
    from checkpoints_util.__main__ import main

    out = tmp_path / "full.pth"
    assert main(["consolidate", str(ckpt), "--out", str(out), "--quiet", "--overwrite"]) == 0
    sd = torch.load(out, weights_only=True)
    ref = torch.load(refs / "reference_model.pt", weights_only=True)  # FSDP's own full state dict
    assert sorted(sd) == sorted(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    assert not torch.equal(sd["lm_head.weight"], random_model().state_dict()["lm_head.weight"])  # it stepped


def assert_adam_mini_state_equals_reference(ckpt, refs, tmp_path) -> None:
    from checkpoints_util.consolidate import consolidate

    out = consolidate(ckpt, tmp_path / "with_opt.pt", with_optimizer=True, overwrite=True)
    got = torch.load(out, weights_only=True)["optimizer"]["state"]
    ref = torch.load(refs / "reference_optimizer.pt", weights_only=True)
    params = dict(random_model().named_parameters())
    assert sorted(got) == sorted(params) == sorted(ref["exp_avg"])
    for name, p in params.items():
        assert got[name]["exp_avg"].shape == p.shape
        assert torch.equal(got[name]["exp_avg"].flatten(), ref["exp_avg"][name].flatten()), name
        assert torch.equal(got[name]["exp_avg_sq"], ref["exp_avg_sq"][name]), name
        assert float(got[name]["step"]) == float(ref["step"][name]) == 1.0
    assert any(float(v["exp_avg"].abs().sum()) > 0 for v in got.values())


def assert_adamw_state_equals_reference(ckpt, refs, tmp_path, lr: float = 1e-3) -> None:
    from checkpoints_util.consolidate import consolidate

    params = dict(random_model().named_parameters())
    got = torch.load(consolidate(ckpt, tmp_path / "adamw.pt", with_optimizer=True, overwrite=True),
                     weights_only=True)
    ref = torch.load(refs / "reference_optimizer.pt", weights_only=True)  # FSDP's full optim state dict
    state = got["optimizer"]["state"]
    assert sorted(state) == sorted(params) == sorted(ref["state"])
    for name in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name][key].reshape(ref["state"][name][key].shape).to(ref["state"][name][key]),
                               ref["state"][name][key]), (name, key)
    assert got["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)
    assert sorted(got["model"]) == sorted(params)


def test_fsdp_sharded_checkpoint_consolidates_to_the_unsharded_weights(fsdp_runs, fsdp_ckpt, tmp_path):
    from checkpoints_util.__main__ import main
    from checkpoints_util.inspect import inspect_checkpoint
    from checkpoints_util.store import read_metadata

    # one .distcp file per rank, and chunks that cut tensors (ShardedTensor metadata)
    assert len(list(fsdp_ckpt.glob("*.distcp"))) == WORLD
    md = read_metadata(fsdp_ckpt)
    assert max(len(m.chunks) for m in md.state_dict_metadata.values() if hasattr(m, "chunks")) == WORLD

    r = inspect_checkpoint(fsdp_ckpt, verify=True)
    assert (r["step"], r["world_size"], r["strategy"]) == (STEP, WORLD, "fsdp")
    refs = fsdp_runs[0].parent
    assert_model_equals_reference(fsdp_ckpt, refs, tmp_path)

    # export streams block by block from the same DCP folder
    assert main(["export", str(fsdp_ckpt), "--format", "litgpt", "--out", str(tmp_path / "lit"), "--quiet"]) == 0
    lit = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    ref = torch.load(refs / "reference_model.pt", weights_only=True)
    assert all(torch.equal(lit[k], ref[k]) for k in ref)


def test_fsdp_sharded_optimizer_consolidates_by_name(fsdp_runs, fsdp_ckpt, tmp_path):
    assert_adam_mini_state_equals_reference(fsdp_ckpt, fsdp_runs[0].parent, tmp_path)


def test_fsdp_adamw_optimizer_consolidates_by_name(fsdp_runs, tmp_path):
    """FSDP + AdamW (SegmentDecayAdamW over flat shards): the same format, the state by name."""
    from checkpoints_util.inspect import inspect_checkpoint

    ckpt = new(fsdp_runs[1])
    r = inspect_checkpoint(ckpt)
    params = dict(random_model().named_parameters())
    n = sum(p.numel() for p in params.values())
    assert r["optimizer"]["kind"] == "adamw" and r["model"]["bytes"] == n * 4
    # exp_avg + exp_avg_sq per element, plus one step scalar per parameter; the weights are not counted
    assert r["optimizer"]["state_bytes"] == 2 * n * 4 + len(params) * 4
    assert_adamw_state_equals_reference(ckpt, fsdp_runs[1].parent, tmp_path)


def test_format1_fsdp_checkpoints_convert(fsdp_runs, tmp_path):
    """The old FSDP layouts (Adam-mini: model/ + optimizer/; AdamW: FSDP's optimizer state inside model/)
    convert to the same state."""
    from checkpoints_util.__main__ import main

    # format 1 kept AdamW's hyper-parameters in a pickled object, which the converter does not unpickle: it
    # takes them from the checkpoint's config.yaml (here the default lr, 4e-4)
    adamw = functools.partial(assert_adamw_state_equals_reference, lr=4e-4)
    for old, check in zip(fsdp_runs, (assert_adam_mini_state_equals_reference, adamw)):
        refs = old.parent
        assert main(["convert", str(old), "--out", str(tmp_path / old.parent.name), "--quiet"]) == 0
        converted = tmp_path / old.parent.name / old.name
        assert_model_equals_reference(converted, refs, tmp_path)
        check(converted, refs, tmp_path)
