"""Per-GPU memory of weights, gradients and optimizer state under FSDP, AdamW vs Adam-mini, and what fits.

Setting (what `pretrain` uses on GPUs): FSDP1, FULL_SHARD, use_orig_params=False, one FSDP unit per
litgpt `Block` plus the root unit (`lm_head`, `transformer.wte`, `transformer.ln_f`), Lightning
`bf16-mixed` (its FSDP precision plugin sets MixedPrecision(param_dtype=reduce_dtype=bf16)).

Per GPU, for every unit of N elements on W GPUs, each rank holds one chunk c = ceil(N / W) (FSDP1's
even split, the last rank right-padded: `optim.flat.even_shard_bounds`):

    weights   4·c              fp32 sharded master parameters (the FlatParameter shard)
    grads     4·c              fp32 sharded gradients (reduce-scattered in bf16, kept in fp32)
    AdamW     8·c + 4          exp_avg + exp_avg_sq fp32 like the shard, + a 0-d fp32 step
    Adam-mini 4·c + 4·B + 4    exp_avg fp32 like the shard, + one fp32 v per block of the WHOLE unit
                               (B = blocks of all the unit's parameters, `optim.layout`), replicated on
                               every rank (not divided by W), + a 0-d fp32 step
    Adam-mini 2·c + 4·B + 4    the same with a bf16 exp_avg (`momentum_dtype=bfloat16`)
    (bf16 m)
    transient 2·(N_root + 2·N_block) + 2·max(N_root, N_block)
              bf16 all-gathered parameters: the root unit (FSDP1 keeps the root unsharded from forward
              to backward), the Block being computed and the one prefetched (limit_all_gathers);
              plus one unit's unsharded bf16 gradient before its reduce-scatter.

Activation headroom (estimate, bf16, FlashAttention-style SDPA, activation checkpointing per Block,
micro-batch b = 1, sequence s = 2048):

    A = L·2·s·b·d                                  the checkpointed Block inputs
      + 2·s·b·(24·d + 2·(n_head + 2·n_kv)·hs + 8·I) one Block recomputed in backward: activations and
                                                    their gradients (norms keep fp32 copies: 8·d each)
      + 10·s·b·V                                    logits bf16 + fp32 upcast + fp32 gradient
    plus a fixed reserve of 2 GiB (CUDA context, NCCL buffers, allocator fragmentation).

Hybrid sharding (HSDP, `system.replicas` R > 1, the default on several nodes: one replica per node): every
replica shards the model over its S = W / R GPUs, so a GPU holds what FULL_SHARD on S GPUs holds (the formulas
above with W = S; the replicas' v and steps are copies too). Rows "HSDP R×S" show it with S = 8 GPUs per node.

A configuration "fits" a card when weights + grads + optimizer state + transient + A + reserve is at
most the card's memory (40 GiB, 80 GiB). W = 1 is counted with the same formulas (FSDP then falls back
to NO_SHARD; the bf16 compute copies are the same size). Nothing is allocated: shapes come from the
meta-device model. Prints a table and, last, one JSON line.

    python -m benchmarks.memory_table --check-fsdp 3 --check-hsdp 4 [--seq-len 2048] [--micro-batch 1]
        [--reserve-gib 2]
    (also writes benchmarks/results/memory_table.md)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import models
from data.cli import Parser
from optim.flat import even_shard_bounds
from optim.layout import model_layout

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("tinyllama-1.1b", "llama3.2-1b", "llama2-7b", "llama2-13b")
WORLD_SIZES = (1, 8, 16)
GPUS_PER_NODE = 8
HSDP_NODES = (4, 16)   # HSDP rows: nodes x GPUS_PER_NODE GPUs, one replica per node
CARDS_GIB = (40, 80)
OPTIMIZERS = ("adamw", "adam_mini", "adam_mini_bf16m")
LABEL = {"adamw": "AdamW", "adam_mini": "Adam-mini", "adam_mini_bf16m": "Adam-mini (bf16 m)"}
BUILD_OPTIONS = {"adamw": ("adamw", {}), "adam_mini": ("adam_mini", {}),
                 "adam_mini_bf16m": ("adam_mini", {"momentum_dtype": "bfloat16"})}
GIB = 2 ** 30
STEP_BYTES = 4
_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")


def fsdp_units(config) -> list[dict]:
    """FSDP units in wrapping order: `numel` and Adam-mini `blocks` of each (root unit first)."""
    model = models.build_model(config, device="meta")
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    layouts = model_layout(config, shapes)
    units: dict[str, dict] = {}
    for name, _ in shapes:
        m = _BLOCK.match(name)
        key = f"block{m.group(1)}" if m else "root"
        u = units.setdefault(key, {"name": key, "numel": 0, "blocks": 0, "params": []})
        u["numel"] += layouts[name].numel
        u["blocks"] += layouts[name].n_blocks
        u["params"].append(name)
    return list(units.values())


def chunk(numel: int, world: int) -> int:
    start, end, pad = even_shard_bounds(numel, 0, world)  # rank 0: a full chunk, every rank's buffer size
    return end - start + pad


def per_gpu_bytes(units: list[dict], world: int) -> dict[str, int]:
    """Bytes one GPU holds for weights, grads, each optimizer's state and the transient bf16 buffers."""
    c = [chunk(u["numel"], world) for u in units]
    root = next(u["numel"] for u in units if u["name"] == "root")
    block = max(u["numel"] for u in units if u["name"] != "root")
    return {
        "weights": sum(4 * x for x in c),
        "grads": sum(4 * x for x in c),
        "adamw": sum(8 * x + STEP_BYTES for x in c),
        "adam_mini": sum(4 * x + 4 * u["blocks"] + STEP_BYTES for x, u in zip(c, units)),
        "adam_mini_bf16m": sum(2 * x + 4 * u["blocks"] + STEP_BYTES for x, u in zip(c, units)),
        "adam_mini_v": sum(4 * u["blocks"] for u in units),
        "transient": 2 * (root + 2 * block) + 2 * max(root, block),
    }


