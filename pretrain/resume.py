"""Which checkpoint a run continues from (`--resume auto | none | PATH`), decided the same way on every rank.

- auto: the newest checkpoint of out_dir whose files verify (sha256 against trainer.json); a damaged one
  is skipped with a line saying so, and the next older one is tried.
- PATH: that checkpoint, which must verify. Checkpoints of out_dir at or past its step belong to the run
  being abandoned: they (and its train_log.jsonl lines past the step) are moved, not deleted, to
  `out_dir/abandoned-<time>/`, so keep-last and a later `--resume auto` only see the new branch.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from checkpoints_util import store
from checkpoints_util.layout import CheckpointError, is_complete, list_checkpoints, step_of
from pretrain.config import ConfigError, PretrainConfig
from pretrain.logs import LOG_NAME, read_records


def choose(cfg: PretrainConfig, say, rank: int, barrier) -> Path | None:
    """The checkpoint to load (None: start fresh). Collective: verification is shared by the ranks."""
    out_dir = Path(cfg.out_dir)
    if cfg.resume == "none":
        existing = list_checkpoints(out_dir)
        if existing:
            raise ConfigError(f"out_dir={out_dir} already holds checkpoints (newest: {existing[-1].name}); use "
                              f"--resume auto to continue that run, or another --out_dir")
        return None
    if cfg.resume == "auto":
        return _newest_that_verifies(out_dir, say)
    path = Path(cfg.resume)
    if not is_complete(path):
        raise ConfigError(f"resume={path}: not a complete checkpoint (a step-XXXXXXXX folder with trainer.json)")
    problem = store.verify(path)
    if problem:
        raise CheckpointError(problem)
    if rank == 0:
        _move_aside_newer(out_dir, path, say)
    barrier()
    return path


def _newest_that_verifies(out_dir: Path, say) -> Path | None:
    candidates = list_checkpoints(out_dir)
    skipped = []
    for path in reversed(candidates):
        try:
            problem = store.verify(path)
        except CheckpointError as e:
            problem = str(e)
        if problem is None:
            if skipped:
                say(f"resuming from {path.name}, the newest checkpoint that verifies")
            return path
        say(f"skipping checkpoint {path.name}: {problem}")
        skipped.append(path.name)
    if skipped:
        raise CheckpointError(f"{out_dir}: no checkpoint verifies ({', '.join(skipped)}); move them away and use "
                              f"--resume none to start over, or --resume PATH")
    return None


def _move_aside_newer(out_dir: Path, start: Path, say) -> None:
    """Move the checkpoints of out_dir at or past `start`'s step (other than `start`) and the log lines past
    it into `out_dir/abandoned-<time>/`."""
    step = step_of(start)
    newer = [p for p in list_checkpoints(out_dir) if step_of(p) >= step and p.resolve() != start.resolve()]
    records, _ = read_records(out_dir / LOG_NAME)
    later = [r for r in records if r["step"] > step]
    if not newer and not later:
        return
    aside = out_dir / time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside.mkdir()
    for p in newer:
        shutil.move(str(p), str(aside / p.name))
    if later:
        (aside / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in later))
    say(f"resuming from {start} (step {step}): moved the abandoned run's newer checkpoints "
        f"({', '.join(p.name for p in newer) or 'none'}) and its {len(later)} later log lines to {aside}")
