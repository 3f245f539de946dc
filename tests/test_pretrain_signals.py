"""Stopping: a NaN loss stops the run without saving (the last good checkpoint stays the newest);
SIGUSR1 saves at the end of the current step and exits 0, SIGTERM likewise with exit 143."""
from __future__ import annotations

import hashlib
import os
import signal

import pytest
import torch

from checkpoints_util.layout import latest_checkpoint, list_checkpoints
from checkpoints_util.store import read_trainer
from helpers.checkpoints import checkpoint_tensors
from helpers.runs import cli_args, popen_pretrain, read_until, tiny_config, train_log
from pretrain.loop import fit
from pretrain.step import NonFiniteLossError


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_nan_loss_stops_without_saving(data_dir, tmp_path, faults):
    out = tmp_path / "run"
    fit(tiny_config(data_dir, out, train__max_steps=2, checkpoint__interval=2))  # a good checkpoint at 2
    good = out / "step-00000002"
    before = _digest(good)
    cfg = tiny_config(data_dir, out, train__max_steps=6, checkpoint__interval=1)
    faults(nan_at=4)
    with pytest.raises(NonFiniteLossError) as err:
        fit(cfg)
    msg = str(err.value)
    assert "non-finite training loss at step 4" in msg and "step-00000003" in msg
    # step 3 was good and saved; nothing after it; no partial folder; step 2 untouched
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000003"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no partial folder
    assert _digest(good) == before
    weights = checkpoint_tensors(out / "step-00000003")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the CLI reports it and exits 1
    from pretrain.__main__ import main

    assert main(cli_args(cfg)) == 1
    assert latest_checkpoint(out).name == "step-00000003"


def test_huge_learning_rate_is_caught(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", optimizer__name="adamw", optimizer__lr=1e30,
                      optimizer__min_lr=1e30, optimizer__warmup_steps=0, optimizer__grad_clip=0.0,
                      train__max_steps=20, checkpoint__interval=1)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step"):
        fit(cfg)


@pytest.mark.parametrize("signum, code", [(signal.SIGUSR1, 0), (signal.SIGTERM, 143)])
def test_signal_saves_after_current_step_and_exits(data_dir, tmp_path, signum, code):
    cfg = tiny_config(data_dir, tmp_path / "run", train__max_steps=400, checkpoint__interval=0, eval__interval=0)
    proc = popen_pretrain(cli_args(cfg))
    lines: list[str] = []
    try:
        assert read_until(proc, "step      3/400", lines), "".join(lines)
        os.kill(proc.pid, signum)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == code, out
    last = latest_checkpoint(tmp_path / "run")
    assert last is not None, out
    state = read_trainer(last)
    assert 3 <= state["step"] < 400 and state["reason"] == "signal"
    logged = [r["step"] for r in train_log(tmp_path / "run")]
    assert max(logged) == state["step"]  # saved right after the step during which the signal came
    assert f"stopped by {signal.Signals(signum).name} after step {state['step']}" in out


def test_signal_during_startup_and_a_repeated_delivery_still_save_and_exit_cleanly(data_dir, tmp_path):
    """SLURM's USR1 can arrive while the model is being set up, and srun/torchrun can deliver it twice:
    neither may kill the job (the batch script would then not requeue it) or a save in progress."""
    cfg = tiny_config(data_dir, tmp_path / "run", train__max_steps=400, checkpoint__interval=0, eval__interval=0)
    proc = popen_pretrain(cli_args(cfg))
    lines: list[str] = []
    try:
        assert read_until(proc, "starting fresh", lines), "".join(lines)  # before the first step
        os.kill(proc.pid, signal.SIGUSR1)
        # the repeat after the first was handled (identical pending signals would merge in the kernel)
        assert read_until(proc, "received SIGUSR1: will save", lines), "".join(lines)
        os.kill(proc.pid, signal.SIGUSR1)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "again: already stopping, ignored" in out
    state = read_trainer(latest_checkpoint(tmp_path / "run"))
    assert state["reason"] == "signal" and 1 <= state["step"] < 400, state
