"""AdamW vs Adam-mini layouts: validation loss over tokens for small Llamas on C4, CPU, each at its best lr.

Every variant (AdamW; Adam-mini with today's blocks; Adam-mini with per-element embedding blocks; Adam-mini
with a bf16 first moment) trains the same model from the same initial weights on bit-identical batches:
every run records a sha256 of its initial weights, of every training batch and of the validation batches,
and the summary refuses to compare runs whose hashes differ. A run is the app's own code: the model and
its initialisation (`models`), the optimizer (`optim.build`), `pretrain.step.train_step` (loss, clipping,
update) and `pretrain.step.validate` on Fabric (one CPU device), with the app's schedule (linear warm-up,
cosine to 10% of peak). Hyper-parameters are AdamW's usual ones for every variant: betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 (matrices only), gradient clipping at 1.0. The peak lr is tuned over a grid per
variant; when a best lr is at an edge of the grid the grid is extended on that side (`--max-extend`
times); the best lr of each variant is then re-run with extra seeds (`--confirm-seeds`).

Shapes (`--shape`):
- `small4096`: 4 layers, d 128, vocab 4,096 (the demo tokenizer): 1.79 M parameters, 59 % of them in the
  embedding and output matrices; 200 steps x 16 x 256 = 819,200 tokens (0.46 tokens per parameter).
- `wide1024`: 4 layers, d 192, vocab 1,024 (a tokenizer trained like the demo one, on the same sample
  text, `--vocab-size 1024`): 2.02 M parameters, 19 % in the embedding and output matrices; 226 steps x
  16 x 256 = 925,696 tokens (0.46 tokens per parameter, like the first shape).

Data: the shared C4 sample (../shared/corpus/c4), tokenised on first use into out/bench_optcmp/. Skips
(exit 0, one message) when the corpus is absent. Each run is a subprocess (one torch thread, `--jobs` at a
time); finished runs are kept as JSON under --work-dir and reused when their settings match, so a
re-run resumes an interrupted grid. Writes benchmarks/results/optimizer_comparison-<shape>[-<tag>].{json,md,png};
prints a table and, last, one JSON line.

    python -m benchmarks.optimizer_comparison --shape small4096 --variants adamw,adam_mini,adam_mini_elements
    python -m benchmarks.optimizer_comparison --shape small4096 --variants adam_mini,adam_mini_bf16m \\
        --lrs 4e-3 --max-extend 0 --tag bf16m                       # bf16 vs fp32 m at the same lr, 2 seeds
    python -m benchmarks.optimizer_comparison --shape small4096 --steps 4 --eval-interval 2 --lrs 1e-3 \\
        --max-extend 0 --confirm-seeds 0 --results-dir /tmp/optcmp --work-dir /tmp/optcmp/runs   # smoke test
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

from amp_common.atomic import atomic_write_text
from data.cli import Parser
from data.tokenizer import SAMPLE_TOKENIZER, SAMPLE_TRAIN

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("AMP_SHARED", ROOT.parent / "shared")) / "corpus" / "c4"
WORK = ROOT / "out" / "bench_optcmp"

_LLAMA4 = dict(n_layer=4, n_head=4, n_query_groups=2, block_size=256)
SHAPES = {
    "small4096": dict(overrides=dict(_LLAMA4, n_embd=128, head_size=32, intermediate_size=352, vocab_size=4096),
                      vocab=4096, steps=200),
    "wide1024": dict(overrides=dict(_LLAMA4, n_embd=192, head_size=48, intermediate_size=512, vocab_size=1024),
                     vocab=1024, steps=226),
}
VARIANTS = {
    "adamw": dict(name="adamw"),
    "adam_mini": dict(name="adam_mini"),
    "adam_mini_elements": dict(name="adam_mini", embedding_blocks="elements"),
    "adam_mini_whole_v": dict(name="adam_mini", value_blocks="whole"),
    "adam_mini_bf16m": dict(name="adam_mini", momentum_dtype="bfloat16"),
}
LABEL = {"adamw": "AdamW", "adam_mini": "Adam-mini", "adam_mini_elements": "Adam-mini, elements embeddings",
         "adam_mini_whole_v": "Adam-mini, whole V", "adam_mini_bf16m": "Adam-mini, bf16 m"}
BASELINE = "adamw"
HP = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1)


def _repo_relative(path: Path) -> str:
    """A path as written into results files: relative to the repository (`../shared/...` outside it), never the
    absolute folder of the machine that ran the benchmark."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def results_runs(results: dict) -> dict:
    """The runs as the results JSON records them: without their loss curves' raw training records, with
    repository-relative data folders."""
    out = {}
    for k, r in sorted(results.items()):
        run = {kk: vv for kk, vv in r.items() if kk != "train"}
        if "data_dir" in run.get("spec", {}):
            run["spec"] = dict(run["spec"], data_dir=_repo_relative(run["spec"]["data_dir"]))
        out[k] = run
    return out


