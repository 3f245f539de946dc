"""AdamW vs Adam-mini: validation loss over tokens for the same small Llama on C4, CPU, each at its best lr.

Both optimizers train the same model from the same initial weights on bit-identical batches (same
seed, same data order, same tokens; every run records a sha256 of its initial weights, of every
training batch it consumed and of the validation batches, and the summary refuses to compare runs
whose hashes differ). Hyper-parameters are AdamW's usual ones for both: betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 (matrices only), linear warm-up then cosine to 10% of peak (`pretrain.schedule`),
gradient clipping at 1.0. The peak lr is tuned over a grid for each optimizer; when an optimizer's
best lr is at an edge of the grid, the grid is extended on that side (up to `--max-extend` times).
The best lr of each is then re-run with extra seeds (`--confirm-seeds`) to show the seed-to-seed spread.

Data: /work/shared/corpus/c4 tokenised with the demo tokenizer (data/sample/tokenizer.model, 4,096
pieces, so that the output layer of a small model does not dominate); prepared on first use into
out/bench_optcmp/c4-demo4096 with `python -m data.prepare`. Skips (exit 0, one message) when the
corpus is absent.

Each run is a subprocess of this script (one torch thread each, `--jobs` at a time); finished runs are
kept as JSON under --work-dir and reused when the settings match (re-running resumes an interrupted
grid). Writes benchmarks/results/optimizer_comparison.{json,md,png}; prints a table and, last, one
JSON line.

    python benchmarks/optimizer_comparison.py                 # the full grid (~40 min on 2 busy cores)
    python benchmarks/optimizer_comparison.py --steps 4 --eval-interval 2 --lrs 1e-3 --max-extend 0 \
        --confirm-seeds 0 --results-dir /tmp/optcmp --work-dir /tmp/optcmp/runs   # smoke test
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _repo_relative(path: Path) -> str:
    """A path as written into results files: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS = Path(os.environ.get("AMP_SHARED", ROOT.parent / "shared")) / "corpus" / "c4"
DEMO_TOKENIZER = ROOT / "data" / "sample" / "tokenizer.model"
OPTIMIZERS = ("adamw", "adam_mini")
LABEL = {"adamw": "AdamW", "adam_mini": "Adam-mini"}
# A 1.8 M-parameter Llama (4 layers, d 128, GQA 4 heads / 2 groups, SwiGLU 352, vocab 4,096): small
# enough for ~1 M tokens per run on a shared 2-core CPU.
MODEL = dict(base="tiny", overrides=dict(n_layer=4, n_embd=128, n_head=4, n_query_groups=2, head_size=32,
                                         intermediate_size=352, vocab_size=4096, block_size=256))
HP = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1)


# ---------------------------------------------------------------------------------------------- one run
def _sha(h, t) -> None:
    h.update(t.contiguous().numpy().tobytes())


