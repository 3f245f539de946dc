"""Readers for the source formats, with errors that name the file and line (or row group and row).

- C4: gzip'd JSON lines ``{"text", "timestamp", "url"}`` (``*.json.gz``).
- SlimPajama: zstd-compressed JSON lines ``{"text", "meta": {"redpajama_set_name"}}`` (``*.jsonl.zst``).
- Parquet (FineWeb, FineWeb-Edu, most Hugging Face dataset exports): a string column, ``text`` by default
  (``*.parquet``), read in record batches of one row group at a time (`parquet_text_batches`), so memory
  stays bounded by one row group's text column whatever the file size.

JSON reading is two steps: `iter_lines` decompresses and yields raw lines with their line number;
`parse_line` (JSON, validation, set filtering) turns one into a document text or a skip reason, which
prepare counts. prepare runs both in its reading thread, ahead of the tokenizer. The document field is
``text`` unless prepare's ``--text-field`` names another (for every format).

Rules (see data/README.md): a corrupt/truncated stream or parquet file, a line that is not JSON, not valid
UTF-8, or lacks a string text field, a parquet file without that column or with a null/non-string value
is a `DataError`; an empty (whitespace-only) document and a document of a skipped SlimPajama set are
counted skips; blank lines are ignored. Parquet positions are 0-based, as pyarrow numbers them.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from data.errors import DataError

SUFFIXES = (".json.gz", ".jsonl.zst", ".parquet")
DEFAULT_TEXT_FIELD = "text"
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow record batch (a row group is read in batches of this many)
_CHUNK = 1 << 16  # small enough that "after line N" in a stream error points near the damage


def source_format(path: str | os.PathLike) -> str:
    name = str(path)
    if name.endswith(".json.gz") or name.endswith(".jsonl.gz"):
        return "c4"
    if name.endswith(".jsonl.zst") or name.endswith(".json.zst"):
        return "slimpajama"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(path, f"unknown source format (expected a name ending in {' or '.join(SUFFIXES)})")


def expand_sources(patterns: Iterable[str]) -> list[Path]:
    """Globs, folders (their *.json.gz / *.jsonl.zst / *.parquet files, recursively) or plain files -> sorted,
    unique.

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
            raise DataError(pat, "matches no source file (*.json.gz, *.jsonl.zst or *.parquet)")
        for h in sorted(hits):
            source_format(h)
            found.append(h.resolve())
    out, seen = [], set()
    for h in sorted(found):
        if h not in seen:
            seen.add(h)
            out.append(h)
    return out


def check_splits(splits: dict[str, Sequence[Path]]) -> None:
    """One DataError for a source of 0 bytes (a .json.gz, .jsonl.zst or .parquet file holds at least its
    header: an empty one is a failed download or copy, not an empty corpus) and for a file given twice,
    in two splits (validation on training data) or in one, also through another path (a hard link)."""
    seen: dict[tuple[int, int], tuple[str, Path]] = {}
    for split, paths in splits.items():
        for path in paths:
            try:
                st = path.stat()
            except OSError as e:
                raise DataError(path, f"cannot read ({e.strerror})") from None
            if st.st_size == 0:
                raise DataError(path, "empty file (0 bytes), not a source of no documents: a failed download "
                                      "or copy? remove it or replace it")
            first = seen.setdefault((st.st_dev, st.st_ino), (split, path))
            if first != (split, path):
                where = "both a --train and a --val source" if split != first[0] else f"given twice in --{split}"
                raise DataError(path, f"the same file as {first[1]} ({where}): each source may be read once, "
                                      "and validation data must not be training data")


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
    if fmt == "parquet":
        raise ValueError(f"{path}: a parquet file has no lines; read it with parquet_text_batches")
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


def parse_line(path: str, line_no: int, raw: bytes, skip_sets: frozenset[str] = frozenset(),
               text_field: str = DEFAULT_TEXT_FIELD) -> tuple[str | None, str]:
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
    if text_field not in rec:
        raise DataError(where, f"missing {text_field!r} field (keys: {sorted(rec)[:8]})")
    text = rec[text_field]
    if not isinstance(text, str):
        raise DataError(where, f"{text_field!r} must be a string, got {type(text).__name__}")
    if skip_sets:
        meta = rec.get("meta")
        name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        if name in skip_sets:
            return None, f"set:{name}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(where, f"{text_field!r} is not valid Unicode (lone surrogate at character {e.start})") from None
    if not text.strip():
        return None, "empty"
    return text, "ok"


