"""Faults injected from tests, never from the product: a real signal after a given step, a NaN loss at one.

`install(stop_at=..., nan_at=..., signum=...)` wraps `pretrain.loop._one_step`; in-process tests call it
through the `faults` fixture (tests/conftest.py, undone after the test), multi-process runs through
`tests/helpers/fault_run.py`, which reads `AMP_TEST_FAULTS` (e.g. "stop_at=3,nan_at=5") in every rank.
"""
from __future__ import annotations

import math
import os
import signal


def install(setattr_, stop_at: int = 0, nan_at: int = 0, signum: int = signal.SIGUSR1) -> None:
    """`setattr_` is monkeypatch.setattr (or plain setattr): how the wrappers are put in place."""
    from pretrain import loop, step

    real_one_step, real_loss = loop._one_step, step.batch_loss

    def nan_loss(model, batch):
        return real_loss(model, batch) * math.nan

    def one_step(run, thr):
        if nan_at and run.state.step + 1 == nan_at:
            setattr_(step, "batch_loss", nan_loss)
        try:
            out = real_one_step(run, thr)
        finally:
            setattr_(step, "batch_loss", real_loss)
        if stop_at and run.state.step == stop_at:
            os.kill(os.getpid(), signum)  # the real signal: the handler records it, the loop saves and stops
        return out

    setattr_(loop, "_one_step", one_step)


def from_env(value: str) -> dict:
    """"stop_at=3,nan_at=5,signum=15" -> install()'s keyword arguments."""
    return {k: int(v) for k, v in (item.split("=") for item in value.split(",") if item)}
