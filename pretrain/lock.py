"""One trainer per run folder: rank 0 holds an exclusive lock on `<out_dir>/.lock` while it runs.

`fcntl.flock`: the kernel releases it when the process ends in any way (kill -9 included), so a crashed
run leaves no stale lock to clean up; the file only keeps who held it last, for the error message.
Filesystems without flock support (some NFS mounts) get a warning and no lock.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from checkpoints_util.layout import LOCK_FILE


class LockedError(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when the filesystem cannot lock. Raises LockedError if taken."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise LockedError(f"{self.path.parent}: another training run uses this out_dir ({holder}); stop "
                                  f"it first, or choose another --out_dir") from None
            return f"{self.path}: cannot lock on this filesystem ({os.strerror(e.errno)}): make sure no other run " \
                   f"uses this out_dir"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
