"""Throughput, MFU and memory: what the console and TensorBoard report besides the loss."""
from __future__ import annotations

import resource
import sys
import time

import torch

# Peak dense bf16 tensor-core FLOP/s per GPU (vendor data sheets, without sparsity). Matched against
# torch.cuda.get_device_name() in order: the first substring that occurs wins, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("A10", 125e12),
)


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override when given, else the table (CUDA only), else None."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_device: float | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices (None if no peak)."""
    if not peak_per_device:
        return None
    return flops_per_token * tokens_per_s / (peak_per_device * n_devices)


def max_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated bytes on this device. CPU: this process's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class Throughput:
    """Tokens/s over the steps since the last report; time spent outside training steps is excluded.

    `clock` is the time source (seconds; tests pass a fake one)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self._t0: float | None = None
        self.total_seconds = 0.0
        self.total_steps = 0
        self.first_step_seconds = 0.0  # includes compiling and warm-up: not a typical step

    def start_step(self) -> None:
        self._t0 = self.clock()

    def end_step(self, tokens: int) -> float:
        dt = self.clock() - self._t0
        self.tokens += tokens
        self.seconds += dt
        self.steps += 1
        if self.total_steps == 0:
            self.first_step_seconds = dt
        self.total_seconds += dt
        self.total_steps += 1
        return dt

    def report(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the last report, then reset the window."""
        tps = self.tokens / self.seconds if self.seconds > 0 else 0.0
        sps = self.seconds / self.steps if self.steps else 0.0
        self.tokens, self.seconds, self.steps = 0, 0.0, 0
        return tps, sps

    def eta_seconds(self, remaining_steps: int) -> float | None:
        """Seconds for `remaining_steps` more steps at the mean pace of this process's steps after its first
        (the first compiles and warms up: counting it would inflate the estimate of every later step); None
        until a second step has been timed."""
        if self.total_steps < 2:
            return None
        return remaining_steps * (self.total_seconds - self.first_step_seconds) / (self.total_steps - 1)


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
