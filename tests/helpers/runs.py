"""Run configs for the app's tests and ways to run it: in this process (`fit`) or as `python -m pretrain`
subprocesses (several ranks, signals, kill -9)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.data import REPO

FAULT_RUN = Path(__file__).with_name("fault_run.py")


def tiny_config(data_dir: Path, out_dir: Path, **overrides):
    """debug model, 2 micro-batches of 2 x 32 tokens per step, checkpoints every 3 steps.

    Overrides: `section__key=value` (e.g. train__max_steps=6) or top-level `key=value`."""
    from pretrain.config import from_dict

    values = {
        "out_dir": str(out_dir), "resume": "auto", "seed": 7,
        "model": {"name": "debug"},
        "data": {"dir": str(data_dir), "seq_len": 32},
        "optimizer": {"name": "adam_mini", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"global_batch_tokens": 128, "micro_batch_size": 2, "max_steps": 6},
        "eval": {"interval": 3, "batches": 2},
        "checkpoint": {"interval": 3, "keep_last": 0},
        "logging": {"interval": 1, "tensorboard": False},
        "system": {"accelerator": "cpu"},
    }
    for key, value in overrides.items():
        path = key.split("__")
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return from_dict(values, "test")


def cli_args(cfg) -> list[str]:
    """The same configuration as command-line options."""
    import yaml

    def flatten(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "overrides":
                yield from flatten(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    args = []
    for key, value in flatten(cfg.to_dict()):
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
        args += [f"--{key}", text.strip().removesuffix("...").strip()]
    return args


def popen_pretrain(args: list[str], faults: str = "", record: Path | None = None, probe: Path | None = None
                   ) -> subprocess.Popen:
    """`python -m pretrain ARGS` from the repo root; with `faults` or `record` (see helpers/faults.py) or `probe`
    (helpers/precision_probe.py) through fault_run.py."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AMP_TEST_FAULTS": faults, "AMP_TEST_RECORD": str(record or ""),
           "AMP_TEST_PROBE": str(probe or "")}
    cmd = [sys.executable, str(FAULT_RUN)] if faults or record or probe else [sys.executable, "-m", "pretrain"]
    return subprocess.Popen([*cmd, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group: signals reach every rank


def run_pretrain(args: list[str], faults: str = "", record: Path | None = None, timeout: float = 600,
                 probe: Path | None = None) -> tuple[int, str]:
    proc = popen_pretrain(args, faults, record, probe)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def read_until(proc: subprocess.Popen, needle: str, lines: list[str], timeout_s: float = 120) -> bool:
    """Read the child's output until a line contains `needle` (True) or the child ends (False)."""
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return True
        if time.monotonic() > deadline:
            return False
    return False


def train_log(out_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]


def logged_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_log(out_dir) if "loss" in r}


def assert_losses_close(a: dict, b: dict, steps, rtol: float = 1e-5) -> None:
    """Logged losses (step -> loss) of two runs agree at `steps` within `rtol` relative."""
    for s in steps:
        assert abs(a[s] - b[s]) <= rtol * abs(a[s]), (s, a[s], b[s])
