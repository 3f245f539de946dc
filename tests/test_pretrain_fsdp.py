"""The app's own FSDP path on CPU (Fabric's FSDPStrategy through pretrain/cpu_fsdp.py, gloo), end to end:

- N steps under FSDP on 2 and on 3 ranks equal the same N steps on one device with the same global
  batches (loss curve and final weights and optimizer state <= 1e-5 relative), for a model whose Adam-mini
  blocks straddle ranks (asserted); the negative control (v from each rank's own piece of a block) fails;
- a run stopped by SIGUSR1 under FSDP resumes bitwise on 2 ranks, and continues on 3 ranks, on one device
  and under DDP with the same global batches: no training window is repeated or skipped (every row of
  every step is recorded), the loss curve equals the uninterrupted run's within 1e-5.
"""
from __future__ import annotations

import pytest

from checkpoints_util.layout import latest_checkpoint
from helpers.checkpoints import assert_close_tensors, assert_same_tensors, checkpoint_tensors, state_tensors
from helpers.faults import PG_LEFT, recorded_steps
from helpers.runs import assert_losses_close, cli_args, logged_losses, run_pretrain, tiny_config
from helpers.sharding import cut_blocks
from pretrain.loop import fit

STEPS, GLOBAL_ROWS, MICRO = 8, 12, 2
OVERRIDES = {"intermediate_size": 20}  # W=3 cuts Q/K heads and MLP rows, W=2 a token row (asserted below)
RTOL = 1e-5


def config(data_dir, out_dir, world: int, strategy: str = "fsdp", **extra):
    values = dict(model__overrides=OVERRIDES, train__max_steps=STEPS, train__global_batch_tokens=GLOBAL_ROWS * 32,
                  train__micro_batch_size=MICRO, checkpoint__interval=4, eval__interval=4, eval__batches=3,
                  system__strategy=strategy if world > 1 else "single", system__devices=world)
    return tiny_config(data_dir, out_dir, **{**values, **extra})


def launch(cfg, faults: str = "", record=None) -> str:
    code, out = run_pretrain(cli_args(cfg), faults, record)
    assert code == 0, out
    if faults or record:  # through fault_run.py: every rank tore its process group down before exit
        assert PG_LEFT not in out, out
    return out


def final(out_dir, step=STEPS) -> dict:
    return checkpoint_tensors(out_dir / f"step-{step:08d}")


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    fit(config(data_dir, out, 1))
    return out


