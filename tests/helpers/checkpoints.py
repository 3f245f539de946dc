"""Checkpoints for the tests: a `debug` model with large random weights, checkpoints of it written by the
real writer (checkpoints_util/store.py) or in the old format 1 (for the converter), and a way to read a
whole checkpoint back for bitwise comparisons.

Why large random weights: a freshly initialised model (std ~0.07) has nearly uniform attention, so a q/k
mix-up in an export would barely move the logits; with std 0.3 attention is peaked and such a bug changes
the logits by O(1) (tests/test_ckpt_export.py checks that on purpose).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

import models

CONFIG_NAME = "debug"


def model_config():
    return models.get_config(CONFIG_NAME)


def random_model(seed: int = 0):
    """`debug` GPT (GQA: 4 heads, 2 groups) with N(0, 0.3) matrices and norms around 1, in fp32."""
    from litgpt.model import GPT

    torch.manual_seed(seed)
    model = GPT(model_config())
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def trained_optimizer(model, steps: int = 2, name: str = "adam_mini"):
    """The optimizer over `model` after a few steps on random tokens, so every state tensor is non-zero."""
    from optim.build import build_optimizer
    from pretrain.step import batch_loss

    opt = build_optimizer(model, model_config(), name, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch_loss(model, torch.randint(0, model_config().padded_vocab_size, (2, 9), generator=g)).backward()
        opt.step()
        opt.zero_grad()
    return opt


def train_config_dict(out_dir, data_dir=None) -> dict:
    from pretrain.config import PretrainConfig

    cfg = PretrainConfig()
    cfg.out_dir = str(out_dir)
    cfg.model.name = CONFIG_NAME
    cfg.train.global_batch_tokens = 8 * cfg.data.seq_len  # what format 1's loader states below take: 2 ranks x 4
    if data_dir is not None:
        cfg.data.dir = str(data_dir)
    return cfg.to_dict()


DATA_POSITION = {"version": 2, "epoch": 0, "position": 5, "windows_consumed": 5, "seed": 42, "shuffle": 1,
                 "seq_len": 256, "num_tokens": 10_000}


def save_checkpoint_of(out_dir: Path, step: int, model, optimizer, tokens_seen: int, data_dir=None, world_size: int = 1,
                       strategy: str = "single", optimizer_name: str = "adam_mini") -> Path:
    """A checkpoint of `model` and `optimizer` written by the real writer (collective under torch.distributed)."""
    from checkpoints_util.store import save_checkpoint
    from optim.state import OptimizerState
    from pretrain.checkpoint import ModelState, TrainState

    state = {"model": ModelState(model), "optimizer": OptimizerState(optimizer),
             "data": {k: torch.tensor(v) for k, v in DATA_POSITION.items()},
             "trainer": TrainState(step, tokens_seen)}
    meta = {"trainer": {"tokens_seen": tokens_seen, "world_size": world_size, "strategy": strategy,
                        "precision": "32-true", "optimizer": optimizer_name, "model_name": CONFIG_NAME, "loss": 3.25,
                        "val_loss": 3.5, "reason": "interval"},
            "config": train_config_dict(out_dir, data_dir), "model_config": dataclasses.asdict(model_config())}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return save_checkpoint(Path(out_dir), step, state, meta)


def reseal(folder: Path, names: list[str]) -> None:
    """Record the current sha256 and size of the files `names` in the checkpoint's trainer.json: what a hand edit
    (or a crafted checkpoint) would do, so that the change reaches the code past the checksum check."""
    from amp_common.checksum import file_sha256

    trainer = json.loads((Path(folder) / "trainer.json").read_text())
    for name in names:
        f = Path(folder) / name
        trainer["files"][name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    (Path(folder) / "trainer.json").write_text(json.dumps(trainer, indent=2))


def code_running_pickle(module: str, name: str, arg: bytes | str, proto: int = 4, opcode: str = "STACK_GLOBAL"
                        ) -> bytes:
    """A pickle that resolves (module, name) with the GLOBAL or STACK_GLOBAL opcode and calls it with one argument:
    under protocol 4 a dotted name walks from `module` to another object (`("torch.distributed.checkpoint.
    filesystem", "os.system")` is os.system)."""
    import struct

    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b if proto >= 4 else b"X" + struct.pack("<I", len(b)) + b

    ref = (b"c" + module.encode() + b"\n" + name.encode() + b"\n" if opcode == "GLOBAL"
           else text(module) + text(name) + b"\x93")
    value = b"B" + struct.pack("<I", len(arg)) + arg if isinstance(arg, bytes) else text(arg)
    return b"\x80" + bytes([proto]) + ref + value + b"\x85R."  # TUPLE1 REDUCE STOP


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder by its flattened key (`model.lm_head.weight`, `optimizer.exp_avg.…`)."""
    from checkpoints_util.reader import load_keys
    from checkpoints_util.store import read_metadata

    meta = read_metadata(Path(path)).state_dict_metadata
    return load_keys(Path(path), {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()})


