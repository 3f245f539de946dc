"""Readers for the two source formats, with errors that name the file and line.

- C4: gzip'd JSON lines ``{"text", "timestamp", "url"}`` (``*.json.gz``).
- SlimPajama: zstd-compressed JSON lines ``{"text", "meta": {"redpajama_set_name"}}`` (``*.jsonl.zst``).

Reading is two steps: `iter_lines` decompresses and yields raw lines with their line number;
`parse_line` (JSON, validation, set filtering) turns one into a document text or a skip reason, which
prepare counts. prepare runs both in its reading thread, ahead of the tokenizer.

Rules (see data/README.md): a corrupt/truncated stream, a line that is not JSON, not valid UTF-8, or
lacks a string ``text`` field is a `DataError`; an empty (whitespace-only) document and a document of a
skipped SlimPajama set are counted skips; blank lines are ignored.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from data.errors import DataError

SUFFIXES = (".json.gz", ".jsonl.zst")
_CHUNK = 1 << 16  # small enough that "after line N" in a stream error points near the damage


def source_format(path: str | os.PathLike) -> str:
    name = str(path)
    if name.endswith(".json.gz") or name.endswith(".jsonl.gz"):
        return "c4"
    if name.endswith(".jsonl.zst") or name.endswith(".json.zst"):
        return "slimpajama"
    raise DataError(path, f"unknown source format (expected a name ending in {' or '.join(SUFFIXES)})")


def expand_sources(patterns: Iterable[str]) -> list[Path]:
    """Globs, folders (their *.json.gz / *.jsonl.zst files, recursively) or plain files -> sorted, unique.

    Sorted so that the token stream, and therefore every window, does not depend on directory order.
    """
    found: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            hits = [q for q in p.rglob("*") if q.is_file() and q.name.endswith(SUFFIXES)]
        elif p.is_file():
            hits = [p]
        else:
            hits = [Path(q) for q in glob.glob(str(pat), recursive=True) if Path(q).is_file()]
        if not hits:
            raise DataError(pat, "matches no source file (*.json.gz or *.jsonl.zst)")
        for h in sorted(hits):
            source_format(h)
            found.append(h.resolve())
    out, seen = [], set()
    for h in sorted(found):
        if h not in seen:
            seen.add(h)
            out.append(h)
    return out


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


def _gzip_chunks(path: Path, f, state: dict) -> Iterator[bytes]:
    g = gzip.GzipFile(fileobj=f, mode="rb")
    while True:
        try:
            chunk = g.read(_CHUNK)
        except EOFError:
            raise DataError(f"{path}, after line {state['line']}",
                            f"truncated gzip stream (compressed file ends at byte {f.tell()} "
                            "before the end-of-stream marker)") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise DataError(f"{path}, after line {state['line']}",
                            f"corrupt gzip data near compressed byte {f.tell()} ({e})") from None
        if not chunk:
            return
        yield chunk


def _zstd_chunks(path: Path, f, state: dict) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    while True:
        data = f.read(_CHUNK)
        if not data:
            break
        while data:
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise DataError(f"{path}, after line {state['line']}",
                                f"corrupt zstd data near compressed byte {f.tell()} ({e})") from None
            fed = True
            if out:
                yield out
            if dobj.eof:  # a frame ended; the rest (if any) starts the next frame
                data = dobj.unused_data
                dobj, fed = dctx.decompressobj(), False
            else:
                data = b""
    if fed and not dobj.eof:
        raise DataError(f"{path}, after line {state['line']}",
                        f"truncated zstd stream (file ends at byte {f.tell()} inside a frame)")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(line_number, raw_line_bytes, compressed_bytes_read_so_far)``; line numbers are 1-based.

    Blank lines are skipped (but counted in the numbering).
    """
    path = Path(path)
    fmt = source_format(path)
    state = {"line": 0}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(path, f"cannot open ({e.strerror})") from None
    with f:
        chunks = _gzip_chunks(path, f, state) if fmt == "c4" else _zstd_chunks(path, f, state)
        for raw in _split_lines(chunks):
            state["line"] += 1
            if raw.strip():
                yield state["line"], raw, f.tell()


def parse_line(path: str, line_no: int, raw: bytes, skip_sets: frozenset[str] = frozenset()) -> tuple[str | None, str]:
    """Return ``(text, "ok")`` or ``(None, skip_reason)``; raise DataError on bad input."""
    where = f"{path}, line {line_no}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(where, f"not valid UTF-8 (at byte offset {e.start} of the line: "
                               f"{raw[e.start:e.start + 4]!r})") from None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(where, f"not a JSON object ({e.msg} at column {e.colno}): {line[:60]!r}") from None
    if not isinstance(rec, dict):
        raise DataError(where, f"expected a JSON object, got {type(rec).__name__}")
    if "text" not in rec:
        raise DataError(where, f"missing 'text' field (keys: {sorted(rec)[:8]})")
    text = rec["text"]
    if not isinstance(text, str):
        raise DataError(where, f"'text' must be a string, got {type(text).__name__}")
    if skip_sets:
        meta = rec.get("meta")
        name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        if name in skip_sets:
            return None, f"set:{name}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(where, f"'text' is not valid Unicode (lone surrogate at character {e.start})") from None
    if not text.strip():
        return None, "empty"
    return text, "ok"


def iter_texts(path: str | os.PathLike, skip_sets: Sequence[str] = ()) -> Iterator[str]:
    """Every document text of one file, in order (empty and skipped documents left out)."""
    sets = frozenset(skip_sets)
    for line_no, raw, _ in iter_lines(path):
        text, _status = parse_line(str(path), line_no, raw, sets)
        if text is not None:
            yield text