def activation_bytes(config, seq_len: int, micro_batch: int) -> int:
    s, b, d, L = seq_len, micro_batch, config.n_embd, config.n_layer
    qkv = (config.n_head + 2 * config.n_query_groups) * config.head_size
    checkpoints = L * 2 * s * b * d
    one_block = 2 * s * b * (24 * d + 2 * qkv + 8 * config.intermediate_size)
    logits = 10 * s * b * config.padded_vocab_size
    return checkpoints + one_block + logits


def static_bytes(b: dict, opt: str) -> int:
    """Per-GPU weights, grads, `opt`'s state and the bf16 transient of `per_gpu_bytes` (no activations)."""
    return b["weights"] + b["grads"] + b[opt] + b["transient"]


def min_gpus(units, act: int, reserve: int, card: int, opt: str, limit: int = 256) -> int | None:
    for w in range(1, limit + 1):
        if static_bytes(per_gpu_bytes(units, w), opt) + act + reserve <= card:
            return w
    return None


# ------------------------------------------------------------------ cross-check against real FSDP1
def _fsdp_worker(rank: int, world: int, port: int, out: str, replicas: int = 1) -> None:
    """One rank: FSDP1 (CPU, gloo) over the `debug` model, FULL_SHARD or (`replicas` > 1) HYBRID_SHARD on a
    (replicas, world / replicas) mesh; real per-rank bytes after one step of each optimizer."""
    import os

    import torch
    import torch.distributed as dist
    from litgpt.model import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from optim.build import build_optimizer, optimizer_state_bytes
    from pretrain.step import batch_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = models.get_config("debug")
        got = {}
        for opt_name in OPTIMIZERS:
            name, options = BUILD_OPTIONS[opt_name]
            model = models.build_model(config, device="cpu")
            models.init_model(model, config.n_layer, config.n_embd, seed=0)
            layout = dict(sharding_strategy=ShardingStrategy.FULL_SHARD)
            if replicas > 1:
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
                layout = dict(sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=mesh)
            model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"),
                         use_orig_params=False, **layout)
            opt = build_optimizer(model, config, name, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  **options)
            x = torch.randint(0, config.padded_vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
            batch_loss(model, x).backward()
            opt.step()
            params = [p for p in model.parameters()]
            got[opt_name] = optimizer_state_bytes(opt)
            got["weights"] = sum(p.numel() * p.element_size() for p in params)
            got["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        torch.save(got, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def check_fsdp(world: int, replicas: int = 1) -> dict:
    """Real FSDP1 per-rank bytes (debug model, CPU) against `per_gpu_bytes` (of the shard size world / replicas
    under HSDP); raises on a mismatch."""
    import socket
    import tempfile

    import torch
    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/bytes"
        mp.spawn(_fsdp_worker, args=(world, port, out, replicas), nprocs=world, join=True)
        real = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world)]
    want = per_gpu_bytes(fsdp_units(models.get_config("debug")), world // replicas)
    keys = ("weights", "grads", *OPTIMIZERS)
    for r, got in enumerate(real):
        for k in keys:
            if got[k] != want[k]:
                raise SystemExit(f"error: FSDP1 check, rank {r} of {world} ({replicas} replicas): real {k} = "
                                 f"{got[k]} bytes, formula {want[k]}")
    return {"world": world, "replicas": replicas, "model": "debug", "per_rank_bytes": {k: want[k] for k in keys},
            "agrees": True}


def main() -> None:
    ap = Parser(prog="python -m benchmarks.memory_table", description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--check-fsdp", type=int, default=0, metavar="W",
                    help="first check the formulas against real FSDP1 on W CPU processes (debug model, gloo)")
    ap.add_argument("--check-hsdp", type=int, default=0, metavar="W",
                    help="also check HSDP (HYBRID_SHARD, 2 replicas x W/2) on W CPU processes; W even")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--reserve-gib", type=float, default=2.0)
    ap.add_argument("--markdown", default=str(ROOT / "benchmarks" / "results" / "memory_table.md"),
                    help="also write the tables and assumptions to this markdown file ('' = no file)")
    args = ap.parse_args()
    reserve = int(args.reserve_gib * GIB)
    fsdp_check = None
    if args.check_fsdp:
        fsdp_check = check_fsdp(args.check_fsdp)
        print(f"FSDP1 check: real per-rank bytes of weights, grads, AdamW and Adam-mini state (fp32 and bf16 m) on "
              f"{args.check_fsdp} CPU ranks (debug model) equal the formulas: {fsdp_check['per_rank_bytes']}")
    hsdp_check = None
    if args.check_hsdp:
        if args.check_hsdp < 4 or args.check_hsdp % 2:
            raise SystemExit(f"error: --check-hsdp {args.check_hsdp}: needs an even number of ranks >= 4 "
                             f"(2 replicas of >= 2 shards)")
        hsdp_check = check_fsdp(args.check_hsdp, replicas=2)
        print(f"HSDP check: the same bytes on {args.check_hsdp} CPU ranks as 2 replicas x {args.check_hsdp // 2} "
              f"shards equal the formulas with W = {args.check_hsdp // 2}: {hsdp_check['per_rank_bytes']}")

    rows, fits = [], []
    for name in MODELS:
        config = models.get_config(name)
        units = fsdp_units(config)
        params = sum(u["numel"] for u in units)
        act = activation_bytes(config, args.seq_len, args.micro_batch)
        for w, replicas in [(w, 1) for w in WORLD_SIZES] + [(n * GPUS_PER_NODE, n) for n in HSDP_NODES]:
            b = per_gpu_bytes(units, w // replicas)
            for opt in OPTIMIZERS:
                total = static_bytes(b, opt)
                need = total + act + reserve
                rows.append(dict(model=name, params=params, world=w, replicas=replicas, optimizer=opt,
                                 weights=b["weights"],
                                 grads=b["grads"], optimizer_state=b[opt], transient=b["transient"],
                                 static_total=total, activations=act, reserve=reserve, need=need,
                                 adam_mini_v=0 if opt == "adamw" else b["adam_mini_v"],
                                 **{f"fits_{c}gib": need <= c * GIB for c in CARDS_GIB}))
        for c in CARDS_GIB:
            fits.append(dict(model=name, card_gib=c, activations=act,
                             **{f"min_gpus_{opt}": min_gpus(units, act, reserve, c * GIB, opt) for opt in OPTIMIZERS}))

    out = []
    out.append(f"Per-GPU memory, FSDP FULL_SHARD or HSDP (replicas x GPUs each; use_orig_params=False, bf16-mixed), "
               f"GiB. Activation headroom: "
               f"checkpointing per Block, micro-batch {args.micro_batch} x seq {args.seq_len}, + {args.reserve_gib:g} "
               f"GiB reserve. Adam-mini (bf16 m): `optimizer.adam_mini.momentum_dtype: bfloat16`.")
    out.append("")
    out.append("| model | GPUs | optimizer | weights fp32 | grads fp32 | optimizer state | (of which replicated v) | "
               "bf16 transient | static total | + activations + reserve | fits 40 GiB | fits 80 GiB |")
    out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|")

    def v_cell(r):
        return "—" if r["optimizer"] == "adamw" else f"{r['adam_mini_v'] / 2**20:.2f} MiB"

    for r in rows:
        g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
        gpus = f"{r['world']} (HSDP {r['replicas']}×{r['world'] // r['replicas']})" if r["replicas"] > 1 else r["world"]
        out.append(f"| {r['model']} | {gpus} | {LABEL[r['optimizer']]} | {g(r['weights'])} | {g(r['grads'])} | "
                   f"{g(r['optimizer_state'])} | {v_cell(r)} | "
                   f"{g(r['transient'])} | {g(r['static_total'])} | {g(r['need'])} | "
                   f"{'yes' if r['fits_40gib'] else 'no'} | {'yes' if r['fits_80gib'] else 'no'} |")
    out.append("")
    out.append("Fewest GPUs that fit (same assumptions, any world size up to 256):")
    out.append("")
    out.append("| model | card | activations estimate | " + " | ".join(LABEL[o] for o in OPTIMIZERS) + " |")
    out.append("|---|---:|---:|" + "---:|" * len(OPTIMIZERS))
    for f in fits:
        out.append(f"| {f['model']} | {f['card_gib']} GiB | {f['activations'] / GIB:.2f} GiB | "
                   + " | ".join(str(f[f"min_gpus_{o}"]) for o in OPTIMIZERS) + " |")
    out.append("")
    out.append("Fewest GPUs: under FULL_SHARD. With HSDP a node's GPUs must hold the model alone: a row \"HSDP "
               "R×8\" that does not fit means `--system.replicas 1` (FULL_SHARD over all GPUs) for that model.")
    out.append("")
    one = [r for r in rows if r["model"] == "llama2-7b" and r["world"] == 1]
    out.append("Llama-2 7B on one 80 GiB GPU: " + "; ".join(
        f"{LABEL[r['optimizer']]} needs {r['need'] / GIB:.2f} GiB, {'fits' if r['fits_80gib'] else 'does not fit'}"
        for r in one) + ".")
    if fsdp_check:
        out.append("")
        out.append(f"Checked against real FSDP1 (CPU, gloo, `debug` model, {fsdp_check['world']} ranks, padded "
                   f"shards): the per-rank bytes of weights, grads, AdamW and Adam-mini state (fp32 and bf16 m) "
                   f"equal these formulas exactly ({fsdp_check['per_rank_bytes']}). The bf16 transient and the "
                   f"activations are estimates, not measured.")
    if hsdp_check:
        out.append("")
        out.append(f"Checked against real FSDP1 HYBRID_SHARD (CPU, gloo, `debug` model, {hsdp_check['world']} ranks "
                   f"as 2 replicas × {hsdp_check['world'] // 2} shards): the per-rank bytes equal the formulas with "
                   f"W = {hsdp_check['world'] // 2} exactly ({hsdp_check['per_rank_bytes']}).")
    text = "\n".join(out)
    print(text)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        assumptions = __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        cmd = " ".join(["python -m benchmarks.memory_table", *sys.argv[1:]])
        path.write_text(f"# Memory table (`{cmd}`)\n\n{text}\n\n## Assumptions\n\n"
                        f"```\n{assumptions}\n```\n")
    print(json.dumps({"benchmark": "memory_table", "fsdp_check": fsdp_check, "hsdp_check": hsdp_check,
                      "seq_len": args.seq_len,
                      "micro_batch": args.micro_batch, "reserve_bytes": reserve, "rows": rows, "min_gpus": fits}))


if __name__ == "__main__":
    main()
