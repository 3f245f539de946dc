"""Atomic writes: every file and folder the app writes appears whole or not at all.

The bytes go to a hidden temporary name in the destination's folder (same filesystem, so the final rename
is atomic), are fsync'd, and only then renamed into place; on any error the temporary is removed and the
destination is untouched. A process killed in between leaves at most a hidden `.<name>.<random>.tmp` entry.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


class WriteError(RuntimeError):
    """Writing failed for a reason of the disk (no space, read-only, no permission); the message names the path."""


FULL_BELOW_BYTES = 1 << 20  # a filesystem with less free space than this after a failed write is full


def out_of_space(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether `error`, raised while writing under `path`, means its filesystem is full (or over quota).

    An OSError says so with its errno (ENOSPC, EDQUOT, anywhere in the cause chain); safetensors raises a
    `SafetensorError` that only quotes the OS message; torch's writer (`torch.save`, DCP's files) raises
    `RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...` with neither: for that one,
    check the free space left on `path`'s filesystem (call this before removing the partial output)."""
    import errno

    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno in (errno.ENOSPC, errno.EDQUOT)
        if any(os.strerror(n) in str(e) for n in (errno.ENOSPC, errno.EDQUOT)):
            return True
        e = e.__cause__ or e.__context__
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def fsync_path(path: str | os.PathLike) -> None:
    """Best-effort fsync of a file or folder (some filesystems refuse it on folders: ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder below `root` (and `root`)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the result the usual umask-based modes instead."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _fsync_file(path: Path) -> None:
    """fsync a written file; unlike a folder's, a file's fsync error (no space, I/O) is the write's error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `final`'s folder; it replaces `final` when the block ends without an error."""
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish_mode(tmp, False)
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` (replacing it) when the block ends without an error."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            _publish_mode(p, p.is_dir())
        _publish_mode(tmp, True)
        fsync_tree(tmp)
        replace_dir(tmp, final, final.parent / f".{final.name}.old-{os.getpid()}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path, old: Path) -> None:
    """Rename folder `tmp` to `final`; an existing `final` is moved to `old` first and deleted once the new one is
    in place (put back if the rename fails). A crash in between leaves `tmp` and `old`, never neither."""
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    had_final = final.exists()
    if had_final:
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if had_final:
            old.rename(final)
        raise
    fsync_path(final.parent)
    if had_final:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write `chunks` (bytes-like objects) to `path` atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, [text.encode("utf-8")])


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
