"""Graceful stop on SIGUSR1 / SIGTERM: finish the current step, save a checkpoint, exit.

The training loop all-reduces which signals any rank received, so every rank stops after the same step.
Exit codes (pretrain.loop): SIGUSR1 -> 0, for SLURM requeue flows (`#SBATCH --signal=B:USR1@180` and a
requeue in the batch script, see launch/; the job is not "failed"); SIGTERM -> 143 (128 + 15), the conventional
"terminated" status, so a scheduler or `fabric run` does not take the run for finished. Either way the
checkpoint is complete before the process exits. If ranks received different signals, SIGTERM's exit
code wins. A repeat of the same signal within REPEAT_GRACE_S seconds is ignored: srun, torchrun or a
scheduler can deliver one request twice, and it must not kill a save in progress. Any later second
signal (or the other kind) gets the default action (the process dies at once): an escape hatch for a
hung save; the previous checkpoint stays valid.
"""
from __future__ import annotations

import signal
import threading
import time

HANDLED = (signal.SIGUSR1, signal.SIGTERM)
REPEAT_GRACE_S = 30.0


class StopRequest:
    """Records the first stop signal; installed only in the main thread (signal module rule)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._since = 0.0
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == self.signum and time.monotonic() - self._since < REPEAT_GRACE_S:
                print(f"received {signal.Signals(signum).name} again: already stopping, ignored", flush=True)
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum, self._since = signum, time.monotonic()
        print(f"received {signal.Signals(signum).name}: will save a checkpoint after the current step and exit",
              flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False
