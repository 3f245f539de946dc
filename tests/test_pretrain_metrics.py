"""What a run reports: TensorBoard scalars (loss, val loss, lr, grad norm, tokens, tokens/s, MFU,
memory, optimizer state), MFU = FLOPs/token x tokens/s / peak, and the GPU peak table."""
from __future__ import annotations

import pytest
import torch

import models
from helpers.runs import tiny_config, train_log
from pretrain import metrics
from pretrain.loop import fit


def test_tensorboard_scalars_and_mfu(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = data_dir
    cfg = tiny_config(data, tmp_path / "run", train__max_steps=4, logging__tensorboard=True,
                      logging__interval=2, logging__peak_flops=1e12, eval__interval=2)
    result = fit(cfg)
    acc = EventAccumulator(str(result.tensorboard_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "val/loss", "perf/tokens_per_s",
                "perf/tokens_per_s_per_device", "perf/mfu", "perf/max_memory_gib", "perf/optimizer_state_gib",
                "perf/s_per_step"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 4]  # the first step is always logged
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    assert acc.Scalars("train/tokens_seen")[-1].value == 4 * 128
    # logged loss = mean of the steps of the window
    assert acc.Scalars("train/loss")[-1].value == pytest.approx((result.losses[3] + result.losses[4]) / 2, rel=1e-6)
    rec = [r for r in train_log(tmp_path / "run") if "mfu" in r][-1]
    flops = models.flops_per_token(models.get_config("debug"), 32)
    assert rec["mfu"] == pytest.approx(flops * rec["tokens_per_s"] / 1e12, rel=1e-9)
    assert rec["optimizer_state_bytes"] > 0 and rec["max_memory_bytes"] > 0


def test_no_mfu_on_cpu_without_peak(data_dir, tmp_path):
    fit(tiny_config(data_dir, tmp_path / "run", train__max_steps=1))
    records = train_log(tmp_path / "run")
    assert records and not any("mfu" in r for r in records)


def test_peak_table_and_mfu_formula(monkeypatch):
    assert metrics.peak_flops(torch.device("cpu")) is None
    assert metrics.peak_flops(torch.device("cpu"), 5e12) == 5e12
    for name, flops in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12),
                        ("NVIDIA L40S", 362e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert metrics.peak_flops(torch.device("cuda", 0)) == flops, name
    assert metrics.mfu(6e9, 1e4, 312e12, 8) == pytest.approx(6e13 / (312e12 * 8))
    assert metrics.mfu(6e9, 1e4, None, 8) is None


def test_eta_leaves_out_the_first_step():
    """The first step compiles and warms up (here 30 s, then 1 s per step): the ETA is the pace of the later
    steps times the steps left; after the first step alone there is no estimate (None, "ETA --")."""
    now = [0.0]
    thr = metrics.Throughput(clock=lambda: now[0])
    etas = []
    for seconds in (30.0, 1.0, 1.0, 1.0):
        thr.start_step()
        now[0] += seconds
        thr.end_step(tokens=10)
        etas.append(thr.eta_seconds(100 - thr.total_steps))
    assert etas == [None, 98.0, 97.0, 96.0]
    assert thr.total_seconds == 33.0  # the training time reported at the end still counts every step
