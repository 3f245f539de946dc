"""GPU pretraining throughput: AdamW vs Adam-mini on one GPU, the app's own training step.

    python -m benchmarks.gpu_pretrain [--model tinyllama-1.1b] [--steps 30] [--warmup 5]
                                      [--micro-batch 8] [--seq-len 2048] [--accumulate 1]
                                      [--strategy fsdp|fsdp2|single] [--compile] [--activation-checkpointing]

Each optimizer runs in its own process (clean peak-memory counters, no leftover allocations). A step
is the app's own `pretrain.step.train_step` (bf16-mixed): micro-batches of random tokens, gradient
clipping, the optimizer step, on the model `pretrain.strategy` builds (FSDP1, FSDP2 or one device, each
Block compiled with --compile). The first `--warmup` steps are not timed (they include compiling);
the timed steps end with a CUDA synchronisation. MFU = models.flops_per_token x tokens/s / the GPU's
peak dense bf16 FLOP/s (pretrain.metrics table, or --peak-flops). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from data.cli import Parser


def parse(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m benchmarks.gpu_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--strategy", choices=("fsdp", "fsdp2", "single"), default="fsdp",
                   help="fsdp = the app's GPU path (FSDPStrategy, world size 1); fsdp2 = fully_shard per Block; "
                        "single = plain module")
    p.add_argument("--compile", action="store_true", help="torch.compile each Block (system.compile)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-flops", type=float, default=None, help="override the GPU's peak FLOP/s")
    p.add_argument("--optimizers", default="adamw,adam_mini")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one optimizer, print JSON
    return p.parse_args(argv)


def run_one(args: argparse.Namespace) -> dict:
    import torch

    import models
    from optim.build import build_optimizer, optimizer_state_bytes
    from pretrain import metrics, strategy
    from pretrain.config import PretrainConfig
    from pretrain.step import train_step

    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = PretrainConfig()
    cfg.model.name = args.model
    cfg.data.seq_len = args.seq_len
    cfg.logging.tensorboard = False
    cfg.system.accelerator, cfg.system.strategy, cfg.system.devices = "cuda", args.strategy, 1
    cfg.system.precision = "bf16-mixed"
    cfg.system.activation_checkpointing = args.activation_checkpointing
    cfg.system.compile = args.compile
    plan = strategy.plan(cfg)
    model_config = models.get_config(args.model)
    fabric = strategy.build_fabric(cfg, plan, model_config)
    fabric.launch()
    model = strategy.setup_model(fabric, plan, model_config, seed=0)
    opt = build_optimizer(strategy.optimizer_target(model), model_config, args.one, lr=4e-4, betas=(0.9, 0.95),
                          eps=1e-8, weight_decay=0.1)
    opt = fabric.setup_optimizers(opt)
    gen = torch.Generator(device=fabric.device).manual_seed(0)

    def batch():
        return torch.randint(0, model_config.padded_vocab_size, (args.micro_batch, args.seq_len + 1),
                             device=fabric.device, generator=gen)

    def step():
        return train_step(fabric, model, opt, [batch() for _ in range(args.accumulate)], grad_clip=1.0).loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.accumulate * args.micro_batch * args.seq_len
    tps = tokens / seconds
    peak = metrics.peak_flops(fabric.device, args.peak_flops)
    mfu = metrics.mfu(models.flops_per_token(model_config, args.seq_len), tps, peak, 1)
    return {"optimizer": args.one, "model": args.model, "strategy": args.strategy, "compile": args.compile,
            "gpu": torch.cuda.get_device_name(),
            "tokens_per_s": tps, "s_per_step": seconds / args.steps, "mfu": mfu,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "optimizer_state_gib": optimizer_state_bytes(opt.optimizer) / 2**30, "final_loss": loss,
            "micro_batch": args.micro_batch, "seq_len": args.seq_len, "accumulate": args.accumulate,
            "steps": args.steps, "activation_checkpointing": args.activation_checkpointing}


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu_pretrain needs a CUDA GPU; torch sees none (torch "
              f"{torch.__version__}, CUDA build: {torch.version.cuda}). Nothing was measured.", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    rows = []
    for name in args.optimizers.split(","):
        cmd = [sys.executable, "-m", "benchmarks.gpu_pretrain", *(argv if argv is not None else sys.argv[1:]),
               "--one", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            rows.append({"optimizer": name, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]})
            continue
        rows.append(json.loads(lines[-1]))
    ok = [r for r in rows if "error" not in r]
    if ok:
        r0 = ok[0]
        print(f"{r0['model']} on {r0['gpu']}, {r0['strategy']}{' compiled' if r0['compile'] else ''}, bf16-mixed, "
              f"micro-batch {r0['micro_batch']} x "
              f"{r0['seq_len']}, {r0['accumulate']} micro-batch(es)/step, {r0['steps']} timed steps")
        print(f"{'optimizer':<10} {'tokens/s':>10} {'s/step':>8} {'MFU':>7} {'peak mem GiB':>13} {'opt state GiB':>14}")
        for r in ok:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"{r['optimizer']:<10} {r['tokens_per_s']:>10,.0f} {r['s_per_step']:>8.3f} {mfu:>7} "
                  f"{r['peak_memory_gib']:>13.2f} {r['optimizer_state_gib']:>14.3f}")
    print(json.dumps({"benchmark": "gpu_pretrain", "results": rows}))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
