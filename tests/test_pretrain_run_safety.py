"""Run safety (issue #21, items 4-8):

- a refused resume (a model, optimizer or data position that does not fit) changes nothing on disk, and the
  next `--resume auto` continues from the newest checkpoint;
- requeues of a branch keep continuing it after keep-last deleted the checkpoint it started from;
- train.max_tokens counts tokens seen: a resume with another global batch trains to the budget, never past it;
- Ctrl-C while a checkpoint is written exits 130 and leaves no partial folder (one process, and fsdp x 2);
- a stop signal takes effect within a bounded time while a rank waits in a collective on a stopped peer
  (SIGSTOP) or in the rendezvous, and a stopped peer (or one that never comes) ends in one line, exit 4, after
  system.collective_timeout_s instead of a hang.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from checkpoints_util.layout import BRANCH_FILE, list_checkpoints
from helpers.faults import PG_LEFT
from helpers.runs import cli_args, logged_losses, popen_pretrain, read_until, run_pretrain, tiny_config, train_log
from pretrain.__main__ import main
from pretrain.loop import fit
from pretrain.schedule import lr_at


def steps_in(out_dir: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(out_dir)]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> sha256 of its bytes ("dir" for folders). `.lock` is left out: the lock
    file records who held it last, and every start takes it."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


@pytest.fixture(scope="module")
def twelve_steps(data_dir, tmp_path_factory) -> Path:
    """A finished 12-step run with checkpoints at 2, 4, ..., 12; tests work on copies."""
    out = tmp_path_factory.mktemp("twelve") / "run"
    fit(tiny_config(data_dir, out, train__max_steps=12, checkpoint__interval=2))
    return out


@pytest.mark.parametrize("misfit, needle", [
    (dict(model__overrides={"n_layer": 1}), "n_layer (2 vs 1)"),
    (dict(optimizer__name="adamw"), "does not fit this run"),
    (dict(seed=8), "data position does not fit"),
])
def test_a_refused_resume_changes_nothing_on_disk(misfit, needle, data_dir, tmp_path, twelve_steps, capsys):
    out = shutil.copytree(twelve_steps, tmp_path / "run")
    before = snapshot(out)
    cfg = tiny_config(data_dir, out, resume=str(out / "step-00000004"), train__max_steps=12, **misfit)
    assert main(cli_args(cfg)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert snapshot(out) == before  # no abandoned-*, no branch.json, no moved log lines
    if "seed" in misfit:
        # and the next --resume auto continues from the newest checkpoint, not from the refused step 4
        assert main(cli_args(tiny_config(data_dir, out, train__max_steps=12))) == 0
        assert f"resumed from {out / 'step-00000012'} at step 12" in capsys.readouterr().out


def test_requeues_of_a_branch_continue_it_after_keep_last_pruned_its_origin(data_dir, tmp_path, twelve_steps, faults,
                                                                            capsys):
    out = shutil.copytree(twelve_steps, tmp_path / "run")
    branch = tiny_config(data_dir, out, resume=str(out / "step-00000006"), train__max_steps=12, checkpoint__interval=2,
                         checkpoint__keep_last=1, optimizer__lr=1e-3, optimizer__min_lr=1e-4)
    faults(stop_at=8)  # the branch's first job: preempted after step 8
    fit(branch)
    assert steps_in(out) == [6, 8]
    faults(stop_at=10)  # the first requeue (the same command): continues the branch, preempted after step 10
    assert sorted(fit(branch).losses) == [9, 10]
    assert steps_in(out) == [8, 10]  # keep-last 1 deleted step 6, where the branch started (8: resumed from)
    faults(stop_at=0)  # the second requeue, still `--resume OUT/step-00000006`
    assert sorted(fit(branch).losses) == [11, 12]
    assert json.loads((out / BRANCH_FILE).read_text())["newest"] == "step-00000012"
    assert capsys.readouterr().out.count("continuing the branch started from") == 2
    assert [r["step"] for r in train_log(out) if "loss" in r] == list(range(1, 13))
    assert logged_losses(out)[12] != logged_losses(twelve_steps)[12]  # the branch's own values


@pytest.mark.parametrize("batch, micro, end_step", [(256, 2, 6), (64, 2, 13)])
def test_max_tokens_counts_tokens_seen_when_the_global_batch_changes(batch, micro, end_step, data_dir, tmp_path,
                                                                     faults, capsys):
    """Budget 1,088 tokens at 128 per step: 8 steps. Stopped at step 4 (512 tokens) and resumed with a doubled
    batch: 2 more steps (1,024 tokens: a third would exceed the budget); halved: 9 more (1,088)."""
    out, budget = tmp_path / "run", 1088
    faults(stop_at=4)
    first = fit(tiny_config(data_dir, out, train__max_steps=None, train__max_tokens=budget))
    assert (first.step, first.tokens_seen) == (4, 512)
    faults(stop_at=0)
    cfg = tiny_config(data_dir, out, train__max_steps=None, train__max_tokens=budget,
                      train__global_batch_tokens=batch, train__micro_batch_size=micro)
    capsys.readouterr()
    second = fit(cfg)
    left = (budget - 512) // batch
    assert (second.step, second.tokens_seen) == (4 + left, 512 + left * batch) == (end_step, second.tokens_seen)
    assert second.tokens_seen <= budget < second.tokens_seen + batch  # the last step that fits, never past it
    records = [r for r in train_log(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, end_step + 1))
    assert records[-1]["tokens_seen"] == second.tokens_seen
    o = cfg.optimizer  # the cosine now ends at the new last step
    assert [r["lr"] for r in records[4:]] == [lr_at(s, o.lr, o.min_lr, o.warmup_steps, end_step)
                                              for s in range(5, end_step + 1)]
    assert f"{left} more steps" in capsys.readouterr().out
    assert main(cli_args(cfg)) == 0  # once more: nothing to do
    assert "nothing to do: the run is already at step" in capsys.readouterr().out


def test_ctrl_c_during_a_save_exits_130_and_leaves_no_partial_folder(data_dir, tmp_path, faults, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, train__max_steps=6, checkpoint__interval=3)
    faults(interrupt_in_save=6)  # SIGINT arrives while DCP writes step 6 (DCP wraps the KeyboardInterrupt)
    assert main(cli_args(cfg)) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp", ".old", "step-"))) == ["step-00000003"]


@pytest.mark.extended
def test_ctrl_c_during_a_save_under_fsdp_exits_130_and_tears_the_process_group_down(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, train__max_steps=3, system__devices=2, system__strategy="fsdp",
                      train__global_batch_tokens=256, eval__batches=2)
    code, text = run_pretrain(cli_args(cfg), faults="interrupt_in_save=3", timeout=300)
    assert code == 130, text
    assert "error: interrupted" in text and PG_LEFT not in text and "Traceback" not in text, text
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".old", "step-"))]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _fsdp2_with_rank1_stopped(data_dir, out, **system):
    """An fsdp x 2 run whose rank 1 (the launcher's child) is SIGSTOPped during training; rank 0 then waits in a
    collective. Returns (the process of rank 0, its output so far)."""
    cfg = tiny_config(data_dir, out, train__max_steps=10_000, system__devices=2, system__strategy="fsdp",
                      train__global_batch_tokens=256, eval__interval=0, checkpoint__interval=0,
                      **{f"system__{k}": v for k, v in system.items()})
    proc = popen_pretrain(cli_args(cfg))
    lines: list[str] = []
    assert read_until(proc, "step      2/", lines, timeout_s=240), "".join(lines)
    (rank1,) = _children(proc.pid)
    os.kill(rank1, signal.SIGSTOP)
    return proc, lines


def _end(proc, lines: list[str]) -> str:
    """Kill what is left of the run (rank 1, still stopped, holds the output pipe open); all of its output."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    rest, _ = proc.communicate(timeout=60)
    return "".join(lines) + rest


@pytest.mark.parametrize("grace_s", [3.0])
def test_sigterm_while_a_peer_is_stopped_exits_143_within_the_grace(data_dir, tmp_path, grace_s):
    proc, lines = _fsdp2_with_rank1_stopped(data_dir, tmp_path / "run", stop_grace_s=grace_s)
    try:
        time.sleep(1.0)  # rank 0 is in a collective now, waiting for rank 1
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        text = _end(proc, lines)
    assert proc.returncode == 143, text
    assert grace_s - 0.5 <= took < grace_s + 20, (took, text)
    assert "did not end within system.stop_grace_s=3 s" in text and "Traceback" not in text, text


@pytest.mark.extended
def test_a_second_sigterm_while_a_peer_is_stopped_exits_at_once(data_dir, tmp_path):
    proc, lines = _fsdp2_with_rank1_stopped(data_dir, tmp_path / "run", stop_grace_s=0)  # no deadline
    try:
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        assert read_until(proc, "received SIGTERM: will save", lines, timeout_s=30), "".join(lines)
        time.sleep(2.0)
        assert proc.poll() is None  # no deadline: still waiting for rank 1
        os.kill(proc.pid, signal.SIGUSR1)  # the other kind: the escape hatch
        proc.wait(timeout=30)
    finally:
        text = _end(proc, lines)
    assert proc.returncode == 138, text  # 128 + SIGUSR1
    assert "received SIGUSR1 again after SIGTERM: exiting now without saving" in text, text


@pytest.mark.extended
def test_a_stopped_peer_ends_the_run_after_the_collective_timeout(data_dir, tmp_path):
    proc, lines = _fsdp2_with_rank1_stopped(data_dir, tmp_path / "run", collective_timeout_s=20)
    try:
        t0 = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        text = _end(proc, lines)
    assert proc.returncode == 4, text
    assert took < 60, took
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another rank stopped answering or died" in errors[0], text
    assert "Traceback" not in text, text


@pytest.mark.extended
def test_a_dead_peer_ends_the_run_at_once_with_exit_4(data_dir, tmp_path):
    proc, lines = _fsdp2_with_rank1_stopped(data_dir, tmp_path / "run")
    os.kill(_children(proc.pid)[0], signal.SIGKILL)  # stopped, then killed: its connections close
    try:
        proc.wait(timeout=60)  # well before the collective timeout (1800 s)
    finally:
        text = _end(proc, lines)
    assert proc.returncode == 4, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another rank stopped answering or died" in errors[0], text
    assert "Traceback" not in text, text


def _rank0_alone(data_dir, out: Path, **system):
    """`python -m pretrain` as rank 0 of 2 under an outside launcher (torchelastic's variables) whose rank 1 never
    comes: it waits in the rendezvous (C++, the TCPStore), where Python's signal handlers do not run."""
    import socket
    import subprocess
    import sys

    from helpers.data import REPO

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tiny_config(data_dir, out, system__devices=2, system__strategy="ddp", train__global_batch_tokens=256,
                      **{f"system__{k}": v for k, v in system.items()})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHELASTIC_RUN_ID": "h3", "RANK": "0", "LOCAL_RANK": "0",
           "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *cli_args(cfg)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    assert read_until(proc, "Initializing distributed", lines, timeout_s=120), "".join(lines)
    return proc, lines


@pytest.mark.extended
def test_sigterm_in_the_rendezvous_exits_143_within_the_grace(data_dir, tmp_path):
    proc, lines = _rank0_alone(data_dir, tmp_path / "run", stop_grace_s=2)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        text = _end(proc, lines)
    assert proc.returncode == 143, text
    assert 1.5 <= took < 20, (took, text)
    assert "did not end within system.stop_grace_s=2 s" in text and "Traceback" not in text, text


def test_a_rank_that_never_comes_ends_the_rendezvous_after_the_collective_timeout(data_dir, tmp_path):
    proc, lines = _rank0_alone(data_dir, tmp_path / "run", collective_timeout_s=3)
    try:
        proc.wait(timeout=60)
    finally:
        text = _end(proc, lines)
    assert proc.returncode == 4, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "the rendezvous of the ranks failed" in errors[0], text
    assert "Traceback" not in text, text


def test_a_signal_after_the_agreement_of_a_saving_step_still_bounds_the_next_step(data_dir, tmp_path, monkeypatch):
    """SIGUSR1 comes after step 2's stop agreement, and step 2 saves (interval): the run trains step 3 before it
    stops, and step 3 must again end within system.stop_grace_s (it had no deadline: the save acknowledged the
    signal for good, so a step 3 stuck on a stopped peer waited for the collective timeout)."""
    import threading

    from pretrain import loop, signals

    exits: list[int] = []
    fired = threading.Event()

    def fake_exit(signum, message):  # the watchdog's os._exit, recorded instead (it fires until step 3 ends)
        if not exits:
            exits.append(signum)
        fired.set()

    monkeypatch.setattr(signals, "_exit", fake_exit)
    agreed, one_step = loop._agreed_stop, loop._one_step

    def agree_then_signal(fabric, stop):
        result = agreed(fabric, stop)
        if loop_state["run"].state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # after this step's agreement
        return result

    loop_state: dict = {}

    def step_that_hangs(run, thr):
        loop_state["run"] = run
        if run.state.step == 2:  # step 3: stuck (as on a stopped peer) until the watchdog would end the process
            assert fired.wait(timeout=10), "no deadline for the step after a late signal's save"
        return one_step(run, thr)

    monkeypatch.setattr(loop, "_agreed_stop", agree_then_signal)
    monkeypatch.setattr(loop, "_one_step", step_that_hangs)
    cfg = tiny_config(data_dir, tmp_path / "run", train__max_steps=6, checkpoint__interval=2, eval__interval=0,
                      system__stop_grace_s=0.5)
    result = loop.fit(cfg)
    assert exits == [signal.SIGUSR1]
    assert result.stopped_by == "SIGUSR1" and result.step == 3
