"""Faults injected from tests, never from the product: a real signal after a given step, a NaN loss at one.

`install(stop_at=..., nan_at=..., signum=..., no_block_allreduce=...)` wraps `pretrain.loop._one_step`;
in-process tests call it through the `faults` fixture (tests/conftest.py, undone after the test),
multi-process runs through `tests/helpers/fault_run.py`, which reads `AMP_TEST_FAULTS` (e.g.
"stop_at=3,nan_at=5") in every rank, and `AMP_TEST_RECORD` (a folder: each rank appends the sha1 of every
row of every training micro-batch it takes, one line per micro-batch, to `rank<r>.txt`).
`no_block_allreduce=1` is the negative control of the sharded Adam-mini: each rank takes v from its own
piece of a block (the all-reduce of the block sums becomes a no-op).
"""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

PG_LEFT = "process group left initialised at exit"  # printed by fault_run.py


def install(setattr_, stop_at: int = 0, nan_at: int = 0, signum: int = signal.SIGUSR1,
            no_block_allreduce: int = 0, hang_in_save: int = 0, interrupt_in_save: int = 0) -> None:
    """`setattr_` is monkeypatch.setattr (or plain setattr): how the wrappers are put in place.

    `hang_in_save=S`: rank 0 prints "publishing step S" and sleeps before it renames the finished checkpoint of
    step S into place (a kill -9 then hits a save in progress).
    `interrupt_in_save=S`: every rank sends itself SIGINT (Ctrl-C) while DCP writes its files of step S."""
    from pretrain import loop, step

    if hang_in_save:
        import time

        from checkpoints_util import store

        real_publish = store._publish

        def publish(tmp, final):
            if final.name == f"step-{hang_in_save:08d}":
                print(f"publishing step {hang_in_save}", flush=True)
                time.sleep(600)
            return real_publish(tmp, final)

        setattr_(store, "_publish", publish)

    if interrupt_in_save:
        from torch.distributed.checkpoint import FileSystemWriter

        real_write = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            if Path(str(self.path)).name == f".tmp-step-{interrupt_in_save:08d}":
                os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next bytecode
            return real_write(self, plan, planner)

        setattr_(FileSystemWriter, "write_data", write_data)

    if no_block_allreduce:
        import types

        from optim import eager

        setattr_(eager, "dist", types.SimpleNamespace(all_reduce=lambda *a, **k: None, ReduceOp=eager.dist.ReduceOp))

    real_one_step, real_loss = loop._one_step, step.batch_loss

    def nan_loss(model, batch):
        return real_loss(model, batch) * math.nan

    def one_step(run, thr):
        if nan_at and run.state.step + 1 == nan_at:
            setattr_(step, "batch_loss", nan_loss)
        try:
            out = real_one_step(run, thr)
        finally:
            setattr_(step, "batch_loss", real_loss)
        if stop_at and run.state.step == stop_at:
            os.kill(os.getpid(), signum)  # the real signal: the handler records it, the loop saves and stops
        return out

    setattr_(loop, "_one_step", one_step)


def from_env(value: str) -> dict:
    """"stop_at=3,nan_at=5,signum=15" -> install()'s keyword arguments."""
    return {k: int(v) for k, v in (item.split("=") for item in value.split(",") if item)}


def record_batches(folder: str) -> None:
    """Append the sha1 of each row of every training micro-batch to `<folder>/rank<r>.txt` (one line each)."""
    import hashlib
    from pathlib import Path

    import torch.distributed as dist

    from pretrain.batches import BatchStream

    real = BatchStream.next

    def next_(self):
        batch = real(self)
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(Path(folder) / f"rank{rank}.txt", "a") as f:
            f.write(" ".join(hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch) + "\n")
        return batch

    BatchStream.next = next_


def recorded_steps(folder, micro_per_step: int, world: int) -> list[list[str]]:
    """The rows of each optimizer step (all ranks together, sorted) from what `record_batches` wrote."""
    from pathlib import Path

    lines = [(Path(folder) / f"rank{r}.txt").read_text().split("\n")[:-1] for r in range(world)]
    n = len(lines[0]) // micro_per_step
    assert all(len(x) == n * micro_per_step for x in lines), [len(x) for x in lines]
    return [sorted(h for x in lines for ln in x[s * micro_per_step:(s + 1) * micro_per_step] for h in ln.split())
            for s in range(n)]
