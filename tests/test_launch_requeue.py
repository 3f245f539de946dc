"""The SLURM requeue cycle on CPU, through the real batch script (launch/slurm_1node.sbatch ->
launch/slurm_train.sh) with stand-ins for `srun` (runs the command as the one task) and `scontrol`
(records what it was asked):

1. the job runs the app; SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@180` does) is
   forwarded, the app saves a checkpoint and exits 0, and the script asks for `scontrol requeue <job>`;
2. the requeued job (same script, SLURM_RESTART_COUNT=1) resumes from that checkpoint, finishes, and
   does not ask for another requeue;
3. steps and tokens continue without a gap or a repeat, and the final weights and optimizer state equal
   an uninterrupted run's, bitwise;
4. SIGTERM (scancel, preemption) saves but does not requeue; a run that fails (bad option) is not
   requeued either.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.checkpoints import assert_same_tensors, checkpoint_tensors
from helpers.runs import read_until, train_log

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TOKENS_PER_STEP = 128

FAKE_SRUN = """#!/usr/bin/env bash
# test stand-in for srun: skip srun's --options, become the single task (signals reach it directly)
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SCONTROL_LOG"
"""


def app_args(data_dir: Path, out_dir: Path) -> list[str]:
    return ["--model.name", "debug", "--data.dir", str(data_dir), "--data.seq_len", "32",
            "--optimizer.lr", "3e-3", "--optimizer.min_lr", "3e-4", "--optimizer.warmup_steps", "2",
            "--train.global_batch_tokens", str(TOKENS_PER_STEP), "--train.micro_batch_size", "2",
            "--train.max_steps", str(STEPS), "--eval.interval", "0", "--eval.batches", "1",
            "--checkpoint.interval", "0", "--checkpoint.keep_last", "0", "--logging.interval", "1",
            "--logging.tensorboard", "false", "--system.accelerator", "cpu", "--seed", "7",
            "--out_dir", str(out_dir)]


@pytest.fixture()
def slurm_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "scontrol.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LT_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SCONTROL_LOG=str(log), SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="1",
               AMP_PYTHON=sys.executable, AMP_VENV=str(Path(sys.executable).parent.parent), OMP_NUM_THREADS="1")
    return env, log


def requeues(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def sbatch(args, env, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch" / "slurm_1node.sbatch"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_usr1_checkpoint_requeue_resume_equals_straight_run(data_dir, tmp_path, slurm_env):
    env, log = slurm_env
    straight = tmp_path / "straight"
    ref = subprocess.run([sys.executable, "-m", "pretrain", *app_args(data_dir, straight), "--resume", "none"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    run = tmp_path / "requeued"
    # --- attempt 1: interrupted by SIGUSR1 mid-run
    proc = sbatch(app_args(data_dir, run), env)
    lines: list[str] = []
    assert read_until(proc, f"step      3/{STEPS}", lines, timeout_s=300), "".join(lines)
    proc.send_signal(signal.SIGUSR1)  # to the batch shell, as --signal=B:USR1 does
    rest, _ = proc.communicate(timeout=300)
    out1 = "".join(lines) + rest
    assert proc.returncode == 0, out1[-3000:]
    assert "got SIGUSR1" in out1 and "requeueing job 4242" in out1
    assert requeues(log) == ["requeue 4242"]
    saved = sorted(p.name for p in run.glob("step-*"))
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].removeprefix("step-"))
    assert 3 <= stopped_at < STEPS
    trainer = json.loads((run / saved[0] / "trainer.json").read_text())
    assert trainer["reason"] == "signal" and trainer["tokens_seen"] == stopped_at * TOKENS_PER_STEP

    # --- attempt 2: the requeued job resumes and finishes; no further requeue
    env2 = {**env, "SLURM_RESTART_COUNT": "1"}
    proc = sbatch(app_args(data_dir, run), env2)
    out2, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out2[-3000:]
    assert f"resumed from {run / saved[0]} at step {stopped_at}" in out2
    assert "training finished" in out2 and "restart 1" in out2
    assert requeues(log) == ["requeue 4242"]

    # continuity: every step logged exactly once, tokens = steps x tokens per step
    train = [r for r in train_log(run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["tokens_seen"] == r["step"] * TOKENS_PER_STEP for r in train)
    assert [r["loss"] for r in train] == [r["loss"] for r in train_log(straight) if "loss" in r]
    final = run / f"step-{STEPS:08d}"
    assert json.loads((final / "trainer.json").read_text())["tokens_seen"] == STEPS * TOKENS_PER_STEP

    # the same weights and optimizer state as the uninterrupted run, bitwise
    straight_final = straight / f"step-{STEPS:08d}"
    assert_same_tensors(checkpoint_tensors(final), checkpoint_tensors(straight_final), "checkpoint")

    # and the run exports: inspect sees the final step, transformers computes what litgpt computes
    import torch
    from litgpt.model import GPT
    from transformers import LlamaForCausalLM

    from checkpoints_util.__main__ import main as ckpt_main
    from checkpoints_util.inspect import inspect_checkpoint

    info = inspect_checkpoint(run)
    assert (info["step"], info["tokens_seen"], info["optimizer"]["kind"]) == \
        (STEPS, STEPS * TOKENS_PER_STEP, "adam_mini")
    assert ckpt_main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--tokenizer", "auto",
                      "--quiet"]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").is_file()  # found through the data manifest of the run
    import models

    gpt = GPT(models.get_config("debug"))
    gpt.load_state_dict({k[len("model."):]: v for k, v in checkpoint_tensors(final).items() if k.startswith("model.")})
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (gpt.eval()(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_sigterm_saves_but_does_not_requeue(data_dir, tmp_path, slurm_env):
    """scancel / preemption: Slurm sends SIGTERM to every process of the job at once (here: the process
    group). The app saves and exits 143; the script does not requeue (the user cancelled, or Slurm
    requeues a preempted job itself)."""
    env, log = slurm_env
    run = tmp_path / "run"
    proc = sbatch(app_args(data_dir, run), env, start_new_session=True)
    lines: list[str] = []
    assert read_until(proc, f"step      2/{STEPS}", lines, timeout_s=300), "".join(lines)
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM after saving a checkpoint: not requeueing" in out
    assert requeues(log) == []
    saved = sorted(run.glob("step-*"))
    assert len(saved) == 1 and json.loads((saved[0] / "trainer.json").read_text())["reason"] == "signal"


def test_failed_run_is_not_requeued(tmp_path, slurm_env):
    env, log = slurm_env
    proc = sbatch(app_args(tmp_path / "no-such-data", tmp_path / "run"), env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "training failed with status 2: not requeueing" in out
    assert requeues(log) == []


def test_outside_slurm_the_script_refuses(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_train.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no SLURM_JOB_ID" in proc.stderr
