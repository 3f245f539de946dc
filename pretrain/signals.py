"""Graceful stop on SIGUSR1 / SIGTERM: finish the current step, save a checkpoint, exit; bounded even when a rank
is stuck.

The training loop all-reduces which signals any rank received, so every rank stops after the same step.
Exit codes (pretrain.loop): SIGUSR1 -> 0, for SLURM requeue flows (`#SBATCH --signal=B:USR1@180` and a
requeue in the batch script, see launch/; the job is not "failed"); SIGTERM -> 143 (128 + 15), the conventional
"terminated" status, so a scheduler or `fabric run` does not take the run for finished. Either way the
checkpoint is complete before the process exits. If ranks received different signals, SIGTERM's exit
code wins. A repeat of the same signal within REPEAT_GRACE_S seconds is ignored: srun, torchrun or a
scheduler can deliver one request twice, and it must not kill a save in progress.

Python runs signal handlers only between bytecodes, in the main thread: a rank blocked in C++ (a gloo or NCCL
collective waiting for a stopped peer, the rendezvous) never runs them. So every signal is also written to a
wake-up pipe (`signal.set_wakeup_fd`, done by the C-level handler at once) that a watchdog thread reads. The
watchdog ends the process with 128 + N (`amp_common.exits.killed_by`; 143 for SIGTERM, 138 for SIGUSR1, 130 for
SIGINT), after one line on stderr, without saving (the previous checkpoint stays the last good state), when
- a second stop signal comes later than REPEAT_GRACE_S after the first, or is of the other kind (an escape
  hatch for a hung save), or Ctrl-C comes a second time;
- the main thread has not reached the end of its step (`acknowledge`) `grace_s` seconds after the first stop
  signal (system.stop_grace_s), or has not finished `grace_s` seconds after Ctrl-C.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

HANDLED = (signal.SIGUSR1, signal.SIGTERM)
WATCHED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
REPEAT_GRACE_S = 30.0
_WAKE = 255  # a byte on the wake-up pipe that is no signal: the watchdog only recomputes its deadline


class StopRequest:
    """Records the first stop signal; installed only in the main thread (signal module rule).

    grace_s: seconds the main thread has, after the first stop signal, to reach the end of its step (and after
    Ctrl-C to finish) before the watchdog exits the process; None or 0: no deadline."""

    def __init__(self, grace_s: float | None = None) -> None:
        self.signum: int | None = None
        self.grace_s = grace_s or None
        self._since = 0.0                 # monotonic time of the first stop signal (the repeat window)
        self._deadline_from = 0.0         # ... or of the last rearm (system.stop_grace_s counts from here)
        self._interrupted = 0.0           # ... of the first Ctrl-C
        self._acknowledged = False
        self._lock = threading.Lock()
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._thread: threading.Thread | None = None

    # -- main thread
    def _handler(self, signum, frame) -> None:
        self._record(signum)  # the watchdog thread says so and applies the rules; this makes the loop see it at once

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def acknowledge(self) -> None:
        """The main thread reached the end of its step and stops now (saving): no deadline any more."""
        self._acknowledged = True

    def rearm(self) -> None:
        """The main thread saved without stopping (the signal came after the step's agreement) and trains one
        more step: that step has `grace_s` again, counted from now."""
        with self._lock:
            self._deadline_from, self._acknowledged = time.monotonic(), False
        if self._pipe is not None:
            try:
                os.write(self._pipe[1], bytes([_WAKE]))  # the watchdog recomputes its wait
            except BlockingIOError:
                pass  # the pipe is full of unread bytes: the watchdog wakes anyway

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in HANDLED:
            self._previous[s] = signal.signal(s, self._handler)
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not possible here: no watchdog (the handlers still work between bytecodes)
            os.close(r), os.close(w)
            return self
        self._pipe = (r, w)
        self._thread = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.write(self._pipe[1], b"\0")  # ends the watchdog after it has read what came before
            self._thread.join(timeout=5)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        return False

    # -- both threads
    def _record(self, signum: int) -> bool:
        """Set the stop signal if none is set yet; True if this call set it."""
        with self._lock:
            if self.signum is None and signum in HANDLED:
                self.signum = signum
                self._since = self._deadline_from = time.monotonic()
                return True
            return False

    # -- the watchdog thread
    def _watch(self) -> None:
        r = self._pipe[0]
        first: int | None = None  # the first stop signal this thread saw
        while True:
            ready, _, _ = select.select([r], [], [], self._wait())
            if not ready:
                self._check_deadline()
                continue
            for signum in os.read(r, 64):
                if signum == 0:
                    return
                if signum == signal.SIGINT:
                    if self._interrupted:
                        _exit(signum, "interrupted again: exiting now")
                    self._interrupted = time.monotonic()
                elif signum in HANDLED:
                    first = self._stop_signal(signum, first)

    def _stop_signal(self, signum: int, first: int | None) -> int:
        name = signal.Signals(signum).name
        if first is None:
            self._record(signum)
            print(f"received {name}: will save a checkpoint after the current step and exit", flush=True)
            return signum
        if signum == first and time.monotonic() - self._since < REPEAT_GRACE_S:
            print(f"received {name} again: already stopping, ignored", flush=True)
            return first
        _exit(signum, f"received {name} again after {signal.Signals(first).name}: exiting now without saving")

    def _wait(self) -> float | None:
        """Seconds until the next deadline (None: none pending)."""
        if self.grace_s is None:
            return None
        starts = [t for t, pending in ((self._deadline_from, self.signum is not None and not self._acknowledged),
                                       (self._interrupted, bool(self._interrupted))) if pending]
        return max(0.0, min(starts) + self.grace_s - time.monotonic()) if starts else None

    def _check_deadline(self) -> None:
        now = time.monotonic()
        if self._interrupted and now - self._interrupted >= self.grace_s:
            _exit(signal.SIGINT, f"interrupted, and not finished {self.grace_s:g} s later (system.stop_grace_s): "
                                 f"exiting now")
        if self.signum is not None and not self._acknowledged and now - self._deadline_from >= self.grace_s:
            _exit(self.signum, f"{signal.Signals(self.signum).name}: the current step did not end within "
                               f"system.stop_grace_s={self.grace_s:g} s (a rank waits for another that stopped "
                               f"answering, or start-up is slow): exiting now without saving")


def _exit(signum: int, message: str) -> None:
    """End the process from the watchdog thread: one line on stderr, exit 128 + signum, no clean-up (the main
    thread may be stuck in C++; the kernel releases the run lock)."""
    from amp_common.exits import killed_by

    code = killed_by(signum)
    try:
        sys.stdout.flush()
        print(f"error: {message} (exit {code}); the newest checkpoint is the last good state", file=sys.stderr,
              flush=True)
    finally:
        os._exit(code)
