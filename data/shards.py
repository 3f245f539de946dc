"""The packed shard format: a fixed 32-byte header, then the tokens, little-endian.

    offset  size  field
    0       8     magic  b"AMPTOKS\\0"
    8       4     version (uint32) = 1
    12      4     dtype code (uint32): 1 = uint16, 2 = int32
    16      8     token count (uint64)
    24      8     reserved, zero
    32      ...   token count x itemsize bytes of tokens

Why a header at all: a shard is self-describing and checkable on open (wrong magic, unknown version,
or a file size that does not equal header + count x itemsize is a `DataError`, never silent garbage).
uint16 halves disk and page-cache use whenever the vocabulary fits in 65,536 ids.

Writes are atomic (amp_common.atomic): the bytes go to a hidden temporary name in the same folder, are
fsync'd, then `os.replace`d onto the final name. An interrupted writer therefore leaves at most a
``.*.tmp`` file, never a file under a shard name that looks complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from amp_common import atomic
from data.errors import DataError, DataWriteError

MAGIC = b"AMPTOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = HEADER.size  # 32
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
CODES = {np.dtype("<u2"): 1, np.dtype("<i4"): 2}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def make_folder(path: str | os.PathLike) -> None:
    """``mkdir -p``; a failure (a file in the way, no permission, ...) is a DataError naming the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise DataError(blocker, "is a file, not a folder") from None
        raise DataWriteError(e.filename or path, f"cannot create folder ({e.strerror})") from None


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write `chunks` (bytes-like objects) to `path` atomically (amp_common.atomic).

    A failure (disk full, no permission, a folder in the way) removes the temporary file and is a
    DataError naming `path`; `path` itself is then untouched."""
    try:
        atomic.atomic_write_bytes(path, chunks)
    except OSError as e:
        raise DataWriteError(path, f"cannot write ({e.strerror or e})") from None


def remove_file(path: str | os.PathLike) -> None:
    """Delete `path` if it exists; a failure is a DataError naming it."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as e:
        raise DataWriteError(path, f"cannot delete ({e.strerror})") from None


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, [json.dumps(obj, indent=1).encode("utf-8") + b"\n"])


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> int:
    """Atomically write `tokens` as a shard of `dtype`; returns the file size in bytes."""
    dtype = np.dtype(dtype)
    arr = np.ascontiguousarray(tokens)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {dtype}")
    arr = arr.astype(dtype, copy=False)
    header = HEADER.pack(MAGIC, VERSION, CODES[dtype], arr.size, 0)
    atomic_write_bytes(path, [header, memoryview(arr).cast("B")])
    return HEADER_SIZE + arr.nbytes


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """Validate a shard's header and size; return ``(dtype, token_count)``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise DataError(path, f"cannot read shard ({e.strerror})") from None
    if len(head) < HEADER_SIZE:
        raise DataError(path, f"not a token shard: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, count, _ = HEADER.unpack(head)
    if magic != MAGIC:
        raise DataError(path, f"not a token shard: bad magic {magic!r} at offset 0 (expected {MAGIC!r})")
    if version != VERSION:
        raise DataError(path, f"unsupported shard version {version} (this code reads {VERSION})")
    if code not in DTYPES:
        raise DataError(path, f"unknown dtype code {code} at offset 12")
    dtype = DTYPES[code]
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        raise DataError(path, f"size {size} bytes does not match header ({count} {dtype.name} tokens "
                              f"-> {expected} bytes); the shard is truncated or padded")
    return dtype, count


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a validated shard read-only (nothing is loaded until touched)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
