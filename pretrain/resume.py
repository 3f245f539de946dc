"""Which checkpoint a run continues from (`--resume auto | none | PATH`), decided the same way on every rank.

- auto: the newest checkpoint of out_dir whose files verify (sha256 against trainer.json). A damaged one is
  moved to `out_dir/damaged-<time>/` (not deleted) with a line saying so, and the next older one is tried.
- PATH: that checkpoint, which must verify. Checkpoints of out_dir at or past its step belong to the run
  being abandoned: they (and its train_log.jsonl lines past the step) are moved, not deleted, to
  `out_dir/abandoned-<time>/`, and `out_dir/branch.json` records the branch; every save of the branch
  records its newest checkpoint there too (`follow_branch`). Running the same command again (a requeue, a
  crash) then continues the branch like auto instead of branching again from PATH, also after keep-last
  deleted PATH; to branch from PATH once more, delete branch.json.
`choose` only decides (and verifies); `settle` makes the moves once the checkpoint has loaded into this
run's model, optimizer and data: a refused resume (a model, optimizer or data that does not fit) changes
nothing on disk. Rank 0 moves files; its problems reach every rank (broadcast), so no rank waits for one
that failed.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from amp_common import exits
from amp_common.atomic import WriteError, atomic_write_json
from checkpoints_util import store
from checkpoints_util.layout import BRANCH_FILE, CheckpointError, OldFormatError, is_complete, list_checkpoints, step_of
from pretrain.config import ConfigError, PretrainConfig
from pretrain.logs import LOG_NAME, read_records, write_records


@dataclass
class Choice:
    """What `choose` decided; nothing is moved until `settle`."""
    path: Path | None                                     # the checkpoint to load; None: start fresh
    damaged: list[Path] = field(default_factory=list)     # newer checkpoints that failed to verify: set aside
    branch: bool = False                                  # `path` is an older checkpoint: branch from it


def choose(cfg: PretrainConfig, fabric) -> Choice:
    """The checkpoint to load (path None: start fresh). Collective: verification is shared by the ranks.
    Changes nothing on disk (see `settle`)."""
    out_dir = Path(cfg.out_dir)
    if cfg.resume == "none":
        existing = list_checkpoints(out_dir)
        if existing:
            raise ConfigError(f"out_dir={out_dir} already holds checkpoints (newest: {existing[-1].name}); use "
                              f"--resume auto to continue that run, or another --out_dir")
        return Choice(None)
    if cfg.resume == "auto":
        return Choice(*_newest_that_verifies(out_dir, fabric))
    path = Path(cfg.resume)
    branch = _read_branch(out_dir)
    if branch.get("from") == str(path.resolve()):  # a requeue of the branch (PATH itself may be pruned by now)
        newest, damaged = _newest_that_verifies(out_dir, fabric)
        if newest is not None and step_of(newest) >= branch["step"]:
            fabric.print(f"continuing the branch started from {path} ({out_dir / BRANCH_FILE}): {newest.name}")
            return Choice(newest, damaged)
    if not is_complete(path):
        raise ConfigError(f"resume={path}: not a complete checkpoint (a step-XXXXXXXX folder with trainer.json)")
    problem = store.verify(path)
    if problem:
        raise CheckpointError(problem)
    return Choice(path, branch=True)


def settle(choice: Choice, cfg: PretrainConfig, fabric) -> None:
    """After the chosen checkpoint loaded: set the damaged checkpoints aside, or branch (collective)."""
    out_dir = Path(cfg.out_dir)
    if choice.damaged:
        _on_rank0(fabric, lambda: fabric.print(f"moved the damaged checkpoints to "
                                               f"{_set_aside(out_dir, 'damaged', choice.damaged)}"))
    if choice.branch:
        _on_rank0(fabric, lambda: _branch(out_dir, choice.path, fabric.print))


def follow_branch(out_dir: Path, newest: Path) -> None:
    """Record `newest` (just saved) as the branch's newest checkpoint in branch.json, if out_dir is on a branch
    (rank 0, atomic)."""
    branch = _read_branch(out_dir)
    if branch and branch.get("newest") != newest.name:
        try:
            atomic_write_json(out_dir / BRANCH_FILE, {**branch, "newest": newest.name}, indent=None)
        except (OSError, WriteError) as e:  # the checkpoint is saved; a requeue finds it without this record
            print(f"warning: could not record {newest.name} in {out_dir / BRANCH_FILE} ({e})", flush=True)


def _on_rank0(fabric, work) -> None:
    """Run `work` on rank 0; every rank raises if it failed (one line), none waits for a failed rank 0."""
    problem = None
    if fabric.global_rank == 0:
        try:
            work()
        except OSError as e:
            problem = exits.os_error_line(e)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise CheckpointError(f"could not set the run folder up for the resume: {problem}")


def _newest_that_verifies(out_dir: Path, fabric) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint of out_dir whose files verify, and the newer ones that did not (moved by `settle`)."""
    damaged = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            problem = store.verify(path)
        except OldFormatError:
            raise  # not damaged: it needs `amp-ckpt convert`
        except CheckpointError as e:
            problem = str(e)
        if problem is None:
            if damaged:
                fabric.print(f"resuming from {path.name}, the newest checkpoint that verifies")
            return path, damaged
        fabric.print(f"skipping checkpoint {path.name}: {problem}")
        damaged.append(path)
    if damaged:
        raise CheckpointError(f"{out_dir}: no checkpoint verifies ({', '.join(p.name for p in damaged)}); move them "
                              f"away and use --resume none to start over, or --resume PATH")
    return None, []


def _set_aside(out_dir: Path, kind: str, paths: list[Path]) -> Path:
    """Move `paths` into a new `out_dir/<kind>-<time>-XXXX/` folder; returns it."""
    aside = Path(tempfile.mkdtemp(prefix=time.strftime(f"{kind}-%Y%m%d-%H%M%S-"), dir=out_dir))
    for p in paths:
        shutil.move(str(p), str(aside / p.name))
    return aside


def _branch(out_dir: Path, start: Path, say) -> None:
    """Move the checkpoints of out_dir at or past `start`'s step (other than `start`) and the log lines past
    it into `out_dir/abandoned-<time>/`; record the branch in branch.json."""
    step = step_of(start)
    newer = [p for p in list_checkpoints(out_dir) if step_of(p) >= step and p.resolve() != start.resolve()]
    records, _ = read_records(out_dir / LOG_NAME)
    later = [r for r in records if r["step"] > step]
    if newer or later:
        aside = _set_aside(out_dir, "abandoned", newer)
        if later:
            write_records(aside / LOG_NAME, later)
        say(f"resuming from {start} (step {step}): moved the abandoned run's newer checkpoints "
            f"({', '.join(p.name for p in newer) or 'none'}) and its {len(later)} later log lines to {aside}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / BRANCH_FILE, {"from": str(start.resolve()), "step": step, "newest": start.name,
                                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=None)


def _read_branch(out_dir: Path) -> dict:
    try:
        branch = json.loads((out_dir / BRANCH_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return branch if isinstance(branch, dict) and isinstance(branch.get("step"), int) else {}
