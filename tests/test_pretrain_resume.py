"""Resume is exact on CPU: training 2N steps == training N, stopping (checkpoint + exit, or kill -9),
resuming with --resume auto and training the rest: identical losses, weights and optimizer state."""
from __future__ import annotations

import json
import os
import signal

import pytest

from checkpoints_util.save import latest_checkpoint, list_checkpoints
from pretrain.config import ConfigError
from pretrain.loop import fit
from test_pretrain_util import (assert_same_tensors, cli_args, load_tensors, popen_pretrain, prepare_small,
                                read_until, tiny_config)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_small(tmp_path_factory.getbasetemp() / "pretrain_sample")


def final_state(out_dir, step):
    d = out_dir / f"step-{step:08d}"
    return load_tensors(d / "model.pt"), load_tensors(d / "optimizer.pt")


@pytest.mark.parametrize("optimizer", ["adam_mini", "adamw"])
def test_stop_and_resume_equals_straight_run(data_dir, tmp_path, optimizer):
    straight = fit(tiny_config(data_dir, tmp_path / "straight", optimizer__name=optimizer))
    assert straight.step == 6 and sorted(straight.losses) == [1, 2, 3, 4, 5, 6]

    first = fit(tiny_config(data_dir, tmp_path / "split", optimizer__name=optimizer, debug__stop_at_step=3))
    assert first.step == 3 and first.stopped_by == "SIGUSR1" and first.exit_code == 0
    assert latest_checkpoint(tmp_path / "split").name == "step-00000003"
    second = fit(tiny_config(data_dir, tmp_path / "split", optimizer__name=optimizer))
    assert sorted(second.losses) == [4, 5, 6]

    # Identical loss values, step by step, and identical validation losses.
    assert {**first.losses, **second.losses} == straight.losses
    assert second.val_losses[6] == straight.val_losses[6]
    # Identical weights and optimizer state, bitwise.
    model_a, opt_a = final_state(tmp_path / "straight", 6)
    model_b, opt_b = final_state(tmp_path / "split", 6)
    assert_same_tensors(model_a, model_b, "model")
    assert_same_tensors(opt_a, opt_b, "optimizer")
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

    resumed = popen_pretrain(cli_args(cfg))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {last}" in out
    records = [json.loads(ln) for ln in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert losses == reference.losses  # the log holds each step once, with the straight run's values
    model_a, opt_a = final_state(tmp_path / "ref", 24)
    model_b, opt_b = final_state(tmp_path / "killed", 24)
    assert_same_tensors(model_a, model_b, "model")
    assert_same_tensors(opt_a, opt_b, "optimizer")


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


@pytest.mark.slow
def test_ddp_two_ranks_stop_and_resume(data_dir, tmp_path):
    """CPU DDP (gloo, 2 processes): per-rank loader and RNG states; the resumed run ends bitwise equal."""
    common = dict(system__devices=2, system__strategy="ddp", train__global_batch_tokens=256, eval__batches=1)
    outs = []
    for name, extra in (("straight", {}), ("split", {"debug__stop_at_step": 3}), ("split", {})):
        cfg = tiny_config(data_dir, tmp_path / name, **common, **extra)
        proc = popen_pretrain(cli_args(cfg))
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        outs.append(out)
    assert "ddp x 2 cpu" in outs[0] and "resumed from" in outs[2]
    assert sorted(p.name for p in (tmp_path / "split" / "step-00000003").glob("rank-*.pt")) == \
        ["rank-00000.pt", "rank-00001.pt"]
    model_a, opt_a = final_state(tmp_path / "straight", 6)
    model_b, opt_b = final_state(tmp_path / "split", 6)
    assert_same_tensors(model_a, model_b, "model")
    assert_same_tensors(opt_a, opt_b, "optimizer")
    log = lambda d: {r["step"]: r["loss"] for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())
                     if "loss" in r}
    assert log(tmp_path / "split") == log(tmp_path / "straight") and len(log(tmp_path / "straight")) == 6


def test_resume_refuses_a_different_model_or_data_order(data_dir, tmp_path):
    from checkpoints_util.save import CheckpointError

    out = tmp_path / "run"
    fit(tiny_config(data_dir, out, train__max_steps=3))
    with pytest.raises(CheckpointError, match=r"model_config.yaml: .* n_layer \(2 vs 1\)"):
        fit(tiny_config(data_dir, out, train__max_steps=6, model__overrides={"n_layer": 1}))
    with pytest.raises(CheckpointError, match="rank-00000.pt: the data position does not fit"):
        fit(tiny_config(data_dir, out, train__max_steps=6, seed=8))
