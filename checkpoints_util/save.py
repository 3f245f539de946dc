"""Save, find and load training checkpoints: atomic `step-XXXXXXXX/` folders under the run's out_dir.

Layout of one checkpoint (FORMAT = 1):

    step-00001000/
      trainer.json        written last; its presence marks a complete checkpoint (see below)
      config.yaml         the resolved PretrainConfig of the run that wrote it
      model_config.yaml   the litgpt.Config fields (litgpt's model_config.yaml format)
      model.pt            single device / DDP: {"model": GPT state_dict} (litgpt parameter names)
      model/              FSDP (sharded): torch.distributed.checkpoint folder of {"model": ...}
      optimizer.pt        single device / DDP: {"state_dict": optimizer.state_dict(),
                                                "param_names": [name of each index in state_dict order]}
      optimizer/          FSDP + Adam-mini: DCP folder of the state keyed by original parameter names
                          (optim/state.py: exp_avg / exp_avg_sq / step per name, hparams); loads on
                          any world size. FSDP + AdamW: the optimizer is inside model/ (Fabric's
                          sharded save, FSDP.optim_state_dict), and trainer.json says optimizer_file "model".
      rank-00000.pt ...   one per rank: {"rank", "world_size", "loader": loader.state_dict(),
                                          "rng": {"python", "numpy", "torch", "cuda"}}

trainer.json: {"format", "step", "tokens_seen", "world_size", "strategy", "precision", "optimizer",
"model_name", "model_file", "optimizer_file", "saved_at", plus whatever the trainer adds (losses, ...)}.

Atomicity: everything is written under `.tmp-step-XXXXXXXX/`; after a barrier rank 0 fsyncs the files,
writes trainer.json, and renames the folder to `step-XXXXXXXX/`. A run killed mid-save leaves only a
`.tmp-*` folder, which latest_checkpoint ignores and the next run removes at start-up (remove_partial). Multi-node runs need out_dir on a
filesystem shared by all nodes (as torch.distributed.checkpoint does).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return _STEP_RE.match(Path(path).name) is not None and (Path(path) / "trainer.json").is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (expected a step-XXXXXXXX folder with "
                              f"trainer.json)")
    return json.loads((path / "trainer.json").read_text())


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- helpers
def _is_sharded(fabric) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(Path(dirpath))


def fsync_path(path: Path) -> None:
    """Best-effort fsync of a file or folder (some filesystems refuse it on folders: ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"<unnamed {i}>") for i, p in
            enumerate(p for g in optimizer.param_groups for p in g["params"])]


def _unwrap_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _is_adam_mini(optimizer) -> bool:
    return hasattr(_unwrap_optimizer(optimizer), "units")


