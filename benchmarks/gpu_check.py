"""One prepared GPU check: what only a GPU can show, in one command (planned for <= 8 minutes on one H200,
compiling included), with a CPU `--smoke` run of the same code that CI runs.

    python -m benchmarks.gpu_check [--out-dir DIR] [--budget-s 480] [--parts optim,app,memory]
    python -m benchmarks.gpu_check --smoke [--out-dir DIR]      # CPU, `debug` model, no compile: seconds

Parts (on a GPU each has a share of --budget-s plus what earlier parts left; before every run a part
estimates it from its last run and skips what would overrun, saying so in the JSON; a CUDA run is
a child process killed at the end of its part's time; --smoke gives every part the whole budget):
  a. optim: Adam-mini on this device through the path `auto` picks here (CUDA: compiled kernels for models
     of 2^22 parameters and more, so `debug` with a 32,768 vocabulary, 4.3 M; CPU: the native kernel), fp32
     and bf16 m, on an
     unsharded model, an FSDP1 flat unit and an FSDP2 DTensor unit on 1 rank: 10 steps on synthetic
     gradients against the float64 reference of tests/helpers/optim_reference.py (bf16 m rounded like the
     optimizer, near-ties adopted): the max relative error of the weights.
  b. app: the app's training step (pretrain.step.train_step on the model pretrain.strategy builds) on one GPU,
     `tinyllama-1.1b`, seq 2048, bf16-mixed, compiled Blocks, under fsdp and fsdp2: AdamW vs Adam-mini vs
     Adam-mini with bf16 m: tokens/s, MFU, torch.cuda.max_memory_allocated, optimizer-step ms (CUDA events)
     and each Adam-mini / AdamW ratio, compile seconds (first step minus a timed step). Random tokens.
  c. memory: configs/llama2-7b-1gpu.yaml (Llama-2 7B, fsdp on 1 GPU, bf16-mixed, activation checkpointing,
     micro-batch 1 x 2048) for 3 steps of 2 micro-batches (the recipe takes 512; peak memory does not grow
     with the count), AdamW, Adam-mini and bf16 m: measured peak allocated memory against
     benchmarks.memory_table's estimate for the same recipe (weights + grads + state + bf16 transient +
     activations; its 2 GiB reserve is not allocated memory and is left out).
Prints a table and, last, one JSON line; with --out-dir also writes it to DIR/gpu_check.json.

On a GPU machine without network (torch >= 2.11 with CUDA installed, Python 3.12): on a machine with
network, `bash scripts/gpu_wheels.sh` puts the app's other dependencies as wheels into `.whl/`; carry the
repository with `.whl/` over, then, from its root, one call:

    python -m pip install --no-index --no-deps --target /tmp/amp-deps .whl/*.whl && \\
        PYTHONPATH=/tmp/amp-deps:. python -m benchmarks.gpu_check --out-dir "$OUT"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "llama2-7b-1gpu.yaml"
PARTS = ("optim", "app", "memory")
SHARE = {"optim": 0.2, "app": 0.5, "memory": 0.3}  # of --budget-s (on a GPU; --smoke: the whole budget each)
FIRST_GUESS_S = {"optim": 30.0, "app": 90.0, "memory": 120.0}  # a part's first run, before any was timed (CUDA)
OPTIMIZERS = {"adamw": ("adamw", "float32"), "adam_mini": ("adam_mini", "float32"),
              "adam_mini_bf16m": ("adam_mini", "bfloat16")}
OPTIM_STEPS = 10


def parse(argv=None) -> argparse.Namespace:
    from data.cli import Parser

    p = Parser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, `debug` model, no compile, in one process (CI)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all parts (default 480; --smoke 600)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out-dir", default=None, help="also write the JSON line to DIR/gpu_check.json")
    p.add_argument("--peak-flops", type=float, default=None, help="the GPU's peak FLOP/s for MFU (default: table)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run's spec (JSON), prints JSON
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"argument --parts: {args.parts!r} is not a comma-separated subset of {','.join(PARTS)}")
    if args.budget_s is not None and not args.budget_s > 0:
        p.error(f"argument --budget-s: must be > 0, got {args.budget_s}")
    args.parts = parts
    args.budget_s = args.budget_s or (600.0 if args.smoke else 480.0)
    return args


class Part:
    """A part's clock: its deadline, and whether the next run, estimated to take as long as the last one (the
    first: a guess), still fits. (The first run of a kind also compiles: the estimate after it is high, and a
    later run that compiles again is under-estimated; a CUDA child is killed 30 s past the part's end.)"""

    def __init__(self, name: str, deadline: float, first_guess: float, clock=time.monotonic) -> None:
        self.name, self.deadline, self.clock, self.estimate = name, deadline, clock, first_guess
        self.runs: list[dict] = []
        self.skipped: list[dict] = []

    def left(self) -> float:
        return self.deadline - self.clock()

    def run(self, label: str, fn) -> dict | None:
        """`fn(seconds_left)` unless its estimate overruns the part; records the result (an exception: as the
        run's `error`) or the skip."""
        if self.estimate > self.left():
            self.skipped.append({"run": label, "why": f"would overrun: estimated {self.estimate:.0f} s, "
                                                      f"{max(self.left(), 0):.0f} s left of the part"})
            return None
        t0 = self.clock()
        try:
            out = fn(self.left())
        except Exception as exc:  # an in-process run (the optim part) that fails must not lose the other parts
            out = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        seconds = self.clock() - t0
        self.estimate = seconds
        out = {"run": label, **out, "wall_s": round(seconds, 2)}
        self.runs.append(out)
        return out

    def report(self) -> dict:
        return {"runs": self.runs, "skipped": self.skipped}


# ------------------------------------------------------------------------------------------ a. optimizer
def _helpers() -> None:
    """tests/helpers (the float64 reference, the FSDP parameter gatherer) importable as `helpers`, as in the tests."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))


def optim_part(part: Part, device, smoke: bool) -> None:
    import torch.distributed as dist

    import models

    _helpers()
    from helpers.dist import free_port

    # on a GPU, `auto` compiles the update for models of 2^22 parameters and more: `debug` with a 32,768 vocabulary
    config = models.get_config("debug") if smoke else models.get_config("debug", vocab_size=32768)
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        for kind in ("plain", "fsdp1", "fsdp2"):
            for momentum in ("float32", "bfloat16"):
                part.run(f"{kind}, {momentum} m", lambda left, k=kind, m=momentum: _optim_run(config, k, m, device))
    finally:
        dist.destroy_process_group()


def _optim_run(config, kind: str, momentum: str, device) -> dict:
    """10 Adam-mini steps on `kind` units against the float64 reference; the max relative weight error."""
    import torch

    import models
    from helpers.fsdp_worker import full_params
    from helpers.optim_reference import HP, Reference, adopt_ties
    from optim.build import build_optimizer
    from optim.layout import model_layout
    from optim.state import full_state_dict
    from optim.units import local_1d

    model = models.build_model(config, device=device)
    models.init_model(model, config.n_layer, config.n_embd, seed=0)
    start = {n: p.detach().cpu() for n, p in model.named_parameters()}
    layouts = model_layout(config, [(n, tuple(p.shape)) for n, p in start.items()])
    model = _wrap(model, kind, device)
    opt = build_optimizer(model, config, "adam_mini", implementation="auto", momentum_dtype=momentum, **HP)
    ref = Reference(start, layouts, **HP, bf16_momentum=momentum == "bfloat16")
    adopted = [0]
    for step in range(OPTIM_STEPS):
        gen = torch.Generator().manual_seed(1000 + step)
        grads = {n: torch.randn(t.shape, generator=gen) * 1e-2 for n, t in start.items()}
        for u in opt.units:
            if u.param.grad is None:
                u.param.grad = torch.zeros_like(u.param)
            local = local_1d(u.param.grad)
            for s in u.segments:
                local[s.offset:s.offset + s.end - s.start].copy_(grads[s.name].reshape(-1)[s.start:s.end])
        opt.step()
        ties = None
        if momentum == "bfloat16":
            stored = {n: m.double() for n, m in full_state_dict(opt)["exp_avg"].items()}
            ties = adopt_ties(stored, adopted)
        ref.step(grads, ties=ties)
    got = full_params(model, "fsdp1" if kind == "fsdp1" else "fsdp2")
    err = max(float((got[n].double().cpu().reshape(-1) - ref.p[n].reshape(-1)).abs().max()
                    / ref.p[n].abs().max()) for n in ref.p)
    return {"model": config.name, "unit": kind, "momentum_dtype": momentum, "implementation": opt.implementation,
            "steps": OPTIM_STEPS, "max_rel_err": err, "bf16_ties_adopted": adopted[0]}


def _wrap(model, kind: str, device):
    """The model as `kind` units on one rank: itself, FSDP1 FlatParameters (use_orig_params=False, one unit per
    Block, as the app wraps) or FSDP2 DTensors (fully_shard per Block and the root)."""
    from litgpt.model import Block

    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=device, use_orig_params=False)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (1,))
        for m in model.modules():
            if isinstance(m, Block):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


# ------------------------------------------------------------------------------------ b., c. the app's step
def app_specs(smoke: bool) -> list[dict]:
    base = dict(part="app", model="tinyllama-1.1b", seq_len=2048, micro_batch=4, micro_batches=1, compile=True,
                warmup=3, steps=10, accelerator="cuda", activation_checkpointing=False, recipe=None)
    if smoke:
        base.update(model="debug", seq_len=64, micro_batch=2, compile=False, warmup=1, steps=1, accelerator="cpu")
    return [dict(base, strategy=s, optimizer=o) for s in ("fsdp", "fsdp2") for o in OPTIMIZERS]


def memory_specs(smoke: bool) -> list[dict]:
    base = dict(part="memory", recipe=str(RECIPE.relative_to(ROOT)), micro_batches=2, warmup=1, steps=2,
                model=None, seq_len=None, micro_batch=None, compile=None, accelerator="cuda", strategy=None,
                activation_checkpointing=None)
    if smoke:
        base.update(model="debug", seq_len=64, compile=False, steps=1, accelerator="cpu")
    return [dict(base, optimizer=o) for o in OPTIMIZERS]


def spec_config(spec: dict):
    """The app's PretrainConfig of a run: the recipe's (memory part) or the defaults, with the run's settings."""
    from pretrain.config import PretrainConfig, from_dict, load_yaml

    cfg = from_dict(load_yaml(ROOT / spec["recipe"]), spec["recipe"]) if spec["recipe"] else PretrainConfig()
    name, momentum = OPTIMIZERS[spec["optimizer"]]
    cfg.optimizer.name = name
    cfg.optimizer.adam_mini.momentum_dtype = momentum
    cfg.optimizer.implementation = "auto"
    for key, attr in (("model", (cfg.model, "name")), ("seq_len", (cfg.data, "seq_len")),
                      ("micro_batch", (cfg.train, "micro_batch_size")), ("compile", (cfg.system, "compile")),
                      ("strategy", (cfg.system, "strategy")),
                      ("activation_checkpointing", (cfg.system, "activation_checkpointing"))):
        if spec[key] is not None:
            setattr(*attr, spec[key])
    cfg.system.accelerator, cfg.system.devices, cfg.system.num_nodes = spec["accelerator"], 1, 1
    cfg.system.precision = "bf16-mixed"
    cfg.logging.tensorboard = False
    return cfg


def train_run(spec: dict, seconds: float, peak_flops: float | None = None) -> dict:
    """Warm-up steps (the first compiles), then timed steps of the app's train_step on random tokens, stopping
    early when `seconds` run out. Optimizer steps are timed alone (CUDA events on a GPU)."""
    import torch

    import models
    from benchmarks import memory_table
    from optim.build import build_optimizer, optimizer_state_bytes
    from pretrain import metrics, strategy
    from pretrain.config import model_config as config_of
    from pretrain.step import train_step

    deadline = time.monotonic() + seconds
    cfg = spec_config(spec)
    plan = strategy.plan(cfg)
    mc = config_of(cfg)
    cuda = plan.accelerator == "cuda"
    fabric = strategy.build_fabric(cfg, plan, mc)
    fabric.launch()
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats()
        model = strategy.setup_model(fabric, plan, mc, cfg.seed)
        o = cfg.optimizer
        extra = dict(momentum_dtype=o.adam_mini.momentum_dtype) if o.name == "adam_mini" else {}
        opt = fabric.setup_optimizers(build_optimizer(strategy.optimizer_target(model), mc, o.name, lr=o.lr,
                                                      betas=tuple(o.betas), eps=o.eps,
                                                      weight_decay=o.weight_decay, **extra))
        inner = opt.optimizer
        real_step, step_times = inner.step, []

        def timed_step(*a, **k):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = real_step(*a, **k)
                end.record()
                step_times.append((start, end))
            else:
                t = time.perf_counter()
                out = real_step(*a, **k)
                step_times.append(time.perf_counter() - t)
            return out

        inner.step = timed_step
        gen = torch.Generator(device=fabric.device).manual_seed(0)
        shape = (cfg.train.micro_batch_size, cfg.data.seq_len + 1)

        def step():
            micro = [torch.randint(0, mc.padded_vocab_size, shape, device=fabric.device, generator=gen)
                     for _ in range(spec["micro_batches"])]
            t = time.perf_counter()
            loss = train_step(fabric, model, opt, micro, o.grad_clip).loss  # .loss syncs (an all-reduce to float)
            if cuda:
                torch.cuda.synchronize()
            return loss, time.perf_counter() - t

        walls, loss = [], None
        for i in range(spec["warmup"] + spec["steps"]):
            if i and time.monotonic() + max(walls) > deadline:
                break
            loss, wall = step()
            walls.append(wall)
        timed = walls[spec["warmup"]:]
        opt_ms = [(s.elapsed_time(e) if cuda else s * 1e3) for s, e in
                  (step_times if cuda else [(x, None) for x in step_times])][spec["warmup"]:]
        tokens = spec["micro_batches"] * shape[0] * cfg.data.seq_len
        out = {"model": mc.name, "strategy": plan.strategy, "optimizer": spec["optimizer"],
               "optimizer_class": type(inner).__name__, "implementation": getattr(inner, "implementation", None),
               "fused": inner.param_groups[0].get("fused"), "compile": plan.compile,
               "seq_len": cfg.data.seq_len, "micro_batch": shape[0], "micro_batches": spec["micro_batches"],
               "steps_timed": len(timed), "first_step_s": round(walls[0], 3), "final_loss": loss,
               "optimizer_state_bytes": optimizer_state_bytes(inner),
               "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None}
        if timed:
            s_step = statistics.median(timed)
            tps = tokens / s_step
            peak = metrics.peak_flops(fabric.device, peak_flops)
            out.update(s_per_step=s_step, tokens_per_s=tps, optimizer_step_ms=statistics.median(opt_ms),
                       compile_s=round(walls[0] - s_step, 3) if plan.compile else None,
                       mfu=metrics.mfu(models.flops_per_token(mc, cfg.data.seq_len), tps, peak, 1))
        if spec["part"] == "memory":
            key = spec["optimizer"]
            b = memory_table.per_gpu_bytes(memory_table.fsdp_units(mc), 1)
            act = memory_table.activation_bytes(mc, cfg.data.seq_len, cfg.train.micro_batch_size)
            out["estimate_bytes"] = memory_table.static_bytes(b, key) + act
            out["estimate_parts"] = {"weights": b["weights"], "grads": b["grads"], "optimizer_state": b[key],
                                     "transient": b["transient"], "activations": act}
            if out["max_memory_allocated"] is not None:
                out["measured_over_estimate"] = out["max_memory_allocated"] / out["estimate_bytes"]
        return out
    finally:
        strategy.end_process_group(fabric)


def child_run(spec: dict, seconds: float, peak_flops: float | None) -> dict:
    """A CUDA run in its own process (clean peak-memory counters, nothing left allocated), killed past `seconds`."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--one", json.dumps({**spec, "seconds": seconds})]
    if peak_flops:
        cmd += ["--peak-flops", str(peak_flops)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {seconds + 30:.0f} s (the part's time ran out)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _in_process(spec: dict, seconds: float, peak_flops: float | None) -> dict:
    """A --smoke run in this process; Lightning's one-process group leaves its address in the environment."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                            "NODE_RANK")}
    try:
        return train_run(spec, seconds, peak_flops)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------ report
def ratios(runs: list[dict]) -> dict:
    """Adam-mini / AdamW (and bf16 m / AdamW) per strategy: tokens/s, optimizer-step ms, peak memory."""
    out = {}
    by = {(r.get("strategy"), r.get("optimizer")): r for r in runs if "error" not in r}
    for (strat, name), r in by.items():
        base = by.get((strat, "adamw"))
        if name == "adamw" or base is None:
            continue
        cell = {}
        for key in ("tokens_per_s", "optimizer_step_ms", "max_memory_allocated"):
            if r.get(key) and base.get(key):
                cell[key] = r[key] / base[key]
        out[f"{strat}: {name} / adamw"] = cell
    return out


def table(result: dict) -> str:
    lines = [f"gpu_check on {result['device']} (torch {result['torch']}){' --smoke' if result['smoke'] else ''}: "
             f"{result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget"]
    for name, part in result["parts"].items():
        lines += ["", f"{name}:"]
        for r in part["runs"]:
            if "error" in r:
                lines.append(f"  {r['run']}: FAILED {r['error']}")
            elif name == "optim":
                lines.append(f"  {r['run']:<22} {r['implementation']:<16} max rel err {r['max_rel_err']:.2e}")
            else:
                gib = (r["max_memory_allocated"] or 0) / 2 ** 30
                tps = f"{r['tokens_per_s']:>10,.0f} tok/s" if "tokens_per_s" in r else "   (no timed step)"
                mfu = f" MFU {r['mfu']:.1%}" if r.get("mfu") else ""
                opt = f" opt step {r['optimizer_step_ms']:.2f} ms" if "optimizer_step_ms" in r else ""
                est = f" | estimate {r['estimate_bytes'] / 2 ** 30:.2f} GiB" if "estimate_bytes" in r else ""
                lines.append(f"  {r['run']:<26} {tps}{mfu}{opt} | peak {gib:.2f} GiB{est} | first step "
                             f"{r['first_step_s']:.1f} s")
        for s in part["skipped"]:
            lines.append(f"  {s['run']}: skipped, {s['why']}")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: " + ", ".join(f"{m} {x:.3f}" for m, x in v.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(train_run(spec, spec["seconds"], args.peak_flops)), flush=True)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print(f"benchmarks.gpu_check needs a CUDA GPU; torch {torch.__version__} sees none (CUDA build: "
              f"{torch.version.cuda}). `--smoke` runs the same code on CPU. Nothing was measured.", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    t_start = time.monotonic()
    end = t_start + args.budget_s
    chosen = [p for p in PARTS if p in args.parts]
    parts: dict[str, Part] = {}
    for i, name in enumerate(chosen):
        share = SHARE[name] / sum(SHARE[p] for p in chosen[i:])  # of what is left: unused time rolls over
        now = time.monotonic()
        deadline = end if args.smoke else now + share * (end - now)
        part = parts[name] = Part(name, deadline, 0.0 if args.smoke else FIRST_GUESS_S[name])
        if name == "optim":
            try:
                optim_part(part, device, args.smoke)
            except Exception as exc:  # e.g. the process group did not start: the other parts still run
                part.runs.append({"run": "setup", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
            continue
        runner = _in_process if args.smoke else child_run
        for spec in (app_specs if name == "app" else memory_specs)(args.smoke):
            label = f"{spec['strategy'] or 'recipe'}, {spec['optimizer']}"
            part.run(label, lambda left, s=spec: runner(s, left, args.peak_flops))
    runs = [r for p in parts.values() for r in p.runs]
    result = {"benchmark": "gpu_check", "smoke": args.smoke,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "budget_s": args.budget_s, "wall_s": round(time.monotonic() - t_start, 1),
              "parts": {k: p.report() for k, p in parts.items()},
              "ratios": ratios([r for r in runs if r.get("run", "").split(",")[0] in ("fsdp", "fsdp2")])}
    print(table(result))
    line = json.dumps(result)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
