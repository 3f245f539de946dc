"""Optimizer-state bytes of AdamW vs Adam-mini for TinyLlama-1.1B, Llama-2-7B and Llama-2-13B.

Nothing is allocated: the models are built on the meta device, the Adam-mini layout comes from the
config, and the byte counts from `optim.memory` (which the tests check against real optimizers, and
here against `AdamMini.init_state()` on meta tensors). Prints a table and, last, one JSON line.

    python benchmarks/optim_memory.py
"""
from __future__ import annotations

import json

import models
from optim.adam_mini import AdamMini
from optim.build import optimizer_state_bytes
from optim.layout import model_layout
from optim.memory import adam_mini_state_bytes, adamw_state_bytes, v_entries
from optim.units import units_from_module

MODELS = ("tinyllama-1.1b", "llama2-7b", "llama2-13b")
MAX_RATIO = 0.5005
GIB = 2 ** 30


def measure(name: str) -> dict:
    config = models.get_config(name)
    model = models.build_model(config, device="meta")
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    layouts = model_layout(config, shapes)
    mini = adam_mini_state_bytes(layouts)
    opt = AdamMini(units_from_module(model), layouts, implementation="eager")
    opt.init_state()  # meta tensors: free
    assert optimizer_state_bytes(opt) == mini, name
    adamw = adamw_state_bytes(shapes)
    params = sum(lay.numel for lay in layouts.values())
    return dict(model=name, params=params, v_entries=v_entries(layouts), adamw_bytes=adamw,
                adam_mini_bytes=mini, ratio=mini / adamw)


def main() -> None:
    rows = [measure(name) for name in MODELS]
    header = f"{'model':<16}{'params':>16}{'v entries':>12}{'v / params':>12}{'AdamW GiB':>11}{'Adam-mini GiB':>15}{'ratio':>9}"
    print("optimizer state, fp32, unsharded (divide by the world size under FSDP)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<16}{r['params']:>16,}{r['v_entries']:>12,}{r['v_entries'] / r['params']:>12.5%}"
              f"{r['adamw_bytes'] / GIB:>11.2f}{r['adam_mini_bytes'] / GIB:>15.2f}{r['ratio']:>9.5f}")
    ok = all(r["ratio"] <= MAX_RATIO for r in rows)
    print(f"Adam-mini / AdamW <= {MAX_RATIO}: {'yes' if ok else 'NO'}")
    print(json.dumps({"benchmark": "optim_memory", "max_ratio": MAX_RATIO, "ok": ok, "models": rows}))
    assert ok, "Adam-mini state is larger than expected"


if __name__ == "__main__":
    main()
