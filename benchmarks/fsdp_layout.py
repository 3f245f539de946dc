"""Sharded Adam-mini under FSDP1 on W ranks, computed (no GPUs, no processes): blocks, straddles, bytes.

For a named model (default TinyLlama 1.1B on 8 ranks) this builds the model on the meta device, the
Adam-mini block layout (`optim.layout.model_layout`), and FSDP1's units as the app wraps them
(`ModuleWrapPolicy({Block})`: one FlatParameter per transformer Block plus the root with
`lm_head`, `wte`, `ln_f`; parameters in registration order, `use_orig_params=False`). Each rank's
segments come from `optim.flat.flat_shard_segments` (the pure replica of FSDP1's even split with right
padding, checked against FSDP's own fields in tests/test_optim_fsdp.py), and the blocks each segment
touches from `optim.blocks.plan_unit`, the optimizer's own code path. Per unit it reports:

- blocks: entries of the unit's v vector (= floats all-reduced per step, fp32);
- straddling: blocks whose elements lie on more than one rank (cut by a shard boundary);
- all-reduce bytes/step: the block-sum vector, n_blocks * 4 (one all-reduce(SUM) per unit per step);
- all-gather bytes/step: the unit's padded flat parameter in bf16, gathered for forward and again for
  backward (FULL_SHARD; FSDP1 keeps the root unsharded between its forward and backward: once);
- ratio all-gather / all-reduce.
Bytes are payload sizes (the full tensor each collective produces on every rank), not wire traffic;
a ring moves ~2(W-1)/W x payload per rank for an all-reduce and (W-1)/W x for an all-gather, so the
ratio of wire bytes is about half the payload ratio.

With `--embedding-blocks elements` / `--value-blocks whole` (the Adam-mini partition options) the
blocks and the all-reduce bytes follow the choice.

    python -m benchmarks.fsdp_layout [--model tinyllama-1.1b] [--world 8] [--embedding-blocks tokens|elements]
                                     [--value-blocks rows|whole]
"""
from __future__ import annotations

import json

import models
from data.cli import Parser
from optim.blocks import plan_unit
from optim.flat import flat_shard_segments
from optim.layout import EMBEDDING_BLOCKS, VALUE_BLOCKS, Partition, model_layout
from optim.units import Segment, Unit

BF16, FP32 = 2, 4


def fsdp1_units(config) -> list[tuple[str, list[tuple[str, int]]]]:
    """`(label, [(name, numel), ...])` per FSDP1 unit: one per Block (in order), then the root."""
    from litgpt.model import Block

    model = models.build_model(config, device="meta")
    block_paths = [name for name, m in model.named_modules() if isinstance(m, Block)]
    owned: dict[str, str] = {}
    for name, _ in model.named_parameters():
        owner = next((b for b in block_paths if name.startswith(b + ".")), "")
        owned[name] = owner
    units = []
    for path in block_paths + [""]:
        params = [(n, p.numel()) for n, p in model.named_parameters() if owned[n] == path]
        units.append((path or "<root>", params))
    return units


def analyse(config, world: int, partition: Partition = Partition()) -> dict:
    model = models.build_model(config, device="meta")
    layouts = model_layout(config, [(n, tuple(p.shape)) for n, p in model.named_parameters()], partition)
    rows = []
    for label, params in fsdp1_units(config):
        names = tuple(n for n, _ in params)
        numels = [k for _, k in params]
        partial_blocks: dict[int, set[int]] = {}  # block index -> ranks holding a part of it
        shard_numel = 0
        for rank in range(world):
            segs, shard_numel, _ = flat_shard_segments(numels, rank, world)
            unit = Unit(param=None, names=names, segments=tuple(Segment(names[i], a, b, off) for i, a, b, off in segs))
            plan = plan_unit(unit, layouts)
            for c in plan.chunks:
                if c.rows == 1 and c.length < plan.block_numel(c.block):
                    partial_blocks.setdefault(c.block, set()).add(rank)
        n_blocks = sum(layouts[n].n_blocks for n in names)
        straddling = sum(1 for ranks in partial_blocks.values() if len(ranks) > 1)
        gathers = 1 if label == "<root>" else 2
        padded_numel = shard_numel * world
        rows.append(dict(unit=label, params=sum(numels), padding=padded_numel - sum(numels), blocks=n_blocks,
                         straddling=straddling, allreduce_bytes=n_blocks * FP32,
                         allgather_bytes=gathers * padded_numel * BF16))
    total_ar = sum(r["allreduce_bytes"] for r in rows)
    total_ag = sum(r["allgather_bytes"] for r in rows)
    return dict(model=config.name, world=world, units=len(rows), rows=rows,
                blocks=sum(r["blocks"] for r in rows), straddling=sum(r["straddling"] for r in rows),
                allreduce_bytes=total_ar, allgather_bytes=total_ag, ratio=total_ag / total_ar)


def main() -> None:
    parser = Parser(prog="python -m benchmarks.fsdp_layout", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b", choices=models.CONFIG_NAMES)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--embedding-blocks", default="tokens", choices=EMBEDDING_BLOCKS)
    parser.add_argument("--value-blocks", default="rows", choices=VALUE_BLOCKS)
    args = parser.parse_args()
    partition = Partition(embedding_blocks=args.embedding_blocks, value_blocks=args.value_blocks)
    res = analyse(models.get_config(args.model), args.world, partition)
    header = f"{'unit':16s} {'params':>12s} {'pad':>4s} {'blocks':>8s} {'straddle':>8s} " \
             f"{'all-reduce B/step':>18s} {'all-gather B/step':>18s} {'ratio':>8s}"
    print(f"{res['model']} under FSDP1 on {res['world']} ranks (per Block + root; bf16 params, fp32 block sums; "
          f"{partition})")
    print(header)
    print("-" * len(header))
    for r in res["rows"]:
        ratio = r["allgather_bytes"] / r["allreduce_bytes"]
        print(f"{r['unit']:16s} {r['params']:12,d} {r['padding']:4d} {r['blocks']:8,d} {r['straddling']:8d} "
              f"{r['allreduce_bytes']:18,d} {r['allgather_bytes']:18,d} {ratio:8,.0f}")
    print("-" * len(header))
    print(f"{'total':16s} {sum(r['params'] for r in res['rows']):12,d} {'':4s} {res['blocks']:8,d} "
          f"{res['straddling']:8d} {res['allreduce_bytes']:18,d} {res['allgather_bytes']:18,d} {res['ratio']:8,.0f}")
    summary = {k: v for k, v in res.items() if k != "rows"}
    summary["partition"] = str(partition)
    summary["per_unit"] = [{k: r[k] for k in ("unit", "blocks", "straddling", "allreduce_bytes", "allgather_bytes")}
                           for r in res["rows"]]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
