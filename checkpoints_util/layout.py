"""The names of a run folder's checkpoint entries, in one place.

    out_dir/
      step-00001000/        one complete checkpoint (see checkpoints_util/store.py for its contents)
      .tmp-step-00001000/   a checkpoint being written (or left by a run killed while writing it)
      .old-step-00001000/   a checkpoint of the same step being replaced
      .convert-step-00001000-*/  `amp-ckpt convert` at work in place (format1-step-00001000/ keeps the original)
      abandoned-<time>-*/   checkpoints (and log lines) newer than the step a run was resumed from
      damaged-<time>-*/     checkpoints whose files did not verify, set aside by `--resume auto`
      branch.json           which checkpoint the current branch started from (`--resume PATH`)
      .lock                 held by the running trainer
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

FORMAT = 2                  # trainer.json "format": one torch.distributed.checkpoint folder per step
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.yaml"
LOCK_FILE = ".lock"
BRANCH_FILE = "branch.json"
STEP_RE = re.compile(r"^step-(\d{8})$")
PARTIAL_RE = re.compile(r"^\.(tmp|old)-step-\d{8}$|^\.convert-step-\d{8}-")
CONVERT_RE = re.compile(r"^\.convert-(step-\d{8})-")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the run; the message names the path."""


class OldFormatError(CheckpointError):
    """A checkpoint of an earlier format: intact, but `amp-ckpt convert` must rewrite it first."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: str | Path) -> int | None:
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: str | Path) -> bool:
    """A step-XXXXXXXX folder whose trainer.json (written last) exists."""
    return step_of(path) is not None and (Path(path) / TRAINER_FILE).is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted((p for p in out_dir.iterdir() if p.is_dir() and is_complete(p)), key=step_of)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def remove_partial(out_dir: str | Path) -> list[Path]:
    """Clean up after a run killed mid-save (call on rank 0, holding the run's lock): a checkpoint killed between
    replacing `step-N` (moved to `.old-step-N`) and renaming the new one into place gets whichever is complete
    back as `step-N`; so does an in-place `amp-ckpt convert` killed between keeping the original as
    `format1-step-N` and renaming the converted one into place. Every other `.tmp-step-*` / `.old-step-*` /
    `.convert-step-*` folder is deleted. Returns what was deleted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    for old in out_dir.glob(".old-step-*"):
        final = out_dir / old.name.removeprefix(".old-")
        tmp = out_dir / f".tmp-{final.name}"
        if not final.exists():
            (tmp if (tmp / TRAINER_FILE).is_file() else old).rename(final)
    for work in out_dir.glob(".convert-step-*"):
        m = CONVERT_RE.match(work.name)
        if m and not (out_dir / m[1]).exists() and is_complete(work / m[1]):
            (work / m[1]).rename(out_dir / m[1])
    gone = [p for p in out_dir.iterdir() if p.is_dir() and PARTIAL_RE.match(p.name)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