# ---------------------------------------------------------------------------------------------- one run
def _sha(h, t) -> None:
    h.update(t.contiguous().numpy().tobytes())


def train_one(spec: dict) -> dict:
    """Train one (variant, lr, seed) run as `spec` says, with the app's code; return its curves and hashes."""
    import lightning as L
    import torch

    import models
    from data.loader import build_loader, val_batches
    from optim.build import build_optimizer
    from pretrain.schedule import lr_at, set_lr
    from pretrain.step import NonFiniteLossError, train_step, validate

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    config = models.get_config("tiny", **spec["model"])
    model = models.build_model(config, device="cpu")
    models.init_model(model, config.n_layer, config.n_embd, seed=spec["seed"])
    h_init = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h_init.update(name.encode())
        _sha(h_init, p)
    options = {k: v for k, v in VARIANTS[spec["variant"]].items() if k != "name"}
    optimizer = build_optimizer(model, config, VARIANTS[spec["variant"]]["name"], lr=spec["lr"],
                                betas=tuple(HP["betas"]), eps=HP["eps"], weight_decay=HP["weight_decay"], **options)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model, optimizer = fabric.setup_module(model), fabric.setup_optimizers(optimizer)
    train = iter(build_loader(spec["data_dir"], "train", spec["seq_len"], spec["batch_size"], seed=spec["seed"],
                              num_workers=0, shuffle=True))
    val = val_batches(spec["data_dir"], spec["seq_len"], spec["batch_size"], spec["val_batches"])
    h_val = hashlib.sha256()
    for b in val:
        _sha(h_val, b)
    val_weighted = [(b, torch.ones(len(b))) for b in val]

    steps, warmup, tokens_per_step = spec["steps"], spec["warmup_steps"], spec["batch_size"] * spec["seq_len"]
    h_train = hashlib.sha256()
    val_curve = [[0, validate(fabric, model, val_weighted)]]
    train_curve, t0, diverged = [], time.perf_counter(), False
    for step in range(1, steps + 1):
        set_lr(optimizer, lr_at(step, spec["lr"], spec["lr"] * HP["min_lr_ratio"], warmup, steps))
        batch = next(train)
        _sha(h_train, batch)
        try:
            out = train_step(fabric, model, optimizer, [batch], HP["grad_clip"])
        except NonFiniteLossError:
            diverged = True
            val_curve.append([step * tokens_per_step, float("nan")])
            break
        train_curve.append([step * tokens_per_step, out.loss, out.grad_norm])
        if step % spec["eval_interval"] == 0 or step == steps:
            val_curve.append([step * tokens_per_step, validate(fabric, model, val_weighted)])
            print(f"[{run_name(spec)}] step {step}/{steps} val {val_curve[-1][1]:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return dict(spec=spec, params=models.count_params(config), implementation=getattr(optimizer.optimizer,
                "implementation", "torch"), val=val_curve, train=train_curve, final_val=val_curve[-1][1],
                diverged=diverged, sha256_init=h_init.hexdigest(), sha256_train_batches=h_train.hexdigest(),
                sha256_val_batches=h_val.hexdigest(), seconds=time.perf_counter() - t0,
                torch_threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------- grid
