"""benchmarks/memory_table.py arithmetic against a hand computation (debug model, 3 GPUs: padded shards)."""
import pytest

import benchmarks.memory_table as mt
import models


def test_units_of_debug_model_by_hand():
    units = mt.fsdp_units(models.get_config("debug"))
    # root: lm_head 4096x64 + wte 4096x64 + ln_f 64; blocks: one v per token row (x2) + one for ln_f
    assert units[0]["name"] == "root" and units[0]["numel"] == 524352 and units[0]["blocks"] == 8193
    # Block: norm_1 64 + qkv 128x64 + proj 64x64 + norm_2 64 + 3 MLP matrices of 176x64
    # blocks: 1 + (4 Q heads + 2 K groups + 32 V rows) + 64 + 1 + 176 + 176 + 64 = 520
    assert [(u["numel"], u["blocks"]) for u in units[1:]] == [(46208, 520)] * 2


def test_per_gpu_bytes_by_hand_on_3_gpus():
    b = mt.per_gpu_bytes(mt.fsdp_units(models.get_config("debug")), 3)
    c = 524352 // 3 + 2 * 15403          # ceil(524352/3) = 174784 (exact), ceil(46208/3) = 15403 (padded)
    assert b["weights"] == b["grads"] == 4 * c == 822360
    assert b["adamw"] == 8 * c + 3 * 4 == 1644732
    assert b["adam_mini"] == 4 * c + 4 * (8193 + 2 * 520) + 3 * 4 == 859304   # v replicated, not divided by 3
    assert b["transient"] == 2 * (524352 + 2 * 46208) + 2 * 524352 == 2282240


def test_activation_estimate_by_hand():
    # 2 layers x 2 B x 128 x 64 + 2 x 128 x (24 x 64 + 2 x 128 + 8 x 176) + 10 x 128 x 4096
    assert mt.activation_bytes(models.get_config("debug"), 128, 1) == 32768 + 819200 + 5242880


def test_adam_mini_drops_one_fp32_shard_for_7b_on_8_gpus():
    b = mt.per_gpu_bytes(mt.fsdp_units(models.get_config("llama2-7b")), 8)
    assert b["weights"] == 4 * 6738415616 // 8                    # every unit divides by 8: no padding
    assert b["adamw"] == 2 * b["weights"] + 33 * 4                 # 33 units (root + 32 Blocks), one step each
    assert b["adamw"] - b["adam_mini"] == b["weights"] - b["adam_mini_v"]
    # v entries: root 32000 + 32000 + 1; Block 2 norms + (32 Q + 32 K + 4096 V rows) + 4096 + 2 x 11008 + 4096
    assert b["adam_mini_v"] == 4 * (64001 + 32 * (2 + 4160 + 4096 + 2 * 11008 + 4096))


@pytest.mark.slow
@pytest.mark.extended
def test_hsdp_rows_against_real_fsdp1_hybrid_shard():
    """HSDP (2 replicas x 2 shards, real FSDP1 HYBRID_SHARD on 4 CPU ranks): per-rank bytes of weights, grads and
    every optimizer's state are those of FULL_SHARD on 2 ranks (check_fsdp raises on a mismatch), not on 4."""
    got = mt.check_fsdp(4, replicas=2)
    assert got["agrees"] and got["per_rank_bytes"]["weights"] == mt.per_gpu_bytes(
        mt.fsdp_units(models.get_config("debug")), 2)["weights"] != mt.per_gpu_bytes(
        mt.fsdp_units(models.get_config("debug")), 4)["weights"]
