"""What a run keeps in which dtype, read from the live objects of its first training step (every rank).

`install(folder)` wraps `pretrain.loop.train_step`; on the first step of the process it records, in
`<folder>/rank<r>.json`:
- "master": the dtypes of the tensors the optimizer owns (FSDP1 FlatParameter shards, FSDP2 DTensors, plain
  parameters);
- "compute": per watched Linear (`transformer.h.0.attn.qkv`, `lm_head`), the dtype of the weight the forward
  pass uses (FSDP: the all-gathered one), of its input and of its output;
- "collectives": every all-gather / reduce-scatter / all-reduce called from Python during the step, with the
  dtype and the 2-norm of what this rank sends (FSDP's reduce-scatter input = this rank's gradient, before
  the reduction);
- "grads": the dtypes of the gradients the optimizer reads;
- "state": the dtypes of Adam-mini's m (`exp_avg`) and v (`exp_avg_sq`) after the step;
and in `<folder>/rank<r>.pt` the gradients the optimizer read, by original parameter name:
`{name: [(start, end, fp32 values)]}` (this rank's pieces).
Used by tests/test_pretrain_precision.py through tests/helpers/fault_run.py (`AMP_TEST_PROBE=<folder>`) or in
process (`install` with monkeypatch.setattr).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WATCHED = ("transformer.h.0.attn.qkv", "lm_head")
COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_reduce")


def _name(t) -> str:
    return str(t).removeprefix("torch.")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def install(folder, setattr_=setattr) -> None:
    from pretrain import loop

    real_train_step = loop.train_step
    done = []

    def train_step(fabric, model, optimizer, micro_batches, grad_clip):
        if done:
            return real_train_step(fabric, model, optimizer, micro_batches, grad_clip)
        done.append(True)
        record: dict = {"compute": {}, "collectives": []}
        _watch_ddp(model, record)
        undo = [_watch_forward(model, record), _watch_collectives(record, setattr_)]
        opt = optimizer.optimizer
        real_step = opt.step
        grads: dict = {}

        def step(*args, **kwargs):
            undo.pop()()  # the optimizer's own all-reduces are not the gradient reduction
            _read_grads(opt, record, grads)
            out = real_step(*args, **kwargs)
            record["state"] = {key: sorted({_name(s[key].dtype) for s in opt.state.values() if key in s})
                               for key in ("exp_avg", "exp_avg_sq")}
            return out

        opt.step = step
        try:
            return real_train_step(fabric, model, optimizer, micro_batches, grad_clip)
        finally:
            del opt.step
            for u in undo:
                u()
            folder_ = Path(folder)
            rank = _rank()
            (folder_ / f"rank{rank}.json").write_text(json.dumps(record))
            torch.save(grads, folder_ / f"rank{rank}.pt")

    setattr_(loop, "train_step", train_step)


def _watch_forward(model, record: dict):
    from optim.units import canonical_name

    handles = []
    for name, module in model.named_modules():
        key = canonical_name(name)
        if key in WATCHED and isinstance(module, torch.nn.Linear) and key not in record["compute"]:
            def hook(mod, args, out, key=key):
                record["compute"].setdefault(key, {"weight": _name(mod.weight.dtype), "input": _name(args[0].dtype),
                                                   "output": _name(out.dtype)})
            handles.append(module.register_forward_hook(hook))
    return lambda: [h.remove() for h in handles]


def _watch_ddp(model, record: dict) -> None:
    """DDP all-reduces its gradient buckets from C++: a communication hook (torch's default all-reduce, the same
    math) records the dtype of the first bucket it reduces."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(model, "_forward_module", None)
    if not isinstance(ddp, DistributedDataParallel):
        return

    def hook(state, bucket):
        if not any(c["op"] == "ddp_bucket_all_reduce" for c in record["collectives"]):
            buf = bucket.buffer()
            record["collectives"].append({"op": "ddp_bucket_all_reduce", "dtype": _name(buf.dtype),
                                          "numel": buf.numel(), "norm": float(buf.double().norm()),
                                          "reduce_op": "AVG"})
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)


def _watch_collectives(record: dict, setattr_):
    import torch.distributed as dist

    saved = []
    for fn_name in COLLECTIVES:
        real = getattr(dist, fn_name, None)
        if real is None:
            continue

        def wrapper(*args, _real=real, _name_=fn_name, **kwargs):
            sent = _sent(_name_, args, kwargs)
            if isinstance(sent, torch.Tensor):
                local = sent.to_local() if hasattr(sent, "to_local") else sent
                record["collectives"].append({"op": _name_, "dtype": _name(local.dtype), "numel": local.numel(),
                                              "norm": float(local.detach().double().norm()),
                                              "reduce_op": str(kwargs.get("op", "SUM"))})
            return _real(*args, **kwargs)

        saved.append((fn_name, real))
        setattr_(dist, fn_name, wrapper)
    return lambda: [setattr(dist, n, r) for n, r in saved]


def _sent(op: str, args, kwargs):
    """The tensor this rank contributes: the input of gathers and reduce-scatters, the tensor of an all-reduce."""
    if op == "all_reduce":
        return args[0] if args else kwargs.get("tensor")
    if op == "all_gather":
        return args[1] if len(args) > 1 else kwargs.get("tensor")
    return args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))


def _read_grads(opt, record: dict, grads: dict) -> None:
    from optim.units import local_1d

    record["master"] = sorted({_name(p.dtype) for g in opt.param_groups for p in g["params"]})
    record["grads"] = sorted({_name(p.grad.dtype) for g in opt.param_groups for p in g["params"]
                              if p.grad is not None})
    for unit in getattr(opt, "units", []):
        if unit.param.grad is None:
            continue
        flat = local_1d(unit.param.grad).detach().float()
        for s in unit.segments:
            grads.setdefault(s.name, []).append((s.start, s.end, flat[s.offset:s.offset + s.end - s.start].clone()))
