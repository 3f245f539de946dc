"""`amp-ckpt inspect CKPT`: what a checkpoint holds, read from its small files and tensor metadata.

Why: before resuming, exporting or deleting a checkpoint one wants to know what it is (step, tokens,
on how many ranks it was written, which optimizer, how big) without loading gigabytes of tensors.
Nothing here reads tensor data: shapes come from DCP metadata.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

from amp_common.tensors import nbytes, numel
from checkpoints_util.output import human_bytes
from checkpoints_util.reader import Checkpoint, open_checkpoint

# The litgpt.Config fields that describe a Llama's size (the full config is in model_config.yaml).
MODEL_FIELDS = ("name", "n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size",
                "vocab_size", "padded_vocab_size", "block_size", "norm_eps", "rope_base")


def inspect_checkpoint(path, verify: bool = False) -> dict[str, Any]:
    """A JSON-able summary of the checkpoint at `path` (validated against its model config). With `verify`,
    every file is also checked against the sha256 recorded at save time (raises CheckpointError if one differs)."""
    ck: Checkpoint = open_checkpoint(path, verify=verify)
    ck.validate()
    info = ck.tensor_info()
    n_params = sum(numel(shape) for shape, _ in info.values())
    model_bytes = sum(nbytes(shape, dtype) for shape, dtype in info.values())
    dtypes = sorted({str(dtype).replace("torch.", "") for _, dtype in info.values()})
    files = ck.files()
    t = ck.trainer
    state_bytes = ck.optimizer_state_bytes()
    source = t.get("source") if isinstance(t.get("source"), dict) else None  # amp-ckpt import's record
    return {
        "path": str(ck.path),
        "step": t.get("step"),
        "tokens_seen": t.get("tokens_seen"),
        "world_size": t.get("world_size"),
        "strategy": t.get("strategy"),
        "precision": t.get("precision"),
        "saved_at": t.get("saved_at"),
        "reason": t.get("reason"),
        "loss": t.get("loss"),
        "val_loss": t.get("val_loss"),
        "model": {
            **{f: getattr(ck.model_config, f) for f in MODEL_FIELDS},
            "parameters": n_params,
            "dtypes": dtypes,
            "bytes": model_bytes,
        },
        # a checkpoint without optimizer state that names no optimizer (an import): kind None, not 'unknown'
        "optimizer": {"kind": None if state_bytes is None and not t.get("optimizer") else ck.optimizer_kind(),
                      "state_bytes": state_bytes},
        "source": source,
        "train_config": ck.train_config,
        "files": [{"path": p, "bytes": b} for p, b in files],
        "total_bytes": sum(b for _, b in files),
        "verified": verify,
    }


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report printed by `inspect`."""
    m, o = r["model"], r["optimizer"]
    tokens = f"{r['tokens_seen']:,}" if isinstance(r["tokens_seen"], int) else str(r["tokens_seen"])
    lines = [
        f"checkpoint   {r['path']}",
        f"step         {r['step']}",
        f"tokens seen  {tokens}",
        f"written on   {r['world_size']} rank(s), {r['strategy']}, precision {r['precision']}",
        f"saved at     {r['saved_at']} (reason: {r['reason']})",
    ]
    if r.get("source"):
        lines.append(f"imported     {r['source'].get('path')} ({r['source'].get('format')})")
    if r.get("loss") is not None or r.get("val_loss") is not None:
        lines.append(f"loss         train {_fmt(r.get('loss'))}, val {_fmt(r.get('val_loss'))}")
    lines += [
        f"model        {m['name']}: {m['parameters']:,} parameters, {', '.join(m['dtypes'])}, "
        f"{human_bytes(m['bytes'])}",
        "             " + ", ".join(f"{k}={m[k]}" for k in MODEL_FIELDS if k != "name"),
        "optimizer    none (weights only)" if o["kind"] is None else
        f"optimizer    {o['kind']}: state {human_bytes(o['state_bytes']) if o['state_bytes'] is not None else 'absent'}"
        + (f" ({o['state_bytes'] / m['bytes']:.2f} x the weights)" if o["state_bytes"] and m["bytes"] else ""),
        "training config:",
    ]
    if r["train_config"]:
        lines += ["  " + ln for ln in yaml.safe_dump(r["train_config"], sort_keys=False).rstrip().splitlines()]
    elif o["kind"] is None:  # a model-only folder (amp-ckpt import): its config.yaml is empty
        lines.append("  (none: weights only)")
    else:
        lines.append("  (no config.yaml)" if r["train_config"] is None else "  (config.yaml is empty)")
    verified = "every file matches its sha256 from save time" if r["verified"] else "not verified (--verify)"
    lines.append(f"files ({len(r['files'])}, {human_bytes(r['total_bytes'])}; {verified}):")
    width = max((len(f["path"]) for f in r["files"]), default=0)
    lines += [f"  {f['path']:<{width}}  {human_bytes(f['bytes']):>12}" for f in r["files"]]
    return "\n".join(lines)


def run(args) -> int:
    report = inspect_checkpoint(args.checkpoint, verify=args.verify)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print step, tokens, world size, optimizer, model/training config, files",
                       description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CKPT", help="a step-XXXXXXXX folder, or a run folder (its newest checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--verify", action="store_true",
                   help="also check every file against the sha256 recorded when it was saved (reads all of it)")
    p.set_defaults(func=run)


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)

