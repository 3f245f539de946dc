"""What a run reports: one `RunLog.log(record)` goes to train_log.jsonl, TensorBoard and the console.

A record is a dict with "step" and either the training fields ("loss", "lr", "grad_norm", "tokens_seen",
"tokens_per_s", ..., see pretrain.loop) or "val_loss". train_log.jsonl (rank 0) gets it as it is,
TensorBoard under the tags of `TB_TAGS`, the console as one line.
"""
from __future__ import annotations

import json
from pathlib import Path

from amp_common.atomic import atomic_write_text
from pretrain import metrics

LOG_NAME = "train_log.jsonl"

# record key -> (TensorBoard tag, scale)
TB_TAGS = {
    "loss": ("train/loss", 1.0), "lr": ("train/lr", 1.0), "grad_norm": ("train/grad_norm", 1.0),
    "tokens_seen": ("train/tokens_seen", 1.0), "tokens_per_s": ("perf/tokens_per_s", 1.0),
    "tokens_per_s_per_device": ("perf/tokens_per_s_per_device", 1.0), "s_per_step": ("perf/s_per_step", 1.0),
    "max_memory_bytes": ("perf/max_memory_gib", 2.0 ** -30), "optimizer_state_bytes": ("perf/optimizer_state_gib",
                                                                                     2.0 ** -30),
    "mfu": ("perf/mfu", 1.0), "val_loss": ("val/loss", 1.0),
}


def read_records(path: Path) -> tuple[list[dict], int]:
    """The JSON records of a train_log.jsonl and how many lines were damaged (skipped): a run killed
    mid-write leaves a torn last line, and one bad line must not block every later resume."""
    records, damaged = [], 0
    if not path.is_file():
        return records, damaged
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            damaged += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged += 1
    return records, damaged


def write_records(path: Path, records: list[dict]) -> None:
    """A train_log.jsonl holding `records`, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class RunLog:
    """Fans each record out to train_log.jsonl, TensorBoard (`<out_dir>/tensorboard`) and the console (rank 0)."""

    def __init__(self, fabric, out_dir: Path, total_steps: int, resumed_step: int | None, tensorboard: bool) -> None:
        self.fabric, self.total_steps = fabric, total_steps
        self.path = Path(out_dir) / LOG_NAME
        self.enabled = fabric.global_rank == 0
        self.tensorboard_dir = Path(out_dir) / "tensorboard" if tensorboard else None
        self._tb = None
        if self.enabled:
            try:
                self._start(resumed_step)
            except OSError as e:
                fabric.print(f"warning: {self.path}: cannot rewrite it for the resume ({e.strerror or e})")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # One event folder per out_dir: a resumed run continues the same curves; purge_step drops the
                # events a crashed or abandoned run wrote after the checkpoint this run resumed from.
                self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=(resumed_step or 0) + 1)

    def _start(self, resumed_step: int | None) -> None:
        """A fresh run starts an empty log; a resumed one keeps what was logged up to its checkpoint (a
        crashed attempt's later lines and damaged lines are dropped)."""
        if resumed_step is None:
            self.path.unlink(missing_ok=True)
            return
        records, damaged = read_records(self.path)
        kept = [r for r in records if r["step"] <= resumed_step]
        if damaged:
            self.fabric.print(f"{self.path}: skipped {damaged} damaged line(s)")
        if damaged or len(kept) != len(records):
            write_records(self.path, kept)

    def log(self, record: dict) -> None:
        if self.enabled and self.path is not None:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # rank 0 alone must not stop here (the others would wait for it)
                self.fabric.print(f"warning: {self.path}: cannot write ({e.strerror or e}); logging to the console "
                                  f"and TensorBoard only")
                self.path = None
        if self._tb is not None:
            for key, value in record.items():
                if key in TB_TAGS and value is not None:
                    tag, scale = TB_TAGS[key]
                    self._tb.add_scalar(tag, value * scale, global_step=record["step"])
        self.fabric.print(self._line(record))

    def _line(self, r: dict) -> str:
        head = f"step {r['step']:>6}/{self.total_steps}"
        if "val_loss" in r:
            return f"{head} | val loss {r['val_loss']:.4f} ({r.get('val_sequences', '?')} sequences)"
        world = self.fabric.world_size
        mfu = f"MFU {r['mfu']:.1%} | " if r.get("mfu") is not None else ""
        return (f"{head} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | "
                f"{metrics.human(r['tokens_per_s'])} tok/s ({metrics.human(r['tokens_per_s'] / world)}/dev) | "
                f"{mfu}{r['s_per_step']:.2f} s/step | mem {r['max_memory_bytes'] / 2**30:.2f} GiB | "
                f"ETA {'--' if r.get('eta_s') is None else metrics.duration(r['eta_s'])}")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
