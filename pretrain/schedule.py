"""Learning-rate schedule: linear warm-up, then cosine decay to a minimum (TinyLlama / litgpt style)."""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based: the first update is step 1).

    Steps 1..warmup_steps: lr * step / warmup_steps (linear, reaching lr at step warmup_steps).
    Then cosine from lr (at step warmup_steps) to min_lr (at step total_steps); min_lr afterwards.
    """
    if step < 1:
        raise ValueError(f"optimizer steps are 1-based, got step {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's learning rate (schedule-owned, so a resumed run gets the same values)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
