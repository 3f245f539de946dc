"""Optimizer-state bytes of AdamW vs Adam-mini for TinyLlama-1.1B, Llama-2-7B and Llama-2-13B.

Nothing is allocated: the models are built on the meta device, the Adam-mini layout comes from the
config, and the byte counts from `optim.memory` (which the tests check against real optimizers, and
here against `AdamMini.init_state()` on meta tensors). For each model: AdamW (fp32 moments), Adam-mini
with an fp32 and with a bf16 first moment (`momentum_dtype`), and what the non-default partition
choices add (`embedding_blocks=elements`: per-element v for wte and lm_head; `value_blocks=whole`: one v
per layer for the V rows). Then the per-GPU total of `benchmarks.memory_table` for Llama-2 7B on one
GPU: does it fit 80 GiB? Prints tables and, last, one JSON line.

    python -m benchmarks.optim_memory
"""
from __future__ import annotations

import json

import torch

import models
from benchmarks import memory_table
from optim.adam_mini import AdamMini
from optim.build import optimizer_state_bytes
from optim.layout import Partition, model_layout
from optim.memory import adam_mini_state_bytes, adamw_state_bytes, v_entries
from optim.units import units_from_module

MODELS = ("tinyllama-1.1b", "llama2-7b", "llama2-13b")
MAX_RATIO = {torch.float32: 0.5005, torch.bfloat16: 0.2505}
PARTITIONS = {"elements embeddings": Partition(embedding_blocks="elements"), "whole V": Partition(value_blocks="whole")}
GIB = 2 ** 30


def measure(name: str) -> dict:
    config = models.get_config(name)
    model = models.build_model(config, device="meta")
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    layouts = model_layout(config, shapes)
    params = sum(lay.numel for lay in layouts.values())
    adamw = adamw_state_bytes(shapes)
    row = dict(model=name, params=params, v_entries=v_entries(layouts), adamw_bytes=adamw)
    for key, dtype in (("fp32_m", torch.float32), ("bf16_m", torch.bfloat16)):
        mini = adam_mini_state_bytes(layouts, dtype)
        opt = AdamMini(units_from_module(model), layouts, implementation="eager", momentum_dtype=dtype)
        opt.init_state()  # meta tensors: free
        assert optimizer_state_bytes(opt) == mini, (name, dtype)
        row[f"adam_mini_{key}_bytes"] = mini
        row[f"ratio_{key}"] = mini / adamw
    row["extra_bytes"] = {label: adam_mini_state_bytes(model_layout(config, shapes, partition))
                          - adam_mini_state_bytes(layouts) for label, partition in PARTITIONS.items()}
    row["two_vd_fp32_bytes"] = 2 * config.padded_vocab_size * config.n_embd * 4
    return row


def seven_b_on_one_gpu(card_gib: int = 80) -> dict:
    """Per-GPU need of Llama-2 7B on one GPU with memory_table's assumptions (seq 2048, micro-batch 1, 2 GiB
    reserve), per optimizer, and whether it fits `card_gib`."""
    config = models.get_config("llama2-7b")
    b = memory_table.per_gpu_bytes(memory_table.fsdp_units(config), 1)
    extra = memory_table.activation_bytes(config, 2048, 1) + 2 * GIB
    need = {opt: memory_table.static_bytes(b, opt) + extra for opt in memory_table.OPTIMIZERS}
    return {opt: dict(need_gib=n / GIB, fits=n <= card_gib * GIB) for opt, n in need.items()}


def main() -> None:
    rows = [measure(name) for name in MODELS]
    header = (f"{'model':<16}{'params':>16}{'v entries':>12}{'AdamW GiB':>11}{'Adam-mini GiB':>15}{'ratio':>9}"
              f"{'bf16 m GiB':>12}{'ratio':>9}{'B/param':>9}")
    print("optimizer state, unsharded (divide by the world size under FSDP): AdamW fp32; Adam-mini with an fp32 and "
          "with a bf16 first moment (v fp32)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<16}{r['params']:>16,}{r['v_entries']:>12,}{r['adamw_bytes'] / GIB:>11.2f}"
              f"{r['adam_mini_fp32_m_bytes'] / GIB:>15.2f}{r['ratio_fp32_m']:>9.4f}"
              f"{r['adam_mini_bf16_m_bytes'] / GIB:>12.2f}{r['ratio_bf16_m']:>9.4f}"
              f"{r['adam_mini_bf16_m_bytes'] / r['params']:>9.3f}")
    print("\nnon-default partition choices: extra Adam-mini state (fp32 v; negative: less), and 2·V·d·4 bytes")
    print(f"{'model':<16}" + "".join(f"{label + ' MiB':>26}" for label in PARTITIONS) + f"{'2·V·d·4 MiB':>14}")
    for r in rows:
        print(f"{r['model']:<16}" + "".join(f"{r['extra_bytes'][label] / 2 ** 20:>+26,.2f}" for label in PARTITIONS)
              + f"{r['two_vd_fp32_bytes'] / 2 ** 20:>14,.2f}")
    fit = seven_b_on_one_gpu()
    print("\nLlama-2 7B on one 80 GiB GPU (benchmarks.memory_table's per-GPU model: fp32 weights and grads, bf16 "
          "transients, activations, 2 GiB reserve):")
    for opt, f in fit.items():
        verdict = "fits" if f["fits"] else "does not fit"
        print(f"  {memory_table.LABEL[opt]:<22} needs {f['need_gib']:6.2f} GiB: {verdict}")
    ok = all(r[f"ratio_{key}"] <= MAX_RATIO[dtype] for r in rows
             for key, dtype in (("fp32_m", torch.float32), ("bf16_m", torch.bfloat16)))
    print(f"\nAdam-mini / AdamW <= {MAX_RATIO[torch.float32]} (fp32 m), <= {MAX_RATIO[torch.bfloat16]} (bf16 m): "
          f"{'yes' if ok else 'NO'}")
    print(json.dumps({"benchmark": "optim_memory", "max_ratio": {str(k): v for k, v in MAX_RATIO.items()}, "ok": ok,
                      "models": rows, "llama2_7b_one_80gib_gpu": fit}))
    assert ok, "Adam-mini state is larger than expected"


if __name__ == "__main__":
    main()
