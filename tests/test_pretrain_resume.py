"""Resume is exact on CPU: training 2N steps == training N, stopping (checkpoint + exit, or kill -9),
resuming with --resume auto and training the rest: identical losses, weights and optimizer state."""
from __future__ import annotations

import os
import signal

import pytest

from checkpoints_util.layout import CheckpointError, latest_checkpoint, list_checkpoints
from helpers.checkpoints import assert_same_tensors, checkpoint_tensors
from helpers.runs import cli_args, logged_losses, popen_pretrain, read_until, run_pretrain, tiny_config
from pretrain.config import ConfigError
from pretrain.loop import fit


def final_state(out_dir, step):
    return checkpoint_tensors(out_dir / f"step-{step:08d}")


@pytest.mark.parametrize("optimizer", ["adam_mini", "adamw"])
def test_stop_and_resume_equals_straight_run(data_dir, tmp_path, optimizer, faults):
    straight = fit(tiny_config(data_dir, tmp_path / "straight", optimizer__name=optimizer))
    assert straight.step == 6 and sorted(straight.losses) == [1, 2, 3, 4, 5, 6]

    faults(stop_at=3)  # SIGUSR1 arrives during step 3
    first = fit(tiny_config(data_dir, tmp_path / "split", optimizer__name=optimizer))
    assert first.step == 3 and first.stopped_by == "SIGUSR1" and first.exit_code == 0
    assert latest_checkpoint(tmp_path / "split").name == "step-00000003"
    faults(stop_at=0)
    second = fit(tiny_config(data_dir, tmp_path / "split", optimizer__name=optimizer))
    assert sorted(second.losses) == [4, 5, 6]

    # Identical loss values, step by step, and identical validation losses.
    assert {**first.losses, **second.losses} == straight.losses
    assert second.val_losses[6] == straight.val_losses[6]
    # Identical weights, optimizer state, data position and step, bitwise.
    assert_same_tensors(final_state(tmp_path / "straight", 6), final_state(tmp_path / "split", 6), "checkpoint")
    # The loss actually changed (the comparison is not between two untrained models).
    assert straight.losses[6] < straight.losses[1] - 0.1


@pytest.mark.slow
def test_kill_9_between_checkpoints_then_resume_auto(data_dir, tmp_path):
    reference = fit(tiny_config(data_dir, tmp_path / "ref", train__max_steps=24))
    cfg = tiny_config(data_dir, tmp_path / "killed", train__max_steps=24)
    proc = popen_pretrain(cli_args(cfg))
    lines: list[str] = []
    try:
        assert read_until(proc, "step-00000006", lines), "".join(lines)
        assert read_until(proc, "step      7/24", lines), "".join(lines)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(tmp_path / "killed")
    assert last is not None and 6 <= int(last.name[5:]) < 24, f"killed too late: {last}"

    code, out = run_pretrain(cli_args(cfg), timeout=300)
    assert code == 0, out
    assert f"resumed from {last}" in out
    assert logged_losses(tmp_path / "killed") == reference.losses  # each step logged once, the straight run's values
    assert_same_tensors(final_state(tmp_path / "ref", 24), final_state(tmp_path / "killed", 24), "checkpoint")


def test_keep_last_partial_folders_and_resume_none(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-step-00000009").mkdir()  # what a kill during a save leaves behind
    (out / "step-00000009").mkdir()       # no trainer.json: not a complete checkpoint
    cfg = tiny_config(data_dir, out, checkpoint__interval=1, checkpoint__keep_last=2)
    result = fit(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000005", "step-00000006"]
    assert not (out / ".tmp-step-00000009").exists()
    assert result.last_checkpoint == out / "step-00000006"
    again = fit(cfg)  # resume auto at the end: nothing to do
    assert again.step == 6 and again.losses == {}
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        fit(tiny_config(data_dir, out, resume="none"))


@pytest.mark.extended
def test_ddp_two_ranks_stop_and_resume(data_dir, tmp_path):
    """CPU DDP (gloo, 2 processes): the resumed run ends bitwise equal to the straight one."""
    common = dict(system__devices=2, system__strategy="ddp", train__global_batch_tokens=256, eval__batches=1)
    outs = []
    for name, faults in (("straight", ""), ("split", "stop_at=3"), ("split", "")):
        code, out = run_pretrain(cli_args(tiny_config(data_dir, tmp_path / name, **common)), faults)
        assert code == 0, out
        outs.append(out)
    assert "ddp x 2 cpu" in outs[0] and "resumed from" in outs[2]
    assert_same_tensors(final_state(tmp_path / "straight", 6), final_state(tmp_path / "split", 6), "checkpoint")
    straight = logged_losses(tmp_path / "straight")
    assert logged_losses(tmp_path / "split") == straight and len(straight) == 6


def test_resume_refuses_a_different_model_or_data_order(data_dir, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(data_dir, out, train__max_steps=3))
    with pytest.raises(CheckpointError, match=r"model_config.yaml: .* n_layer \(2 vs 1\)"):
        fit(tiny_config(data_dir, out, train__max_steps=6, model__overrides={"n_layer": 1}))
    with pytest.raises(CheckpointError, match="data position does not fit this run's data: .*seed=7 .* 8"):
        fit(tiny_config(data_dir, out, train__max_steps=6, seed=8))