@pytest.fixture(scope="module")
def fsdp2ranks(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2ranks")
    (root / "rows").mkdir()
    out = launch(config(data_dir, root / "run", 2), record=root / "rows")
    assert "fsdp x 2 cpu" in out
    return root


def test_blocks_straddle_ranks():
    import models

    c = models.get_config("debug", **OVERRIDES)
    assert {k for v in cut_blocks(c, 2, "fsdp").values() for k in v} == {"tokens"}
    assert {"qkv", "rows"} <= {k for v in cut_blocks(c, 3, "fsdp").values() for k in v}


@pytest.mark.slow
def test_fsdp_on_2_and_3_ranks_equals_one_device(data_dir, tmp_path, single, fsdp2ranks):
    three = tmp_path / "three"
    launch(config(data_dir, three, 3))
    reference = logged_losses(single)
    assert sorted(reference) == list(range(1, STEPS + 1)) and reference[STEPS] < reference[1] - 0.1
    for run in (fsdp2ranks / "run", three):
        assert_losses_close(reference, logged_losses(run), range(1, STEPS + 1))
        assert_close_tensors(state_tensors(final(single)), state_tensors(final(run)), RTOL, f"{run.name}: ")

    # negative control: v from each rank's own piece of a cut block, not the whole block
    wrong = tmp_path / "wrong"
    launch(config(data_dir, wrong, 3), faults="no_block_allreduce=1")
    with pytest.raises(AssertionError):
        assert_close_tensors(state_tensors(final(single)), state_tensors(final(wrong)), RTOL)


@pytest.mark.slow
def test_stop_under_fsdp_resumes_bitwise_and_on_other_world_sizes(data_dir, tmp_path, single, fsdp2ranks):
    straight = fsdp2ranks / "run"
    stopped = tmp_path / "stopped"
    out = launch(config(data_dir, stopped, 2), faults="stop_at=4")
    assert "stopped by SIGUSR1 after step 4" in out and latest_checkpoint(stopped).name == "step-00000004"
    reference_rows = recorded_steps(fsdp2ranks / "rows", micro_per_step=GLOBAL_ROWS // (2 * MICRO), world=2)
    assert len(reference_rows) == STEPS and all(len(r) == GLOBAL_ROWS for r in reference_rows)

    for world, strategy in ((2, "fsdp"), (3, "fsdp"), (1, "single"), (2, "ddp")):
        run = tmp_path / f"{strategy}{world}"
        run.mkdir()
        rows = tmp_path / f"rows-{strategy}{world}"
        rows.mkdir()
        cfg = config(data_dir, run, world, strategy, resume=str(stopped / "step-00000004"))
        out = launch(cfg, record=rows)
        assert f"resumed from {stopped / 'step-00000004'} at step 4" in out
        # the same windows in every step after the resume: none repeated, none skipped
        assert recorded_steps(rows, GLOBAL_ROWS // (world * MICRO), world) == reference_rows[4:], strategy
        assert_losses_close(logged_losses(straight), logged_losses(run), range(5, STEPS + 1))
        if (world, strategy) == (2, "fsdp"):  # the same world size: bitwise
            assert_same_tensors(final(straight), final(run), "checkpoint")
        else:
            assert_close_tensors(state_tensors(final(straight)), state_tensors(final(run)), RTOL,
                                 f"{strategy}{world}: ")


def test_fsdp2_shards_cut_blocks():
    import models

    c = models.get_config("debug", **OVERRIDES)
    assert {k for v in cut_blocks(c, 2, "fsdp2").values() for k in v} == {"whole"}   # norms split in half
    assert "qkv" in {k for v in cut_blocks(c, 3, "fsdp2").values() for k in v}      # a Q/K head cut


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, pytest.param(2, marks=pytest.mark.extended)])
def test_fsdp2_equals_one_device(world, data_dir, tmp_path, single):
    """FSDP2 on 3 ranks (Q/K heads cut: test_fsdp2_shards_cut_blocks) and 2 equals one device; on 3 ranks a run
    stopped by SIGUSR1 also resumes bitwise."""
    reference = logged_losses(single)
    run = tmp_path / f"fsdp2-{world}"
    out = launch(config(data_dir, run, world, "fsdp2"))
    assert f"fsdp2 x {world} cpu" in out
    assert_losses_close(reference, logged_losses(run), range(1, STEPS + 1))
    assert_close_tensors(state_tensors(final(single)), state_tensors(final(run)), RTOL, f"fsdp2 x {world}: ")
    if world == 3:
        split = tmp_path / "split"
        assert "stopped by SIGUSR1 after step 3" in launch(config(data_dir, split, 3, "fsdp2"), faults="stop_at=3")
        assert "resumed from" in launch(config(data_dir, split, 3, "fsdp2"))
        assert_same_tensors(final(run), final(split), "checkpoint")


@pytest.mark.slow
def test_compiled_blocks_match_eager_under_fsdp(data_dir, tmp_path):
    """system.compile: every Block compiled, under FSDP on 2 ranks, with activation checkpointing: 20 steps
    within 1e-4 of the eager run (compiled kernels round differently)."""
    runs = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        out = launch(config(data_dir, run, 2, train__max_steps=20, checkpoint__interval=0, eval__interval=0,
                            system__compile=compiled, system__activation_checkpointing=True))
        assert ("compiled, activation checkpointing" in out) == compiled
        runs[compiled] = logged_losses(run)
    assert sorted(runs[True]) == list(range(1, 21))
    assert_losses_close(runs[False], runs[True], runs[False], rtol=1e-4)


# ------------------------------------------------------------------------------ extended (not in the default run)
def _kill_all(proc, signum) -> None:
    """Signal every rank: Fabric's launcher makes the other ranks children in the run's process group."""
    import os

    os.killpg(proc.pid, signum)


@pytest.mark.extended
@pytest.mark.parametrize("fault", ["kill_mid_step", "kill_mid_save", "sigterm"])
def test_fsdp_run_survives_kill_9_and_sigterm_bitwise(fault, data_dir, tmp_path, fsdp2ranks):
    """Under FSDP on 2 ranks: kill -9 between checkpoints, kill -9 while a checkpoint is being written, and
    SIGTERM (save, exit 143): `--resume auto` ends bitwise where the uninterrupted run ends."""
    import signal

    from helpers.runs import popen_pretrain, read_until

    run = tmp_path / "run"
    cfg = config(data_dir, run, 2)
    faults = "hang_in_save=8" if fault == "kill_mid_save" else ""
    proc = popen_pretrain(cli_args(cfg), faults)
    lines: list[str] = []
    try:
        if fault == "kill_mid_step":
            assert read_until(proc, "step      6/8", lines), "".join(lines)
            _kill_all(proc, signal.SIGKILL)
        elif fault == "kill_mid_save":
            assert read_until(proc, "publishing step 8", lines), "".join(lines)
            _kill_all(proc, signal.SIGKILL)
        else:
            assert read_until(proc, "step      5/8", lines), "".join(lines)
            _kill_all(proc, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    if fault == "sigterm":
        assert proc.returncode == 143, "".join(lines)
    else:
        assert proc.returncode == -signal.SIGKILL
        assert latest_checkpoint(run).name == "step-00000004"  # the save of step 8 never completed
    out = launch(cfg)
    assert "resumed from" in out
    assert_same_tensors(final(fsdp2ranks / "run"), final(run), "checkpoint")
    assert logged_losses(run) == logged_losses(fsdp2ranks / "run")


@pytest.mark.extended
def test_fsdp_nan_stop_and_accumulation(data_dir, tmp_path, single):
    """A NaN loss under FSDP stops every rank with exit 1 and saves nothing after the last good checkpoint;
    6 micro-batches of 1 per rank equal 1 micro-batch of 6 (gradient accumulation under FSDP)."""
    code, out = run_pretrain(cli_args(config(data_dir, tmp_path / "nan", 2)), faults="nan_at=6")
    assert code == 1 and "non-finite training loss at step 6" in out, out
    assert latest_checkpoint(tmp_path / "nan").name == "step-00000004"
    losses = {}
    for micro in (1, 6):
        run = tmp_path / f"micro{micro}"
        launch(config(data_dir, run, 2, train__micro_batch_size=micro))
        losses[micro] = logged_losses(run)
    assert_losses_close(losses[6], losses[1], range(1, STEPS + 1), rtol=2e-5)


@pytest.mark.extended
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_adamw_under_fsdp_resumes_on_one_device(strategy, data_dir, tmp_path):
    """The AdamW baseline under FSDP1 (flat shards, decay per original parameter) and FSDP2 (DTensors): its
    state is saved by parameter name like Adam-mini's, and a run stopped on 2 ranks continues on one device
    within 1e-5 of the uninterrupted one-device run."""
    reference = tmp_path / "one"
    fit(config(data_dir, reference, 1, optimizer__name="adamw"))
    split = tmp_path / "split"
    assert "stopped by SIGUSR1 after step 4" in launch(config(data_dir, split, 2, strategy, optimizer__name="adamw"),
                                                       faults="stop_at=4")
    fit(config(data_dir, split, 1, optimizer__name="adamw"))
    assert_losses_close(logged_losses(reference), logged_losses(split), range(1, STEPS + 1))
    assert_close_tensors(state_tensors(final(reference)), state_tensors(final(split)), RTOL, f"adamw {strategy}: ")