def train_one(spec: dict) -> dict:
    """Train one (optimizer, lr, seed) run as `spec` says; return its curves and the identity hashes."""
    import torch
    import torch.nn.functional as F

    import models
    from data.loader import build_loader, val_batches
    from optim.build import build_optimizer
    from pretrain.schedule import lr_at, set_lr

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    config = models.get_config(spec["model"]["base"], **spec["model"]["overrides"])
    torch.manual_seed(spec["seed"])
    model = models.build_model(config, device="cpu")
    models.init_model(model, config.n_layer, config.n_embd)
    h_init = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h_init.update(name.encode())
        _sha(h_init, p)

    optimizer = build_optimizer(model, config, spec["optimizer"], lr=spec["lr"], betas=tuple(HP["betas"]),
                                eps=HP["eps"], weight_decay=HP["weight_decay"])
    train = iter(build_loader(spec["data_dir"], "train", spec["seq_len"], spec["batch_size"], seed=spec["seed"],
                              num_workers=0, shuffle=True))
    val = val_batches(spec["data_dir"], spec["seq_len"], spec["batch_size"], spec["val_batches"])
    h_val = hashlib.sha256()
    for b in val:
        _sha(h_val, b)

    def loss_of(batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        total = sum(float(loss_of(b)) for b in val) / len(val)
        model.train()
        return total

    steps, warmup, tokens_per_step = spec["steps"], spec["warmup_steps"], spec["batch_size"] * spec["seq_len"]
    h_train = hashlib.sha256()
    val_curve = [[0, validate()]]
    train_curve, t0 = [], time.perf_counter()
    diverged = False
    for step in range(1, steps + 1):
        set_lr(optimizer, lr_at(step, spec["lr"], spec["lr"] * HP["min_lr_ratio"], warmup, steps))
        batch = next(train)
        _sha(h_train, batch)
        loss = loss_of(batch)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_curve.append([step * tokens_per_step, float(loss.detach()), float(gnorm)])
        if not math.isfinite(float(loss)):
            diverged = True
            val_curve.append([step * tokens_per_step, float("nan")])
            break
        if step % spec["eval_interval"] == 0 or step == steps:
            val_curve.append([step * tokens_per_step, validate()])
            print(f"[{spec['optimizer']} lr={spec['lr']:g} seed={spec['seed']}] step {step}/{steps} "
                  f"val {val_curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return dict(spec=spec, params=models.count_params(config), fast_path=bool(getattr(optimizer, "fast", False)),
                val=val_curve, train=train_curve, final_val=val_curve[-1][1], diverged=diverged,
                sha256_init=h_init.hexdigest(), sha256_train_batches=h_train.hexdigest(),
                sha256_val_batches=h_val.hexdigest(), seconds=time.perf_counter() - t0,
                torch_threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------- grid
def run_name(spec: dict) -> str:
    return f"{spec['optimizer']}-lr{spec['lr']:.3g}-seed{spec['seed']}"


def run_grid(specs: list[dict], work_dir: Path, jobs: int) -> dict[str, dict]:
    """Run the specs as subprocesses, `jobs` at a time; reuse finished runs with identical specs."""
    work_dir.mkdir(parents=True, exist_ok=True)
    done, todo = {}, []
    for spec in specs:
        path = work_dir / f"{run_name(spec)}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec["spec"] == json.loads(json.dumps(spec)):
                done[run_name(spec)] = rec
                print(f"reusing {path}", flush=True)
                continue
        todo.append(spec)
    running: list[tuple[subprocess.Popen, dict, Path]] = []
    while todo or running:
        while todo and len(running) < jobs:
            spec = todo.pop(0)
            out = work_dir / f"{run_name(spec)}.json"
            log = open(work_dir / f"{run_name(spec)}.log", "w")
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", str(out)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((proc, spec, out))
            print(f"started {run_name(spec)}", flush=True)
        time.sleep(2)
        for item in list(running):
            proc, spec, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"error: run {run_name(spec)} failed (exit {proc.returncode}); see "
                                 f"{work_dir / (run_name(spec) + '.log')}")
            rec = json.loads(out.read_text())
            done[run_name(spec)] = rec
            print(f"finished {run_name(spec)}: final val {rec['final_val']:.4f} in {rec['seconds']:.0f}s", flush=True)
    return done


def ensure_data(data_dir: Path) -> None:
    if (data_dir / "train" / "manifest.json").is_file() and (data_dir / "val" / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "data.prepare", "--out", str(data_dir), "--tokenizer", str(DEMO_TOKENIZER),
           "--train", str(CORPUS / "c4-train.*.json.gz"), "--val", str(CORPUS / "c4-validation.*.json.gz"),
           "--workers", "2", "--no-progress"]
    print("preparing:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def best_of(results: dict[str, dict], opt: str, seed: int) -> dict:
    runs = [r for r in results.values() if r["spec"]["optimizer"] == opt and r["spec"]["seed"] == seed]
    finite = [r for r in runs if math.isfinite(r["final_val"])]
    return min(finite, key=lambda r: r["final_val"])


def grid_lrs(results: dict[str, dict], opt: str, seed: int) -> list[float]:
    return sorted(r["spec"]["lr"] for r in results.values() if r["spec"]["optimizer"] == opt and r["spec"]["seed"] == seed)


def check_identical(results: dict[str, dict]) -> None:
    """Every run must have started from the same weights (per seed) and seen the same batches (per seed)."""
    for key in ("sha256_init", "sha256_val_batches", "sha256_train_batches"):
        by_seed: dict[int, set] = {}
        for r in results.values():
            if r["diverged"] and key == "sha256_train_batches":
                continue  # stopped early: fewer batches hashed
            by_seed.setdefault(r["spec"]["seed"], set()).add(r[key])
        bad = {s: v for s, v in by_seed.items() if len(v) != 1}
        if bad:
            raise SystemExit(f"error: runs with the same seed differ in {key}: {bad}")


# ---------------------------------------------------------------------------------------------- report
def summarise(results: dict[str, dict], args, seed: int) -> dict:
    best = {opt: best_of(results, opt, seed) for opt in OPTIMIZERS}
    w, m = best["adamw"], best["adam_mini"]
    diff = m["final_val"] - w["final_val"]  # < 0: Adam-mini better
    seeds = {}
    for opt in OPTIMIZERS:
        lr = best[opt]["spec"]["lr"]
        vals = [r["final_val"] for r in results.values() if r["spec"]["optimizer"] == opt and r["spec"]["lr"] == lr]
        seeds[opt] = sorted(vals)
    paired = []
    for r in results.values():
        if r["spec"]["optimizer"] == "adam_mini" and r["spec"]["lr"] == m["spec"]["lr"]:
            partner = [q for q in results.values() if q["spec"]["optimizer"] == "adamw" and
                       q["spec"]["lr"] == w["spec"]["lr"] and q["spec"]["seed"] == r["spec"]["seed"]]
            if partner:
                paired.append(r["final_val"] - partner[0]["final_val"])
    spread = max((max(v) - min(v) for v in seeds.values() if len(v) > 1), default=None)
    winner = "Adam-mini" if diff < 0 else "AdamW"
    loser = "AdamW" if diff < 0 else "Adam-mini"
    sentence = (f"At its best lr, {winner} ends {abs(diff):.4f} nats lower in validation loss than {loser} "
                f"({LABEL['adam_mini']} {m['final_val']:.4f} at lr {m['spec']['lr']:g} vs {LABEL['adamw']} "
                f"{w['final_val']:.4f} at lr {w['spec']['lr']:g}, {abs(diff) / w['final_val']:.2%}) after "
                f"{w['val'][-1][0]:,} tokens")
    if paired and len(paired) > 1:
        same_sign = all(p < 0 for p in paired) or all(p > 0 for p in paired)
        sentence += (f"; over {len(paired)} seeds the paired difference (Adam-mini - AdamW) is "
                     f"{', '.join(f'{p:+.4f}' for p in paired)}, mean {sum(paired) / len(paired):+.4f}"
                     f" ({'the same sign on every seed' if same_sign else 'the sign changes with the seed: on par'})")
    if spread is not None:
        sentence += f"; seed-to-seed spread at a fixed lr is up to {spread:.4f} nats"
    mixed = len(paired) > 1 and not (all(p < 0 for p in paired) or all(p > 0 for p in paired))
    if mixed or abs(diff) < 0.01:
        sentence += ". Within noise: on par, as the paper claims (on-par or better)."
    elif diff < 0:
        sentence += ". Adam-mini is better here, consistent with the paper's on-par-or-better claim."
    else:
        sentence += ". AdamW is better here: this run does not reproduce the paper's on-par-or-better claim at this scale."
    return dict(best=best, diff=diff, seeds=seeds, paired=paired, spread=spread, winner=winner, sentence=sentence)


def table(results: dict[str, dict], summary: dict, seed: int) -> str:
    lines = []
    lines.append("### lr grid: final validation loss (seed %d)" % seed)
    lines.append("")
    lines.append("| optimizer | " + " | ".join(f"lr {lr:g}" for lr in sorted({r['spec']['lr'] for r in results.values()
                                                                               if r['spec']['seed'] == seed})) + " |")
    all_lrs = sorted({r["spec"]["lr"] for r in results.values() if r["spec"]["seed"] == seed})
    lines.append("|---|" + "---:|" * len(all_lrs))
    for opt in OPTIMIZERS:
        cells = []
        for lr in all_lrs:
            r = [q for q in results.values() if q["spec"]["optimizer"] == opt and q["spec"]["lr"] == lr and q["spec"]["seed"] == seed]
            if not r:
                cells.append("—")
            else:
                v = r[0]["final_val"]
                s = "diverged" if not math.isfinite(v) else f"{v:.4f}"
                cells.append(f"**{s}**" if r[0] is summary["best"][opt] else s)
        lines.append(f"| {LABEL[opt]} | " + " | ".join(cells) + " |")
    lines.append("")
    w, m = summary["best"]["adamw"], summary["best"]["adam_mini"]
    lines.append(f"### validation loss over tokens, each at its best lr (AdamW {w['spec']['lr']:g}, "
                 f"Adam-mini {m['spec']['lr']:g}; seed {seed})")
    lines.append("")
    lines.append("| tokens | AdamW | Adam-mini | Adam-mini − AdamW |")
    lines.append("|---:|---:|---:|---:|")
    for (t, lw), (_, lm) in zip(w["val"], m["val"]):
        lines.append(f"| {t:,} | {lw:.4f} | {lm:.4f} | {lm - lw:+.4f} |")
    if any(len(v) > 1 for v in summary["seeds"].values()):
        lines.append("")
        lines.append("### final validation loss at the best lr, over seeds")
        lines.append("")
        lines.append("| optimizer | lr | seeds | final val losses | mean |")
        lines.append("|---|---:|---:|---|---:|")
        for opt in OPTIMIZERS:
            v = summary["seeds"][opt]
            lines.append(f"| {LABEL[opt]} | {summary['best'][opt]['spec']['lr']:g} | {len(v)} | "
                         f"{', '.join(f'{x:.4f}' for x in v)} | {sum(v) / len(v):.4f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], summary: dict, seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adamw": "tab:blue", "adam_mini": "tab:red"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for opt in OPTIMIZERS:
        for r in sorted((q for q in results.values() if q["spec"]["optimizer"] == opt and q["spec"]["seed"] == seed),
                        key=lambda q: q["spec"]["lr"]):
            best = r is summary["best"][opt]
            xs = [t / 1e6 for t, v in r["val"][1:] if math.isfinite(v)]
            ys = [v for _, v in r["val"][1:] if math.isfinite(v)]
            ax.plot(xs, ys, color=colors[opt], lw=2.2 if best else 0.8, alpha=1.0 if best else 0.35, marker="o" if best else None,
                    ms=3, label=f"{LABEL[opt]} lr {r['spec']['lr']:g}" + (" (best)" if best else ""))
        lrs = grid_lrs(results, opt, seed)
        finals = [next(q for q in results.values() if q["spec"]["optimizer"] == opt and q["spec"]["lr"] == lr and
                       q["spec"]["seed"] == seed)["final_val"] for lr in lrs]
        ax2.plot(lrs, [f if math.isfinite(f) else float("nan") for f in finals], color=colors[opt], marker="o", label=LABEL[opt])
        extra = [q["final_val"] for q in results.values() if q["spec"]["optimizer"] == opt and q["spec"]["seed"] != seed]
        if extra:
            ax2.scatter([summary["best"][opt]["spec"]["lr"]] * len(extra), extra, color=colors[opt], marker="x",
                        label=f"{LABEL[opt]} other seeds")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss over tokens (best lr bold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("peak learning rate")
    ax2.set_ylabel("final validation loss")
    ax2.set_title("lr sweep")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    r0 = summary["best"]["adamw"]
    fig.suptitle(f"AdamW vs Adam-mini, {r0['params'] / 1e6:.2f} M-param Llama, C4 (4,096-piece tokenizer), "
                 f"seq {r0['spec']['seq_len']}, batch {r0['spec']['batch_size']}, {r0['spec']['steps']} steps", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=str(ROOT / "out" / "bench_optcmp" / "c4-demo4096"))
    ap.add_argument("--work-dir", default=str(ROOT / "out" / "bench_optcmp" / "runs"))
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="comma-separated peak lrs, the same for both optimizers")
    ap.add_argument("--max-extend", type=int, default=2, help="extend the grid (x2 or /2) this many times per side "
                                                              "when an optimizer's best lr is at its edge")
    ap.add_argument("--confirm-seeds", type=int, default=1, help="extra seeds for each optimizer's best lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    args = ap.parse_args()

    if args.worker:
        rec = train_one(json.loads(args.worker))
        tmp = Path(args.worker_out + ".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, args.worker_out)
        return

    if not CORPUS.is_dir() or not list(CORPUS.glob("c4-train.*.json.gz")):
        print(f"skipped: the shared C4 corpus is not at {CORPUS} (set AMP_SHARED to the shared/ folder)")
        print(json.dumps({"benchmark": "optimizer_comparison", "skipped": True, "reason": f"no corpus at {CORPUS}"}))
        return
    t_start = time.time()
    data_dir = Path(args.data_dir)
    ensure_data(data_dir)
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)

    def spec(opt: str, lr: float, seed: int) -> dict:
        return dict(optimizer=opt, lr=float(f"{lr:.6g}"), seed=seed, model=MODEL, data_dir=str(data_dir),
                    seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                    warmup_steps=args.warmup_steps, eval_interval=args.eval_interval,
                    val_batches=args.val_batches, threads=1)

    lrs = [float(x) for x in args.lrs.split(",")]
    results = run_grid([spec(o, lr, args.seed) for o in OPTIMIZERS for lr in lrs], work_dir, args.jobs)
    for _ in range(args.max_extend):
        new = []
        for opt in OPTIMIZERS:
            grid = grid_lrs(results, opt, args.seed)
            b = best_of(results, opt, args.seed)["spec"]["lr"]
            if len(grid) > 1 and b == grid[-1]:
                new.append(spec(opt, grid[-1] * 2, args.seed))
            elif len(grid) > 1 and b == grid[0]:
                new.append(spec(opt, grid[0] / 2, args.seed))
        if not new:
            break
        print("best lr at a grid edge; extending:", ", ".join(run_name(s) for s in new), flush=True)
        results.update(run_grid(new, work_dir, args.jobs))
    confirm = [spec(opt, best_of(results, opt, args.seed)["spec"]["lr"], args.seed + k)
               for k in range(1, args.confirm_seeds + 1) for opt in OPTIMIZERS]
    if confirm:
        results.update(run_grid(confirm, work_dir, args.jobs))
    check_identical(results)

    summary = summarise(results, args, args.seed)
    md = table(results, summary, args.seed)
    png = results_dir / "optimizer_comparison.png"
    plot(results, summary, args.seed, png)
    r0 = summary["best"]["adamw"]
    cmd = "python benchmarks/optimizer_comparison.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    header = (f"Model: litgpt Llama, {r0['params']:,} parameters ({json.dumps(MODEL['overrides'])}); data: shared C4 "
              f"tokenised with data/sample/tokenizer.model (4,096 pieces); {args.steps} steps x {args.batch_size} x "
              f"{args.seq_len} = {args.steps * args.batch_size * args.seq_len:,} tokens per run; warm-up "
              f"{args.warmup_steps} steps, cosine to 10% of peak; betas (0.9, 0.95), eps 1e-8, weight decay 0.1, "
              f"grad clip 1.0; val = the first {args.val_batches} x {args.batch_size} x {args.seq_len} tokens of "
              f"the C4 validation file. All runs of a seed share sha256 of initial weights and of every batch "
              f"(checked). CPU, 1 torch thread per run, {args.jobs} runs at a time on a shared machine.")
    text = f"# AdamW vs Adam-mini (`{cmd}`)\n\n{header}\n\n{md}\n\n**{summary['sentence']}**\n\nPlot: `{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}`\n"
    print(text)
    out = {"benchmark": "optimizer_comparison", "command": cmd, "params": r0["params"], "model": MODEL,
           "tokens_per_run": args.steps * args.batch_size * args.seq_len,
           "best_lr": {o: summary["best"][o]["spec"]["lr"] for o in OPTIMIZERS},
           "final_val_at_best_lr": {o: round(summary["best"][o]["final_val"], 5) for o in OPTIMIZERS},
           "adam_mini_minus_adamw": round(summary["diff"], 5), "winner": summary["winner"],
           "paired_diffs_over_seeds": [round(p, 5) for p in summary["paired"]],
           "seed_spread": None if summary["spread"] is None else round(summary["spread"], 5),
           "grid": {o: {f"{r['spec']['lr']:g}": (round(r["final_val"], 5) if math.isfinite(r["final_val"]) else None)
                        for r in results.values() if r["spec"]["optimizer"] == o and r["spec"]["seed"] == args.seed}
                    for o in OPTIMIZERS},
           "sentence": summary["sentence"], "wall_s": round(time.time() - t_start), "plot": _repo_relative(png)}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "optimizer_comparison.md").write_text(text)
    full = dict(out, runs={k: {kk: vv for kk, vv in r.items() if kk != "train"} for k, r in sorted(results.items())})
    (results_dir / "optimizer_comparison.json").write_text(json.dumps(full, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