def json_text_batches(src: str | os.PathLike, sets: frozenset[str], batch_bytes: int,
                      text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[list[str], dict, int]]:
    """``(texts, skip counts, compressed bytes read so far)`` for each ~`batch_bytes` of raw lines, in order."""
    texts, skipped, nbytes, pos = [], collections.Counter(), 0, 0
    for line_no, raw, pos in iter_lines(src):
        text, status = parse_line(str(src), line_no, raw, sets, text_field)
        if text is None:
            skipped[status] += 1
        else:
            texts.append(text)
        nbytes += len(raw)
        if nbytes >= batch_bytes:
            yield texts, skipped, pos
            texts, skipped, nbytes = [], collections.Counter(), 0
    if texts or skipped:
        yield texts, skipped, pos


def _open_parquet(path: Path, text_field: str):
    """The pyarrow ParquetFile of `path`, checked to hold a string column `text_field`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except OSError as e:
        if e.strerror:  # the OS refused (no permission, gone): not a damaged file
            raise DataError(path, f"cannot open ({e.strerror})") from None
        raise DataError(path, f"not a readable parquet file ({_arrow_message(e)})") from None
    except (pa.ArrowException, ValueError) as e:
        raise DataError(path, f"not a readable parquet file ({_arrow_message(e)})") from None
    schema = f.schema_arrow
    if schema.get_field_index(text_field) < 0:
        raise DataError(path, f"no column {text_field!r} (columns: {schema.names[:8]}); name the text column "
                              "with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(path, f"column {text_field!r} holds {kind}, not strings")
    return f


def _arrow_message(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def parquet_text_batches(src: str | os.PathLike, batch_bytes: int, text_field: str = DEFAULT_TEXT_FIELD
                         ) -> Iterator[tuple[list[str], dict, int]]:
    """Like `json_text_batches`, for a parquet file: record batches of one row group at a time.

    The third item is the source's size times the fraction of rows read (parquet has no meaningful
    "compressed bytes so far"), for prepare's progress bar."""
    import pyarrow as pa

    path = Path(src)
    f = _open_parquet(path, text_field)
    size = path.stat().st_size
    total_rows = max(f.metadata.num_rows, 1)
    texts, skipped, nbytes, rows_done = [], collections.Counter(), 0, 0
    for group in range(f.num_row_groups):
        first = rows_done  # file row of the group's first row
        try:
            batches = f.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field],
                                     use_threads=False)
            for batch in batches:
                column = batch.column(0)
                if column.null_count:
                    row = first + column.is_null().to_pylist().index(True)
                    raise DataError(f"{path}, row group {group}, row {row}",
                                    f"{text_field!r} is null, not a string")
                try:
                    values = column.to_pylist()
                except UnicodeDecodeError:
                    row = first + _first_bad_utf8(column)
                    raise DataError(f"{path}, row group {group}, row {row}", f"{text_field!r} is not valid UTF-8"
                                    ) from None
                for text in values:
                    if text.strip():
                        texts.append(text)
                        nbytes += len(text)
                    else:
                        skipped["empty"] += 1
                first += len(values)
                if nbytes >= batch_bytes:
                    yield texts, skipped, size * first // total_rows
                    texts, skipped, nbytes = [], collections.Counter(), 0
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}, row group {group}", f"damaged parquet data ({_arrow_message(e)})") from None
        rows_done += f.metadata.row_group(group).num_rows
    if texts or skipped:
        yield texts, skipped, size


def _first_bad_utf8(column) -> int:
    for i, raw in enumerate(column.cast("binary").to_pylist()):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return i
    return 0


def text_batches(src: str | os.PathLike, sets: frozenset[str], batch_bytes: int,
                 text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[list[str], dict, int]]:
    """Any source's ``(texts, skip counts, source bytes read so far)`` batches, in document order."""
    if source_format(src) == "parquet":
        return parquet_text_batches(src, batch_bytes, text_field)
    return json_text_batches(src, sets, batch_bytes, text_field)


def iter_texts(path: str | os.PathLike, skip_sets: Sequence[str] = (),
               text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """Every document text of one file, in order (empty and skipped documents left out)."""
    for texts, _, _ in text_batches(path, frozenset(skip_sets), 1 << 20, text_field):
        yield from texts
