"""Atomic outputs and progress bars for the checkpoint tools.

Why: an export of a 13B model takes minutes and can die (out of memory, disk full, Ctrl-C, a bad
tensor found half-way). A half-written `model.safetensors` next to a valid `config.json` would load
wrongly or crash much later, far from the cause. So every output is built under a hidden temporary
name in the destination's folder (same filesystem, so the final `rename` is atomic), fsynced, and only
then renamed into place; on any error the temporary is deleted and the destination is untouched.
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from amp_common import atomic
from amp_common.atomic import WriteError, out_of_space
from checkpoints_util.layout import CheckpointError


def check_destination(final: str | Path, overwrite: bool) -> None:
    """Refuse an existing destination unless overwrite; call it before any slow work."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final}: already exists; pass --overwrite to replace it, or choose another --out")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{final.parent}: cannot create the output folder ({e.strerror or e})") from None


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` when the block ends without an error."""
    check_destination(final, overwrite)
    with _disk_errors(final), atomic.atomic_dir(final) as tmp, _disk_errors(final):  # inner: before the cleanup
        yield tmp


@contextmanager
def atomic_file(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that replaces `final` atomically when the block ends without an error."""
    final = Path(final)
    if final.is_dir():
        raise CheckpointError(f"{final}: is a folder; --out must name a file")
    check_destination(final, overwrite)
    with _disk_errors(final), atomic.atomic_file(final) as tmp, _disk_errors(final):  # inner: before the cleanup
        yield tmp


@contextmanager
def _disk_errors(final: str | Path) -> Iterator[None]:
    """An OSError while writing `final` (disk full, no permission), or a writer's error on a full disk (torch.save
    and safetensors raise ones without an errno), becomes one WriteError naming it. Wrap the writing itself (the
    free space is checked while the partial output is still there) and the temporary's creation and rename."""
    try:
        yield
    except (CheckpointError, WriteError):
        raise
    except Exception as e:
        if out_of_space(e, final):
            raise WriteError(f"{final}: could not write it ({os.strerror(errno.ENOSPC)}); nothing was left "
                             f"behind") from None
        if isinstance(e, OSError):
            raise WriteError(f"{final}: could not write it ({e.strerror or e}); nothing was left behind") from None
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