def run_name(spec: dict) -> str:
    return f"{spec['variant']}-lr{spec['lr']:.3g}-seed{spec['seed']}"


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
            with open(work_dir / f"{run_name(spec)}.log", "w") as log:  # the child keeps its own handle
                proc = subprocess.Popen([sys.executable, "-m", "benchmarks.optimizer_comparison", "--worker",
                                         json.dumps(spec), "--worker-out", str(out)],
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


def ensure_data(shape: str) -> tuple[Path, Path]:
    """(tokenizer, prepared data folder) of a shape, made on first use."""
    vocab = SHAPES[shape]["vocab"]
    tokenizer = SAMPLE_TOKENIZER
    if vocab != 4096:  # trained like the demo tokenizer (data/sample/SOURCES.md), with another vocabulary size
        tokenizer = WORK / f"tokenizer-{vocab}" / "tokenizer.model"
        if not tokenizer.is_file():
            cmd = [sys.executable, "-m", "data.tokenizer", "--input", str(SAMPLE_TRAIN), "--out", str(tokenizer),
                   "--vocab-size", str(vocab), "--seed", "0", "--input-sentence-size", "300000", "--num-threads", "2"]
            print("training the tokenizer:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
    data_dir = WORK / f"c4-{vocab}"
    if not (data_dir / "train" / "manifest.json").is_file() or not (data_dir / "val" / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "data.prepare", "--out", str(data_dir), "--tokenizer", str(tokenizer),
               "--train", str(CORPUS / "c4-train.*.json.gz"), "--val", str(CORPUS / "c4-validation.*.json.gz"),
               "--workers", "2", "--no-progress"]
        print("preparing:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return tokenizer, data_dir


def runs_of(results: dict[str, dict], variant: str, seed: int | None = None, lr: float | None = None) -> list[dict]:
    return [r for r in results.values() if r["spec"]["variant"] == variant
            and (seed is None or r["spec"]["seed"] == seed) and (lr is None or r["spec"]["lr"] == lr)]


def best_of(results: dict[str, dict], variant: str, seed: int) -> dict:
    finite = [r for r in runs_of(results, variant, seed) if math.isfinite(r["final_val"])]
    return min(finite, key=lambda r: r["final_val"])


def grid_lrs(results: dict[str, dict], variant: str, seed: int) -> list[float]:
    return sorted(r["spec"]["lr"] for r in runs_of(results, variant, seed))


def check_some_converged(results: dict[str, dict], variants: list[str], seed: int, work_dir: Path) -> None:
    """A variant whose every lr diverged has no best lr to extend, confirm or report: say so in one line."""
    for v in variants:
        runs = runs_of(results, v, seed)
        if not any(math.isfinite(r["final_val"]) for r in runs):
            lrs = ", ".join(f"{lr:g}" for lr in sorted(r["spec"]["lr"] for r in runs))
            raise SystemExit(f"error: every lr of {v} diverged ({lrs}); try smaller --lrs (the finished runs in "
                             f"{work_dir} are reused)")


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
def summarise(results: dict[str, dict], variants: list[str], seed: int) -> dict:
    """Per variant: best lr (seed `seed`), finals over seeds at that lr, and the gap to the baseline (AdamW, or
    the first variant): best vs best, paired by seed (each seed is its own initial weights and data order, so
    the pair removes what the seed changes for both), the spread of those paired gaps, and the seed spread of
    the final losses themselves."""
    base = BASELINE if BASELINE in variants else variants[0]
    best = {v: best_of(results, v, seed) for v in variants}
    finals = {v: {r["spec"]["seed"]: r["final_val"] for r in runs_of(results, v, lr=best[v]["spec"]["lr"])}
              for v in variants}
    gaps = {}
    for v in variants:
        if v == base:
            continue
        paired = [finals[v][s] - finals[base][s] for s in sorted(finals[v]) if s in finals[base]]
        final_spread = max((max(f.values()) - min(f.values()) for f in (finals[v], finals[base]) if len(f) > 1),
                           default=None)
        gaps[v] = dict(best_vs_best=best[v]["final_val"] - best[base]["final_val"], paired=paired,
                       mean=sum(paired) / len(paired) if paired else None,
                       spread=max(paired) - min(paired) if len(paired) > 1 else None, final_spread=final_spread)
    sentences = [_verdict(v, base, best, gaps[v]) for v in variants if v != base]
    return dict(baseline=base, best=best, finals=finals, gaps=gaps, sentence=" ".join(sentences))


def _verdict(v: str, base: str, best: dict, g: dict) -> str:
    """One sentence: the mean paired gap, and whether it stands out of the seed-to-seed spread of the gap (the
    same sign on every seed and larger than max - min of the paired gaps), or is within noise."""
    mean = g["mean"] if g["mean"] is not None else g["best_vs_best"]
    text = (f"{LABEL[v]} (lr {best[v]['spec']['lr']:g}) ends {abs(mean):.4f} nats "
            f"{'above' if mean > 0 else 'below'} {LABEL[base]} (lr {best[base]['spec']['lr']:g})")
    if g["spread"] is None:
        return text + " (one seed)."
    text += (f" on average over {len(g['paired'])} seeds (paired: {', '.join(f'{p:+.4f}' for p in g['paired'])}, "
             f"spread {g['spread']:.4f}; the final losses themselves move by up to {g['final_spread']:.4f} "
             f"between seeds)")
    same_sign = all(p > 0 for p in g["paired"]) or all(p < 0 for p in g["paired"])
    return text + (": a consistent gap." if same_sign and abs(mean) > g["spread"] else ": within noise.")


def table(results: dict[str, dict], summary: dict, variants: list[str], seed: int) -> str:
    all_lrs = sorted({r["spec"]["lr"] for r in results.values() if r["spec"]["seed"] == seed})
    lines = [f"### lr grid: final validation loss (seed {seed})", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in all_lrs) + " |", "|---|" + "---:|" * len(all_lrs)]
    for v in variants:
        cells = []
        for lr in all_lrs:
            r = runs_of(results, v, seed, lr)
            if not r:
                cells.append("—")
                continue
            s = "diverged" if not math.isfinite(r[0]["final_val"]) else f"{r[0]['final_val']:.4f}"
            cells.append(f"**{s}**" if r[0] is summary["best"][v] else s)
        lines.append(f"| {LABEL[v]} | " + " | ".join(cells) + " |")
    base = summary["baseline"]
    lines += ["", f"### final validation loss at each variant's best lr, over seeds; gap to {LABEL[base]}", "",
              "| variant | best lr | seeds | final val losses | mean | minus " + LABEL[base] + " (paired) |",
              "|---|---:|---:|---|---:|---|"]
    for v in variants:
        f = summary["finals"][v]
        gap = summary["gaps"].get(v)
        paired = "—" if gap is None else ", ".join(f"{p:+.4f}" for p in gap["paired"])
        lines.append(f"| {LABEL[v]} | {summary['best'][v]['spec']['lr']:g} | {len(f)} | "
                     f"{', '.join(f'{x:.4f}' for _, x in sorted(f.items()))} | {sum(f.values()) / len(f):.4f} | "
                     f"{paired} |")
    lines += ["", f"### validation loss over tokens, each at its best lr (seed {seed})", "",
              "| tokens | " + " | ".join(LABEL[v] for v in variants) + " |", "|---:|" + "---:|" * len(variants)]
    curves = [summary["best"][v]["val"] for v in variants]
    for points in zip(*curves):
        lines.append(f"| {points[0][0]:,} | " + " | ".join(f"{p[1]:.4f}" for p in points) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], summary: dict, variants: list[str], seed: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(VARIANTS, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for v in variants:
        for r in sorted(runs_of(results, v, seed), key=lambda q: q["spec"]["lr"]):
            best = r is summary["best"][v]
            pts = [(t / 1e6, y) for t, y in r["val"][1:] if math.isfinite(y)]
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=colors[v], lw=2.2 if best else 0.8,
                    alpha=1.0 if best else 0.35, marker="o" if best else None, ms=3,
                    label=f"{LABEL[v]} lr {r['spec']['lr']:g}" + (" (best)" if best else ""))
        lrs = grid_lrs(results, v, seed)
        finals = [runs_of(results, v, seed, lr)[0]["final_val"] for lr in lrs]
        ax2.plot(lrs, [f if math.isfinite(f) else float("nan") for f in finals], color=colors[v], marker="o",
                 label=LABEL[v])
        extra = [r["final_val"] for r in runs_of(results, v) if r["spec"]["seed"] != seed]
        if extra:
            ax2.scatter([summary["best"][v]["spec"]["lr"]] * len(extra), extra, color=colors[v], marker="x",
                        label=f"{LABEL[v]}, other seeds")
    ax.set(xlabel="training tokens (M)", ylabel="validation loss (nats/token)", title="validation loss (best lr bold)")
    ax2.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss", title="lr sweep")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    ap = Parser(prog="python -m benchmarks.optimizer_comparison", description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=list(SHAPES), default="small4096")
    ap.add_argument("--variants", default="adamw,adam_mini", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. bf16m)")
    ap.add_argument("--work-dir", default=None, help="finished runs (default out/bench_optcmp/runs-<shape>)")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--lrs", default="2e-3,4e-3,8e-3", help="comma-separated peak lrs, the same for every variant")
    ap.add_argument("--max-extend", type=int, default=2, help="extend the grid (x2 or /2) this many times per side "
                                                              "when a variant's best lr is at its edge")
    ap.add_argument("--confirm-seeds", type=int, default=1, help="extra seeds for each variant's best lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the shape's (0.46 tokens per parameter)")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"argument --variants: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        args.lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        ap.error(f"argument --lrs: expected comma-separated numbers such as 2e-3,4e-3, got {args.lrs!r}")
    if not all(math.isfinite(lr) and lr > 0 for lr in args.lrs):
        ap.error(f"argument --lrs: every lr must be a positive number, got {args.lrs}")
    for name in ("steps", "warmup_steps", "batch_size", "seq_len", "eval_interval", "val_batches", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1 and not (name == "warmup_steps" and value == 0):
            ap.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        atomic_write_text(args.worker_out, json.dumps(train_one(json.loads(args.worker))))
        return 0
    if not CORPUS.is_dir() or not list(CORPUS.glob("c4-train.*.json.gz")):
        print(f"skipped: the shared C4 corpus is not at {CORPUS} (set AMP_SHARED to the shared/ folder)")
        print(json.dumps({"benchmark": "optimizer_comparison", "skipped": True, "reason": f"no corpus at {CORPUS}"}))
        return 0
    t_start = time.time()
    shape, variants = SHAPES[args.shape], args.variants.split(",")
    steps = args.steps or shape["steps"]
    tokenizer, data_dir = ensure_data(args.shape)
    work_dir = Path(args.work_dir or WORK / f"runs-{args.shape}")

    def spec(variant: str, lr: float, seed: int) -> dict:
        return dict(variant=variant, lr=float(f"{lr:.6g}"), seed=seed, model=shape["overrides"],
                    data_dir=str(data_dir), seq_len=args.seq_len, batch_size=args.batch_size, steps=steps,
                    warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, val_batches=args.val_batches,
                    threads=1)

    results = run_grid([spec(v, lr, args.seed) for v in variants for lr in args.lrs], work_dir, args.jobs)
    check_some_converged(results, variants, args.seed, work_dir)
    for _ in range(args.max_extend):
        new = []
        for v in variants:
            grid, b = grid_lrs(results, v, args.seed), best_of(results, v, args.seed)["spec"]["lr"]
            if len(grid) > 1 and b == grid[-1]:
                new.append(spec(v, grid[-1] * 2, args.seed))
            elif len(grid) > 1 and b == grid[0]:
                new.append(spec(v, grid[0] / 2, args.seed))
        if not new:
            break
        print("best lr at a grid edge; extending:", ", ".join(run_name(s) for s in new), flush=True)
        results.update(run_grid(new, work_dir, args.jobs))
    confirm = [spec(v, best_of(results, v, args.seed)["spec"]["lr"], args.seed + k)
               for k in range(1, args.confirm_seeds + 1) for v in variants]
    if confirm:
        results.update(run_grid(confirm, work_dir, args.jobs))
    check_identical(results)
    report(args, results, variants, steps, tokenizer, t_start)
    return 0


def report(args, results: dict, variants: list[str], steps: int, tokenizer: Path, t_start: float) -> None:
    summary = summarise(results, variants, args.seed)
    md = table(results, summary, variants, args.seed)
    name = f"optimizer_comparison-{args.shape}" + (f"-{args.tag}" if args.tag else "")
    results_dir = Path(args.results_dir)
    png = results_dir / f"{name}.png"
    r0 = summary["best"][summary["baseline"]]
    shape = SHAPES[args.shape]
    emb = 2 * shape["vocab"] * shape["overrides"]["n_embd"] / r0["params"]
    tokens = steps * args.batch_size * args.seq_len
    title = (f"{args.shape}: {r0['params'] / 1e6:.2f} M-param Llama ({emb:.0%} embeddings), C4, "
             f"{tokens:,} tokens ({tokens / r0['params']:.2f} per parameter)")
    plot(results, summary, variants, args.seed, png, title)
    cmd = "python -m benchmarks.optimizer_comparison" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    seconds = sorted(r["seconds"] for r in results.values())
    header = (f"Model: litgpt Llama, {r0['params']:,} parameters, {emb:.1%} of them in wte + lm_head "
              f"({json.dumps(shape['overrides'])}); data: shared C4 tokenised with {_repo_relative(tokenizer)} "
              f"({shape['vocab']:,} pieces); {steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens "
              f"per run ({tokens / r0['params']:.2f} per parameter); warm-up {args.warmup_steps} steps, cosine to 10% "
              f"of peak; betas (0.9, 0.95), eps 1e-8, weight decay 0.1, grad clip 1.0; val = the first "
              f"{args.val_batches} x {args.batch_size} x {args.seq_len} tokens of the C4 validation file. All runs of "
              f"a seed share sha256 of initial weights and of every batch (checked). CPU, 1 torch thread per run, "
              f"{args.jobs} runs at a time; {len(results)} runs, median {seconds[len(seconds) // 2]:.0f} s each.")
    text = (f"# {' vs '.join(LABEL[v] for v in variants)} (`{cmd}`)\n\n{header}\n\n{md}\n\n"
            f"**{summary['sentence']}**\n\nPlot: `{_repo_relative(png)}`\n")
    print(text)
    out = {"benchmark": "optimizer_comparison", "shape": args.shape, "command": cmd, "params": r0["params"],
           "embedding_fraction": round(emb, 4), "model": shape["overrides"], "tokens_per_run": tokens,
           "best_lr": {v: summary["best"][v]["spec"]["lr"] for v in variants},
           "finals_at_best_lr": {v: {str(s): round(x, 5) for s, x in summary["finals"][v].items()} for v in variants},
           "gaps_to_baseline": {v: {k: (round(x, 5) if isinstance(x, float) else
                                        [round(p, 5) for p in x] if isinstance(x, list) else x)
                                    for k, x in g.items()} for v, g in summary["gaps"].items()},
           "grid": {v: {f"{r['spec']['lr']:g}": (round(r["final_val"], 5) if math.isfinite(r["final_val"]) else None)
                        for r in runs_of(results, v, args.seed)} for v in variants},
           "sentence": summary["sentence"], "run_seconds_median": round(seconds[len(seconds) // 2]),
           "wall_s": round(time.time() - t_start), "plot": _repo_relative(png)}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.md").write_text(text)
    full = dict(out, runs=results_runs(results))
    (results_dir / f"{name}.json").write_text(json.dumps(full, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
