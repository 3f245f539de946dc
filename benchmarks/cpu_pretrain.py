"""Training throughput of the app itself on CPU: per-Block torch.compile on and off, FSDP1 vs FSDP2.

Runs `python -m pretrain` (the real app: its strategies, its training step, its data) on the embedded
sample, prepared into the work folder on first use, and reads tokens/s from each run's train_log.jsonl.
The first `--warmup` steps (which include compiling) are not counted. Runs one at a time; nothing else
should run on the machine meanwhile. Prints a table, then one JSON line.

    python -m benchmarks.cpu_pretrain                      # tiny: single eager/compiled; fsdp, fsdp2 x 2 ranks
    python -m benchmarks.cpu_pretrain --steps 12 --warmup 4 --runs single,fsdp:2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data.cli import Parser, int_in
from pretrain.logs import LOG_NAME, read_records

ROOT = Path(__file__).resolve().parents[1]
RUNS = "single,single+compile,fsdp:2,fsdp:2+compile,fsdp2:2,fsdp2:2+compile"


def parse(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m benchmarks.cpu_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int_in(2), default=24, help="optimizer steps per run")
    p.add_argument("--warmup", type=int_in(0), default=6, help="first steps not counted (compiling happens there)")
    p.add_argument("--micro-batch", type=int_in(1), default=8)
    p.add_argument("--seq-len", type=int_in(1), default=128)
    p.add_argument("--runs", default=RUNS, help=f"comma-separated STRATEGY[:RANKS][+compile] (default {RUNS})")
    p.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error(f"argument --warmup: must be below --steps ({args.steps}), got {args.warmup}")
    for run in args.runs.split(","):
        spec, _, extra = run.partition("+")
        strategy, _, ranks = spec.partition(":")
        if strategy not in ("single", "ddp", "fsdp", "fsdp2") or extra not in ("", "compile") \
                or not (ranks == "" or ranks.isdigit() and int(ranks) >= 1):
            p.error(f"argument --runs: {run!r} is not STRATEGY[:RANKS][+compile] (single, ddp, fsdp, fsdp2)")
    return args


def measure(args, run: str, data: Path, work: Path) -> dict:
    spec, _, extra = run.partition("+")
    strategy, _, ranks = spec.partition(":")
    ranks = int(ranks or 1)
    out = work / run.replace(":", "-").replace("+", "-")
    cmd = [sys.executable, "-m", "pretrain", "--model.name", args.model, "--data.dir", str(data),
           "--data.seq_len", str(args.seq_len), "--out_dir", str(out), "--resume", "none",
           "--train.micro_batch_size", str(args.micro_batch),
           "--train.global_batch_tokens", str(args.micro_batch * args.seq_len * ranks),
           "--train.max_steps", str(args.steps), "--optimizer.warmup_steps", "2", "--eval.interval", "0",
           "--eval.batches", "1", "--checkpoint.interval", "0", "--logging.interval", "1",
           "--logging.tensorboard", "false", "--system.accelerator", "cpu", "--system.strategy", strategy,
           "--system.devices", str(ranks), "--system.compile", str(extra == "compile").lower()]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"run": run, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    records, _ = read_records(out / LOG_NAME)
    timed = [r for r in records if "s_per_step" in r and r["step"] > args.warmup]
    seconds = sum(r["s_per_step"] for r in timed)
    tokens = len(timed) * args.micro_batch * args.seq_len * ranks
    first = next(r for r in records if "s_per_step" in r)
    return {"run": run, "strategy": strategy, "ranks": ranks, "compile": extra == "compile",
            "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "first_step_s": first["s_per_step"], "wall_s": wall,
            "final_loss": [r["loss"] for r in records if "loss" in r][-1]}


def main(argv=None) -> int:
    args = parse(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cpu_pretrain-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --work-dir {work}: {e.strerror or e}", file=sys.stderr)
        return 2
    data = work / "data"
    if not (data / "val" / "manifest.json").is_file():
        proc = subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(data)], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print((proc.stderr.strip().splitlines() or ["data.prepare failed"])[-1], file=sys.stderr)
            return proc.returncode
    rows = [measure(args, run, data, work) for run in args.runs.split(",")]
    print(f"{args.model} on CPU ({os.cpu_count()} cores), micro-batch {args.micro_batch} x {args.seq_len} per rank, "
          f"{args.steps} steps, first {args.warmup} not counted")
    print(f"{'run':<18} {'tokens/s':>10} {'s/step':>8} {'first step s':>13} {'wall s':>8}")
    base = next((r["tokens_per_s"] for r in rows if "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['run']:<18} failed: {r['error']}")
            continue
        print(f"{r['run']:<18} {r['tokens_per_s']:>10,.0f} {r['s_per_step']:>8.3f} {r['first_step_s']:>13.1f} "
              f"{r['wall_s']:>8.0f}")
    print(json.dumps({"benchmark": "cpu_pretrain", "model": args.model, "baseline_tokens_per_s": base,
                      "results": rows}))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
