"""sha256 of a file, read in chunks: checkpoint files (`checkpoints_util.store`) and tokenizer models
(`data.tokenizer`, recorded in manifests) are checked with it."""
from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 24


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
