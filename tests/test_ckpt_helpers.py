"""Helpers shared by tests/test_ckpt_*.py: a `debug` model with large random weights and checkpoints of
it in both layouts that `checkpoints_util.save` writes. (Collected by pytest but holds no tests.)

Why large random weights: a freshly initialised model (std ~0.07) has nearly uniform attention, so a
q/k mix-up in an export would barely move the logits; with std 0.3 attention is peaked and such a
bug changes the logits by O(1) (tests/test_ckpt_export.py checks that on purpose).
"""
from __future__ import annotations

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
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def trained_optimizer(model, steps: int = 2):
    """Adam-mini over `model` after a few steps on random tokens, so every state tensor is non-zero."""
    from optim.build import build_optimizer

    opt = build_optimizer(model, model_config(), "adam_mini", lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, model_config().padded_vocab_size, (2, 9), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


class _Loader:
    def state_dict(self):
        return {"epoch": 0, "position": 5}


def train_config_dict(out_dir, data_dir=None) -> dict:
    from pretrain.config import PretrainConfig

    cfg = PretrainConfig()
    cfg.out_dir = str(out_dir)
    cfg.model.name = CONFIG_NAME
    if data_dir is not None:
        cfg.data.dir = str(data_dir)
    return cfg.to_dict()


def save_plain(out_dir: Path, step: int, model, optimizer, tokens_seen: int, data_dir=None) -> Path:
    """A single-device checkpoint written by the real writer (`checkpoints_util.save.save_checkpoint`)."""
    import dataclasses

    import lightning as L

    from checkpoints_util.save import save_checkpoint

    fabric = L.Fabric(accelerator="cpu", devices=1)
    state = {"model": model, "optimizer": optimizer, "loader": _Loader(),
             "trainer": {"tokens_seen": tokens_seen, "model_name": CONFIG_NAME, "optimizer": "adam_mini",
                         "precision": "32-true", "loss": 3.25, "val_loss": 3.5, "reason": "interval"},
             "config": train_config_dict(out_dir, data_dir), "model_config": dataclasses.asdict(model_config())}
    return save_checkpoint(fabric, out_dir, step, state)


def save_sharded_single_process(out_dir: Path, step: int, model, optimizer, tokens_seen: int,
                                world_size: int = 1) -> Path:
    """The FSDP layout of save.py (model/ and optimizer/ as torch.distributed.checkpoint folders), written
    by one process with `dcp.save` (plain tensors instead of ShardedTensors: DCP stores both alike)."""
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from optim.state import save_optimizer

    path = Path(out_dir) / f"step-{step:08d}"
    path.mkdir(parents=True)
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(path / "model"), no_dist=True)
    if optimizer is not None:
        from optim.layout import model_layout

        layouts = model_layout(model_config(), [(n, tuple(p.shape)) for n, p in model.named_parameters()])
        save_optimizer(optimizer, path / "optimizer", layouts=layouts)
    for r in range(world_size):
        torch.save({"rank": r, "world_size": world_size, "loader": _Loader().state_dict(), "rng": {}},
                   path / f"rank-{r:05d}.pt")
    (path / "config.yaml").write_text(yaml.safe_dump(train_config_dict(out_dir), sort_keys=False))
    (path / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model_config()), sort_keys=False))
    trainer = {"format": 1, "step": step, "world_size": world_size, "strategy": "FSDPStrategy",
               "model_file": "model", "optimizer_file": "optimizer" if optimizer is not None else None,
               "saved_at": "2026-01-01T00:00:00+0000", "tokens_seen": tokens_seen, "model_name": CONFIG_NAME,
               "optimizer": "adam_mini", "precision": "bf16-mixed", "reason": "signal"}
    (path / "trainer.json").write_text(json.dumps(trainer, indent=2))
    return path


def logits(model, seed: int = 3, length: int = 40) -> torch.Tensor:
    x = torch.randint(0, model_config().padded_vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def tokens(seed: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, model_config().padded_vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