def _plain_module(model):
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(fabric, out_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write `out_dir/step-XXXXXXXX/` atomically on all ranks (collective: every rank must call it).

    state: {"model": Fabric module, "optimizer": Fabric optimizer, "loader": object with state_dict(),
            "trainer": JSON-able dict (must hold "tokens_seen"), "config": dict, "model_config": dict}.
    keep_last: after saving, delete all but the newest K complete checkpoints (0 = keep all).
    """
    import yaml

    out_dir = Path(out_dir)
    final = out_dir / step_dir_name(step)
    tmp = out_dir / f".tmp-{step_dir_name(step)}"
    sharded = _is_sharded(fabric)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    fabric.barrier()

    model, optimizer = state["model"], state["optimizer"]
    if sharded and _is_adam_mini(optimizer):
        # FSDP.optim_state_dict cannot hold Adam-mini's per-block v: its own name-keyed DCP writer.
        fabric.save(tmp / "model", {"model": model})
        from optim import state as optim_state

        optim_state.save_optimizer(_unwrap_optimizer(optimizer), tmp / "optimizer")
        model_file, optimizer_file = "model", "optimizer"
    elif sharded:  # AdamW: Fabric's sharded save of model + optimizer (FSDP.optim_state_dict), one DCP folder
        fabric.save(tmp / "model", {"model": model, "optimizer": optimizer})
        model_file, optimizer_file = "model", "model"
    else:
        fabric.save(tmp / "model.pt", {"model": model})
        if fabric.global_rank == 0:
            opt = _unwrap_optimizer(optimizer)
            torch.save({"state_dict": opt.state_dict(), "param_names": _param_names(_plain_module(model), opt)},
                       tmp / "optimizer.pt")
        model_file, optimizer_file = "model.pt", "optimizer.pt"

    torch.save({"rank": fabric.global_rank, "world_size": fabric.world_size,
                "loader": state["loader"].state_dict(), "rng": rng_state()},
               tmp / f"rank-{fabric.global_rank:05d}.pt")
    fabric.barrier()

    if fabric.global_rank == 0:
        (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
        (tmp / "model_config.yaml").write_text(yaml.safe_dump(state["model_config"], sort_keys=False))
        _fsync_tree(tmp)
        trainer = {"format": FORMAT, "step": step, "world_size": fabric.world_size,
                   "strategy": type(fabric.strategy).__name__, "model_file": model_file,
                   "optimizer_file": optimizer_file, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   **state["trainer"]}
        with open(tmp / "trainer.json", "w") as f:
            json.dump(trainer, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        old = out_dir / f".old-{step_dir_name(step)}"
        if final.exists():  # the same step saved again (e.g. a fresh run over an old one): replace it
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        fsync_path(out_dir)
        if old.exists():
            shutil.rmtree(old)
        if keep_last > 0:
            for stale in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    return final


def remove_partial(out_dir: str | Path) -> list[Path]:
    """Delete `.tmp-step-*` / `.old-step-*` folders left by a run killed mid-save (call on rank 0)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    gone = [p for p in out_dir.iterdir() if p.is_dir() and re.match(r"^\.(tmp|old)-step-\d{8}$", p.name)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(fabric, path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer, this rank's loader position and RNG from `path` (collective).

    state: {"model", "optimizer", "loader"} as for save_checkpoint; with "model_config" (dict), the
    checkpoint's model_config.yaml must match it field by field.

    Returns trainer.json's contents. Raises CheckpointError naming the path when something does not fit.
    """
    path = Path(path)
    trainer = read_trainer_state(path)
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{path}/trainer.json: format {trainer.get('format')!r}, this code reads {FORMAT}")
    sharded = _is_sharded(fabric)
    model, optimizer = state["model"], state["optimizer"]
    if "model_config" in state:
        import yaml

        saved = yaml.safe_load((path / "model_config.yaml").read_text())
        now = yaml.safe_load(yaml.safe_dump(state["model_config"]))
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise CheckpointError(f"{path}/model_config.yaml: the checkpoint's model differs from this run's in "
                                  + ", ".join(f"{k} ({saved.get(k)!r} vs {now.get(k)!r})" for k in diff[:5]))
    expected_model = "model" if sharded else "model.pt"
    if trainer["model_file"] != expected_model:
        raise CheckpointError(
            f"{path}: written with {trainer['strategy']} ({trainer['model_file']}), this run uses "
            f"{type(fabric.strategy).__name__} ({expected_model}); consolidate/convert it first")
    if sharded and trainer["optimizer_file"] == "model":
        if _is_adam_mini(optimizer):
            raise CheckpointError(f"{path}: holds an AdamW state, this run uses Adam-mini")
        fabric.load(path / "model", {"model": model, "optimizer": optimizer}, strict=True)
    elif sharded:
        if not _is_adam_mini(optimizer):
            raise CheckpointError(f"{path}: holds an Adam-mini state, this run uses AdamW")
        fabric.load(path / "model", {"model": model}, strict=True)
        from optim import state as optim_state

        optim_state.load_optimizer(_unwrap_optimizer(optimizer), path / "optimizer")
    else:
        fabric.load(path / "model.pt", {"model": model}, strict=True)
        saved = torch.load(path / "optimizer.pt", map_location=fabric.device, weights_only=True)
        opt = _unwrap_optimizer(optimizer)
        names = _param_names(_plain_module(model), opt)
        if saved["param_names"] != names:
            diff = next((a, b) for a, b in zip(saved["param_names"] + ["<none>"] * len(names),
                                               names + ["<none>"] * len(saved["param_names"])) if a != b)
            raise CheckpointError(f"{path}/optimizer.pt: parameters differ from this model's "
                                  f"(checkpoint {diff[0]!r} vs model {diff[1]!r})")
        opt.load_state_dict(saved["state_dict"])

    rank_file = path / f"rank-{fabric.global_rank:05d}.pt"
    if trainer["world_size"] != fabric.world_size or not rank_file.is_file():
        raise CheckpointError(
            f"{path}: written by {trainer['world_size']} ranks, this run has {fabric.world_size}; the data "
            f"position and RNG state are per rank, so an exact resume needs the same world size")
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=True)
    try:
        state["loader"].load_state_dict(per_rank["loader"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{rank_file}: the data position does not fit this run's data: {e}") from None
    set_rng_state(per_rank["rng"])
    return trainer
