"""Exit codes of the app's command-line tools (`python -m pretrain`, `python -m data.prepare`, `amp-ckpt`).

| code | meaning |
|---:|---|
| 0 | done (pretrain: also stopped by SIGUSR1 after saving, so a SLURM job can requeue) |
| 1 | pretrain: the loss or gradient became NaN/inf; nothing was saved after the last good checkpoint |
| 2 | bad input: an option, config file, data folder or checkpoint is wrong (one line names it) |
| 3 | the disk: no space, not writable, or a file the OS could not read (one line names it; nothing half-written) |
| 4 | pretrain: another rank stopped answering (system.collective_timeout_s) or died; the newest checkpoint stands |
| 130 | interrupted (Ctrl-C) |
| 143 | pretrain: stopped by SIGTERM after saving (128 + 15) |
| 128+N | pretrain: signal N ended it unsaved (a 2nd signal, or no step end within system.stop_grace_s) |
"""
OK = 0
NON_FINITE = 1
BAD_INPUT = 2
DISK = 3
PEER_LOST = 4
INTERRUPTED = 130
SIGTERM = 143


def killed_by(signum: int) -> int:
    """The exit code of a process ended because of signal `signum` (the shell's 128 + N)."""
    return 128 + int(signum)


def os_error_line(e: OSError) -> str:
    """`PATH: reason` of an OSError for a one-line message (just the reason when it names no file)."""
    return f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")
