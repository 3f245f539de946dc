"""Atomic outputs and progress bars for the checkpoint tools.

Why: an export of a 13B model takes minutes and can die (out of memory, disk full, Ctrl-C, a bad
tensor found half-way). A half-written `model.safetensors` next to a valid `config.json` would load
wrongly or crash much later, far from the cause. So every output is built under a hidden temporary
name in the destination's folder (same filesystem, so the final `rename` is atomic), fsynced, and only
then renamed into place; on any error the temporary is deleted and the destination is untouched.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from checkpoints_util.save import CheckpointError
from checkpoints_util.save import fsync_path as _fsync


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the result the usual umask-based modes instead."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def check_destination(final: str | Path, overwrite: bool) -> None:
    """Refuse an existing destination unless overwrite; call it before any slow work."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final}: already exists; pass --overwrite to replace it, or choose another --out")
    if not final.parent.exists():
        final.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` when the block ends without an error."""
    final = Path(final)
    check_destination(final, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            _publish_mode(p, p.is_dir())
            if p.is_file():
                _fsync(p)
        _publish_mode(tmp, True)
        _fsync(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        _fsync(final.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that replaces `final` atomically when the block ends without an error."""
    final = Path(final)
    if final.is_dir():
        raise CheckpointError(f"{final}: is a folder; --out must name a file")
    check_destination(final, overwrite)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish_mode(tmp, False)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def progress(total: int, desc: str, quiet: bool, unit: str = "B"):
    """A tqdm bar on stderr (bytes by default); a silent stand-in when quiet."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                disable=quiet, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123' -> bytes (decimal units for GB/MB/KB as Hugging Face uses them)."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise CheckpointError(f"cannot read the size {text!r} (use e.g. 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise CheckpointError(f"size {text!r} must be positive")
    return int(value * mult)
