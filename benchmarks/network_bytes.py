"""Bytes per training step that cross the inter-node network: FULL_SHARD vs hybrid sharding (HSDP), and Adam-mini's
block-sum all-reduce beside them. Arithmetic on the real FSDP units (one per litgpt Block plus the root unit, from
the meta-device model, as `benchmarks.memory_table`), nothing is run.

Setting: n nodes x g GPUs (W = n·g ranks, ordered node by node), FSDP1 with Lightning's bf16-mixed (parameters
all-gathered and gradients reduced in bf16, b = 2 bytes; `--grad-bytes 4` for fsdp2's fp32 reduction), ring
collectives (NCCL's default for large messages on several nodes): a ring over ranks ordered by node leaves
each node on exactly one link, so a node sends what one ring link carries. Per FSDP unit of N elements:

    FULL_SHARD (one ring over all W ranks, chunk c = ceil(N / W), FSDP1's padded split):
      all-gather       (W - 1)·c·b per node, 2 per Block unit per micro-batch (forward, and again in backward:
                       reshard_after_forward), 1 for the root unit (kept unsharded from forward to backward)
      reduce-scatter   (W - 1)·c·b per node, once per step (gradients accumulate unsharded over micro-batches)
    HSDP (one replica per node: the shard group is the node, S = g, shard c_S = ceil(N / g)):
      all-gather, reduce-scatter: inside the node (NVLink), 0 bytes on the network
      all-reduce of each rank's gradient shard across the n replicas: g rings (one per local rank) of n ranks,
                       2·(n - 1)·ceil(c_S / n)·b per ring link: g·2·(n - 1)·ceil(c_S / n)·b per node, once per step
    Adam-mini block sums (fp32, B = Adam-mini blocks of the whole unit, one all-reduce per unit and step over the
    unit's group, `optim/eager.py`):
      FULL_SHARD       the group is all W ranks: 2·(W - 1)·ceil(B / W)·4 per node
      HSDP             the group is the shard group, inside the node: 0 (the replicas hold identical, already
                       reduced gradients and compute the same v)

The table gives GB (1e9 bytes) sent per node per optimizer step with `--micro-batches` micro-batches (default 1;
each extra one repeats the FULL_SHARD all-gathers and adds nothing to HSDP's network bytes); every node sends
the same, so the network carries n times that. Prints the table and, last, one JSON line.

    python -m benchmarks.network_bytes [--nodes 4 16] [--gpus-per-node 8] [--micro-batches 1] [--grad-bytes 2]
"""
from __future__ import annotations

import json

import models
from benchmarks.memory_table import fsdp_units
from data.cli import Parser

MODELS = ("tinyllama-1.1b", "llama2-7b", "llama2-13b")
GB = 1e9


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def full_shard_bytes(units: list[dict], nodes: int, gpus: int, micro_batches: int = 1, param_bytes: int = 2,
                     grad_bytes: int = 2) -> dict[str, int]:
    """Bytes one node sends to the others per step under FULL_SHARD over all nodes x gpus ranks."""
    w = nodes * gpus
    gather = scatter = block_sums = 0
    if nodes > 1:
        for u in units:
            c = ceil_div(u["numel"], w)
            gathers = 1 if u["name"] == "root" else 2
            gather += micro_batches * gathers * (w - 1) * c * param_bytes
            scatter += (w - 1) * c * grad_bytes
            block_sums += 2 * (w - 1) * ceil_div(u["blocks"], w) * 4
    return {"all_gather": gather, "reduce_scatter": scatter, "all_reduce": 0, "adam_mini_block_sums": block_sums}


def hsdp_bytes(units: list[dict], nodes: int, gpus: int, grad_bytes: int = 2) -> dict[str, int]:
    """Bytes one node sends to the others per step under HSDP with one replica per node (shards of `gpus`)."""
    reduce = 0
    if nodes > 1:
        for u in units:
            c = ceil_div(u["numel"], gpus)
            reduce += gpus * 2 * (nodes - 1) * ceil_div(c, nodes) * grad_bytes
    return {"all_gather": 0, "reduce_scatter": 0, "all_reduce": reduce, "adam_mini_block_sums": 0}


def rows(nodes_list, gpus: int, micro_batches: int, grad_bytes: int) -> list[dict]:
    out = []
    for name in MODELS:
        units = fsdp_units(models.get_config(name))
        params = sum(u["numel"] for u in units)
        for n in nodes_list:
            full = full_shard_bytes(units, n, gpus, micro_batches, grad_bytes=grad_bytes)
            hsdp = hsdp_bytes(units, n, gpus, grad_bytes)
            out.append(dict(model=name, params=params, nodes=n, gpus_per_node=gpus, micro_batches=micro_batches,
                            full_shard=full, hsdp=hsdp,
                            full_shard_total=sum(v for k, v in full.items() if k != "adam_mini_block_sums"),
                            hsdp_total=sum(v for k, v in hsdp.items() if k != "adam_mini_block_sums")))
    return out


def table(rs: list[dict]) -> str:
    g = lambda x: f"{x / GB:.2f}"  # noqa: E731
    lines = ["| model | nodes × GPUs | FULL_SHARD: all-gather + reduce-scatter | HSDP: all-reduce across nodes | "
             "HSDP / FULL_SHARD | Adam-mini block sums, FULL_SHARD | Adam-mini block sums, HSDP |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rs:
        f, h = r["full_shard"], r["hsdp"]
        lines.append(f"| {r['model']} | {r['nodes']} × {r['gpus_per_node']} | {g(f['all_gather'])} + "
                     f"{g(f['reduce_scatter'])} = {g(r['full_shard_total'])} GB | {g(r['hsdp_total'])} GB | "
                     f"{r['hsdp_total'] / r['full_shard_total']:.2f} | "
                     f"{f['adam_mini_block_sums'] / 1e6:.2f} MB | {h['adam_mini_block_sums'] / 1e6:.2f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m benchmarks.network_bytes", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimizer step on every GPU")
    ap.add_argument("--grad-bytes", type=int, choices=(2, 4), default=2,
                    help="bytes per reduced gradient element: 2 (fsdp bf16-mixed), 4 (fsdp2's fp32 reduction)")
    args = ap.parse_args(argv)
    for key in ("gpus_per_node", "micro_batches"):
        if getattr(args, key) < 1:
            ap.exit(2, f"error: --{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}\n")
    if any(n < 2 for n in args.nodes):
        ap.exit(2, f"error: --nodes: every count must be >= 2 (nothing crosses nodes on one), got {args.nodes}\n")
    rs = rows(args.nodes, args.gpus_per_node, args.micro_batches, args.grad_bytes)
    print(f"GB sent by each node to the others per optimizer step ({args.micro_batches} micro-batch(es) per GPU, "
          f"{args.grad_bytes}-byte gradients, ring collectives; HSDP: one replica per node)")
    print()
    print(table(rs))
    print(json.dumps({"benchmark": "network_bytes", "gpus_per_node": args.gpus_per_node,
                      "micro_batches": args.micro_batches, "grad_bytes": args.grad_bytes, "rows": rs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
