"""benchmarks/gpu_check.py cannot rot: its CPU `--smoke` run (the same code as on a GPU, `debug` model) writes one
JSON line with every part, Adam-mini within 1e-5 of the float64 reference on plain, FSDP1 and FSDP2 units (fp32 and
bf16 m), the app's step timed for AdamW and both Adam-mini variants under fsdp and fsdp2, and the memory
estimate of the recipe; a run that would overrun its part is skipped and named."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from helpers.data import REPO


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    result = json.loads(line)
    assert (tmp_path / "gpu_check.json").read_text().strip() == line
    assert result["benchmark"] == "gpu_check" and result["smoke"] and set(result["parts"]) == {"optim", "app", "memory"}
    assert all(not p["skipped"] for p in result["parts"].values()), result["parts"]

    optim = result["parts"]["optim"]["runs"]
    assert {(r["unit"], r["momentum_dtype"]) for r in optim} == {
        (u, m) for u in ("plain", "fsdp1", "fsdp2") for m in ("float32", "bfloat16")}
    for r in optim:
        assert r["max_rel_err"] <= 1e-5 and r["steps"] == 10, r

    app = {(r["strategy"], r["optimizer"]): r for r in result["parts"]["app"]["runs"]}
    assert set(app) == {(s, o) for s in ("fsdp", "fsdp2") for o in ("adamw", "adam_mini", "adam_mini_bf16m")}
    for (strategy, _), r in app.items():
        assert r["tokens_per_s"] > 0 and r["optimizer_step_ms"] > 0 and math.isfinite(r["final_loss"]), r
        state = {o: app[(strategy, o)]["optimizer_state_bytes"] for o in ("adamw", "adam_mini", "adam_mini_bf16m")}
        assert state["adamw"] > state["adam_mini"] > state["adam_mini_bf16m"], state
    assert set(result["ratios"]) == {f"{s}: {o} / adamw" for s in ("fsdp", "fsdp2")
                                     for o in ("adam_mini", "adam_mini_bf16m")}

    memory = {r["optimizer"]: r for r in result["parts"]["memory"]["runs"]}
    assert set(memory) == {"adamw", "adam_mini", "adam_mini_bf16m"}
    for r in memory.values():  # the recipe's model, strategy and settings; on CPU nothing is measured against it
        assert r["strategy"] == "fsdp" and r["seq_len"] == 64 and r["micro_batches"] == 2, r
        assert r["estimate_bytes"] == sum(r["estimate_parts"].values()) and r["max_memory_allocated"] is None
    assert memory["adamw"]["estimate_bytes"] > memory["adam_mini"]["estimate_bytes"] \
        > memory["adam_mini_bf16m"]["estimate_bytes"]


def test_gpu_check_skips_what_would_overrun():
    from benchmarks.gpu_check import Part

    now = [0.0]
    part = Part("app", deadline=10.0, first_guess=3.0, clock=lambda: now[0])

    def takes(seconds):
        def run(left):
            now[0] += seconds
            return {"left_at_start": left}
        return run

    part.run("first", takes(4.0))          # the guess (3 s) fits the 10 s; it took 4 (it compiled)
    part.run("second", takes(1.0))         # 6 s left >= 4: runs, takes 1
    part.run("third", takes(3.0))          # 5 s left >= 1: runs, takes 3
    part.run("fourth", takes(1.0))         # 2 s left < 3 (the last run's time): skipped
    part.run("fifth", takes(1.0))          # still 2 s left < 3: skipped
    report = part.report()
    assert [r["run"] for r in report["runs"]] == ["first", "second", "third"]
    assert [r["left_at_start"] for r in report["runs"]] == [10.0, 6.0, 5.0]
    assert report["skipped"] == [{"run": run, "why": "would overrun: estimated 3 s, 2 s left of the part"}
                                 for run in ("fourth", "fifth")]


def test_gpu_check_a_failing_run_is_recorded_and_the_part_goes_on():
    """An in-process run (the optim part on a GPU) that raises is the run's `error`, not the end of the check."""
    from benchmarks.gpu_check import Part

    part = Part("optim", deadline=float("inf"), first_guess=0.0)

    def fails(left):
        raise RuntimeError("NCCL error: unhandled cuda error\nsecond line")

    part.run("plain, float32 m", fails)
    part.run("plain, bfloat16 m", lambda left: {"max_rel_err": 0.0})
    runs = part.report()["runs"]
    assert [r["run"] for r in runs] == ["plain, float32 m", "plain, bfloat16 m"]
    assert runs[0]["error"] == "RuntimeError: NCCL error: unhandled cuda error" and "error" not in runs[1]


def test_gpu_check_without_cuda_is_one_line(capsys):
    import torch

    from benchmarks.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--smoke" in err and "needs a CUDA GPU" in err


def test_gpu_wheels_script_lists_the_app_dependencies_but_not_torch():
    """scripts/gpu_wheels.sh --dry-run: the pinned list it would download (the .venv's versions), without torch
    or what torch requires; the script passes shellcheck."""
    import shutil
    from importlib import metadata
    from pathlib import Path

    if not (REPO / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv (scripts/setup.sh)")
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    pins = dict(line.split("==") for line in proc.stdout.splitlines() if "==" in line and not line.startswith("#"))
    for name in ("lightning", "litgpt", "sentencepiece", "zstandard", "pyarrow", "tokenizers", "tensorboard",
                 "jsonargparse", "numpy", "pyyaml", "safetensors"):
        assert pins.get(name) == metadata.version(name), name
    assert not {"torch", "triton", "sympy", "jinja2", "filelock", "networkx", "fsspec"} & set(pins)
    assert "--abi cp312" in proc.stdout and "manylinux" in proc.stdout
    # --gpu-check-only: without pyarrow, tensorboard and what only they pull in (the check imports neither)
    only = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--gpu-check-only", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert only.returncode == 0, only.stderr
    small = dict(line.split("==") for line in only.stdout.splitlines() if "==" in line and not line.startswith("#"))
    assert set(small) < set(pins) and not {"pyarrow", "tensorboard", "grpcio", "protobuf"} & set(small), small
    assert {n: pins[n] for n in small} == small and {"lightning", "litgpt", "numpy", "safetensors"} <= set(small)
    checker = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if Path(checker).is_file():
        check = subprocess.run([checker, "scripts/gpu_wheels.sh"], cwd=REPO, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