def assert_same_tensors(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))[:5]} differ"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_close_tensors(a: dict, b: dict, rtol: float, where: str = "") -> None:
    """Every tensor of `b` within `rtol` of `a`'s, relative to the largest entry of each tensor."""
    assert a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))[:5]} differ"
    for k in a:
        x, y = a[k].double(), b[k].double()
        scale = x.abs().max().item() or 1.0
        err = (x - y).abs().max().item() / scale
        assert err <= rtol, f"{where}{k}: max |diff| / max |x| = {err:.2e} > {rtol:.0e}"


def tokens(seed: int = 3, length: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model_config().padded_vocab_size, (2, length), generator=gen)


# ------------------------------------------------------------------------------------- format 1 (converter)
def _format1_common(path: Path, step: int, tokens_seen: int, world: int, model_file: str, opt_file: str,
                    strategy: str, loader: dict) -> None:
    for r in range(world):
        torch.save({"rank": r, "world_size": world, "loader": loader, "rng": {}}, path / f"rank-{r:05d}.pt")
    (path / "config.yaml").write_text(yaml.safe_dump(train_config_dict(path.parent), sort_keys=False))
    (path / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model_config()), sort_keys=False))
    trainer = {"format": 1, "step": step, "world_size": world, "strategy": strategy, "model_file": model_file,
               "optimizer_file": opt_file, "saved_at": "2026-01-01T00:00:00+0000", "tokens_seen": tokens_seen,
               "model_name": CONFIG_NAME, "optimizer": "adam_mini", "precision": "32-true", "reason": "signal"}
    (path / "trainer.json").write_text(json.dumps(trainer, indent=2))


def save_format1_plain(out_dir: Path, step: int, model, optimizer, tokens_seen: int, loader: dict) -> Path:
    """What format 1 wrote on one device: model.pt, optimizer.pt (index-keyed + names), rank-00000.pt."""
    path = Path(out_dir) / f"step-{step:08d}"
    path.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, path / "model.pt")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    torch.save({"state_dict": optimizer.state_dict(), "param_names": order}, path / "optimizer.pt")
    _format1_common(path, step, tokens_seen, 1, "model.pt", "optimizer.pt", "SingleDeviceStrategy", loader)
    return path


def save_format1_sharded(out_dir: Path, step: int, model, optimizer, tokens_seen: int, loader: dict,
                         world: int = 2) -> Path:
    """What format 1 wrote under FSDP + Adam-mini: model/ and optimizer/ DCP folders (here by one process)."""
    import torch.distributed.checkpoint as dcp

    from amp_common.quiet import quiet_checkpoint_warnings
    from optim.state import sharded_state_dict

    path = Path(out_dir) / f"step-{step:08d}"
    path.mkdir(parents=True)
    with quiet_checkpoint_warnings():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(path / "model"), no_dist=True)
        dcp.save({"optimizer": sharded_state_dict(optimizer)}, checkpoint_id=str(path / "optimizer"), no_dist=True)
    _format1_common(path, step, tokens_seen, world, "model", "optimizer", "FSDPStrategy", loader)
    return path


def state_tensors(d: dict) -> dict:
    """The model and optimizer tensors of a checkpoint (not its step counters or data position)."""
    return {k: v for k, v in d.items() if k.startswith(("model.", "optimizer.exp_avg"))}
