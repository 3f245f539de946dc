"""``python -m data.prepare`` / ``amp-prepare``: C4 / SlimPajama / parquet sources -> packed token shards.

Tokenizer: a SentencePiece model or a Hugging Face tokenizer.json (``data.tokenizer.load_tokenizer``). With
``--part K/N`` only part K of N of the sources is prepared (data/parts.py); the run without it writes the
manifest.

Layout written under ``--out DIR``::

    DIR/train/manifest.json  DIR/train/<source-stem>-<hash>-NNNN.bin ...
    DIR/val/manifest.json    DIR/val/...

``data.loader.build_loader(DIR, "train" | "val", ...)`` reads it. With no ``--train``/``--val`` the
embedded sample corpus and ``data/sample/tokenizer.model`` are used (the CPU demo)::

    python -m data.prepare --out out/data/sample

Each document becomes BOS + tokens + EOS; documents are concatenated in source order (sources sorted by
path); each source's tokens are cut into shards of exactly --shard-tokens (the last one shorter). Nothing
is dropped and nothing is padded.

Speed: one process. A reading thread decompresses and parses JSON a few batches ahead; SentencePiece
encodes each batch on ``--workers`` threads of its own (without holding the GIL) and hands back int32
buffers, so no Python object is made per token and nothing is pickled between processes. Batches are
used in order, so the output does not depend on the worker count.

Restartability: every shard and manifest write is atomic (see data/shards.py), and each finished
source file appends one fsync'd line to ``progress.jsonl`` (an append-only journal: O(1) work per
source, where rewriting a manifest after each of SlimPajama's ~60k files would be quadratic). Each line
records what made the shards: the tokenizer's sha256 and the options that shape the bytes (skipped sets,
shard size, dtype). A re-run keeps a source only if its entry matches all of that and the source's path,
size and mtime, and its shards validate; it redoes the rest. The manifest is written once at the start
(tokenizer + options, ``"complete": false``) and once at the end. A run with another tokenizer or other
options into a folder whose manifest says otherwise is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Generator, Iterator, Sequence, TypeVar

import numpy as np

from data.cli import MAX_THREADS, Parser, int_in
from data.errors import DataError, DataWriteError
from data.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, read_manifest
from data.parts import JOURNAL_NAME, journal_names, part_arg, part_sources
from data.readers import DEFAULT_TEXT_FIELD, check_splits, expand_sources, source_format, text_batches
from data.shards import atomic_write_json, dtype_for_vocab, make_folder, read_header, remove_file, write_shard
from data.tokenizer import SAMPLE_TOKENIZER, SAMPLE_TRAIN, SAMPLE_VAL, Tokenizer, load_tokenizer

BATCH_BYTES = 1 << 20  # raw JSON bytes per tokenising thread in one SentencePiece batch
READ_AHEAD = 4  # parsed batches the reading thread may hold ready for the tokenizer
DEFAULT_SHARD_TOKENS = 1 << 26

T = TypeVar("T")

# --- reading and tokenising ---------------------------------------------------------------------


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` unless `stop` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _read_ahead(items: Generator[T, None, None], depth: int) -> Iterator[T]:
    """Yield `items`, produced up to `depth` ahead by a background thread; its errors are raised here, in order.

    Decompression and JSON parsing then overlap with SentencePiece, which encodes without holding the GIL.
    Closing this generator (an error or Ctrl-C in the consumer) stops and joins the thread.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in items:
                if not _put(q, (item, None), stop):
                    return
            _put(q, (end, None), stop)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            _put(q, (end, e), stop)
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _ShardCutter:
    """Cuts one source's token stream into shards of exactly `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, split_dir: Path, stem: str, dtype: np.dtype, shard_tokens: int):
        self.split_dir, self.stem, self.dtype, self.shard_tokens = split_dir, stem, dtype, shard_tokens
        self.shards: list[dict] = []
        self.buf: list[np.ndarray] = []
        self.buffered = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.buffered += int(tokens.size)
        if self.buffered >= self.shard_tokens:
            self._write(final=False)

    def finish(self) -> list[dict]:
        """Write the remaining tokens; return the ``{file, num_tokens, bytes}`` of every shard written."""
        self._write(final=True)
        return self.shards

    def _write(self, final: bool) -> None:
        """Write full shards; with `final`, also the remainder."""
        if not self.buffered:
            return
        data = np.concatenate(self.buf)
        start = 0
        while data.size - start >= self.shard_tokens or (final and start < data.size):
            piece = data[start:start + self.shard_tokens]
            name = f"{self.stem}-{len(self.shards):04d}.bin"
            nbytes = write_shard(self.split_dir / name, piece, self.dtype)
            self.shards.append({"file": name, "num_tokens": int(piece.size), "bytes": nbytes})
            start += piece.size
        self.buf = [data[start:]] if start < data.size else []
        self.buffered = int(data.size - start)


# --- main side ----------------------------------------------------------------------------------

def _shard_stem(src: Path) -> str:
    name = src.name
    for suf in (".json.gz", ".jsonl.gz", ".jsonl.zst", ".json.zst", ".parquet"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return f"{name}-{hashlib.sha1(str(src).encode()).hexdigest()[:8]}"


def _source_done(split_dir: Path, prev: dict | None, st: os.stat_result, made_with: dict) -> bool:
    """Whether `prev` (an earlier run's entry for this source) can be kept: same tokenizer and options, same
    source size and mtime, and every shard it lists is valid and holds the tokens it says."""
    if not prev or prev.get("made_with") != made_with:
        return False
    if prev.get("size") != st.st_size or prev.get("mtime_ns") != st.st_mtime_ns:
        return False
    try:
        for s in prev["shards"]:
            _, count = read_header(split_dir / s["file"])
            if count != s["num_tokens"]:
                return False
    except (DataError, KeyError, TypeError):  # a bad shard, or a hand-edited entry: redo the source
        return False
    return True


def _clear_split(split_dir: Path) -> None:
    for p in split_dir.iterdir():
        if p.name == MANIFEST_NAME or p.suffix in (".bin", ".tmp") or p.name in journal_names(split_dir):
            remove_file(p)


def _read_journal(split_dir: Path, name: str = JOURNAL_NAME, repair: bool = True) -> dict[str, dict]:
    """Finished-source entries appended by earlier runs, by path (later lines win).

    With `repair`, a line torn by a kill (no trailing newline) is cut off first, so the next append starts
    clean (only the journal's own writer repairs it; a torn line is skipped either way).
    """
    path = split_dir / name
    if not path.exists():
        return {}
    try:
        data = path.read_bytes()
        if repair and data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
    except OSError as e:
        raise DataError(path, f"cannot read or repair the journal ({e.strerror})") from None
    out = {}
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            out[entry["path"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # damaged line: that source is simply redone
    return out


def _append_journal(split_dir: Path, entry: dict, name: str = JOURNAL_NAME) -> None:
    """Append one line; a line torn by a failure (disk full) is cut off by the next run's _read_journal."""
    path = split_dir / name
    try:
        with open(path, "ab") as f:
            f.write(json.dumps(entry).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise DataWriteError(path, f"cannot write ({e.strerror or e})") from None


def prepare_split(split: str, sources: Sequence[Path], tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                  workers: int = 1, skip_sets: Sequence[str] = (), shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  overwrite: bool = False, progress: bool = True, text_field: str = DEFAULT_TEXT_FIELD,
                  part: tuple[int, int] | None = None, bos: str | None = None, eos: str | None = None) -> dict:
    """Tokenise `sources` into ``out_dir/split/`` and return the final manifest.

    `part` = (K, N): only the K-th of N parts of `sources` (data/parts.py); its shards and its own journal
    are written, not the manifest, which a run without `part` writes from the parts' journals (re-tokenising
    only what no part finished). The manifest returned then lists only this part's sources.
    """
    from tqdm import tqdm

    if part is not None and overwrite:
        raise ValueError("overwrite with part: parts share the folder; clear it before starting the parts")
    if shard_tokens < 1 or workers < 1:  # the CLI refuses these up front; 0 would write empty shards forever
        raise ValueError(f"shard_tokens and workers must be >= 1, got {shard_tokens} and {workers}")

    tok = load_tokenizer(tokenizer_path, bos, eos)  # a bad tokenizer is refused before anything is written
    split_dir = Path(out_dir) / split
    make_folder(split_dir)
    if part is None:  # leftovers of an interrupted run, never referenced (a part leaves them: another part
        for p in split_dir.glob(".*.tmp"):  # running in the same folder may be writing one; the final run cleans)
            remove_file(p)
    dtype = dtype_for_vocab(tok.vocab_size)
    options = {"skip_sets": sorted(set(skip_sets)), "shard_tokens": int(shard_tokens), "dtype": dtype.name}
    options |= tok.options() | ({"text_field": text_field} if text_field != DEFAULT_TEXT_FIELD else {})
    prev = read_manifest(split_dir) if not overwrite else None
    if overwrite:
        _clear_split(split_dir)
    elif prev is not None and (prev["tokenizer"]["sha256"] != tok.sha256 or prev["options"] != options):
        raise DataError(split_dir / MANIFEST_NAME,
                        "this folder was prepared with another tokenizer or other options "
                        f"(tokenizer sha256 {prev['tokenizer']['sha256'][:12]}..., options {prev['options']}); "
                        "pass --overwrite to redo it, or choose another --out")
    made_with = {"tokenizer_sha256": tok.sha256, "options": options}  # what a reused source must match
    done = {s["path"]: {**s, "made_with": made_with} for s in prev["sources"]} if prev else {}  # checked above
    journal = JOURNAL_NAME if part is None else journal_names(split_dir, part)[0]
    if part is None:  # the merging run: the parts' journals too (read only: their writers repair them)
        for name in journal_names(split_dir):
            if name != JOURNAL_NAME:
                done.update(_read_journal(split_dir, name, repair=False))
    done.update(_read_journal(split_dir, journal))
    if part is not None:
        sources = part_sources(sources, part)

    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": False, "split": split,
                "tokenizer": tok.describe(), "dtype": dtype.name, "options": options,
                "num_tokens": 0, "num_documents": 0, "skipped": {}, "shards": [], "sources": []}
    if prev is None or prev.get("complete"):
        # claims the folder for this tokenizer/options (checked by the next run), lists nothing yet
        atomic_write_json(split_dir / MANIFEST_NAME, manifest)
    sizes = [p.stat().st_size for p in sources]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"prepare {split}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    sets = frozenset(skip_sets)
    try:
        for src, size in zip(sources, sizes):
            st = src.stat()
            entry = done.get(str(src))
            if _source_done(split_dir, entry, st, made_with):
                entry = {k: v for k, v in entry.items() if k != "made_with"} | {"reused": True}
                bar.update(size)
            else:
                entry = _prepare_source(split_dir, src, st, tok, workers, sets, dtype, shard_tokens, bar, text_field)
                _append_journal(split_dir, {**entry, "made_with": made_with}, journal)  # progress point for a resume
            manifest["sources"].append(entry)
            manifest["shards"].extend({**s, "source": str(src)} for s in entry["shards"])
            manifest["num_tokens"] += entry["num_tokens"]
            manifest["num_documents"] += entry["documents"]
            for k, v in entry["skipped"].items():
                manifest["skipped"][k] = manifest["skipped"].get(k, 0) + v
            bar.set_postfix(tokens=manifest["num_tokens"])
    finally:
        bar.close()
    if part is not None:  # other parts' shards lie beside this part's: the merging run cleans up and lists all
        return manifest
    keep = {s["file"] for s in manifest["shards"]}
    for p in split_dir.glob("*.bin"):
        if p.name not in keep:
            remove_file(p)
    manifest["complete"] = True
    written = {**manifest, "sources": [{k: v for k, v in e.items() if k != "reused"} for e in manifest["sources"]]}
    atomic_write_json(split_dir / MANIFEST_NAME, written)  # the same bytes whether sources were reused or not
    return manifest


def _prepare_source(split_dir: Path, src: Path, st: os.stat_result, tok: Tokenizer, threads: int,
                    sets: frozenset[str], dtype: np.dtype, shard_tokens: int, bar,
                    text_field: str = DEFAULT_TEXT_FIELD) -> dict:
    stem = _shard_stem(src)
    for p in split_dir.glob(f"{stem}-*.bin"):  # stale shards of an earlier, unfinished attempt
        remove_file(p)
    entry = {"path": str(src), "format": source_format(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "documents": 0, "skipped": {}, "num_tokens": 0, "shards": []}
    cutter = _ShardCutter(split_dir, stem, dtype, shard_tokens)
    last_pos = 0
    reader = text_batches(src, sets, BATCH_BYTES * threads, text_field)
    with contextlib.closing(_read_ahead(reader, READ_AHEAD)) as batches:
        for texts, skipped, pos in batches:  # on an error here, closing stops the reading thread at once
            tokens = tok.encode_stream(texts, threads)
            entry["documents"] += len(texts)
            entry["num_tokens"] += int(tokens.size)
            for k, v in skipped.items():
                entry["skipped"][k] = entry["skipped"].get(k, 0) + v
            cutter.add(tokens)
            bar.update(pos - last_pos)
            last_pos = pos
    entry["shards"] = cutter.finish()
    bar.update(st.st_size - last_pos)
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m data.prepare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenise C4 (*.json.gz), SlimPajama (*.jsonl.zst) and parquet (*.parquet: FineWeb, Hugging\n"
                    "Face exports) files with a SentencePiece model or a tokenizer.json into packed token shards.\n"
                    "Each document is encoded as BOS + tokens + EOS and documents are concatenated; nothing\n"
                    "is dropped or padded. Writes OUT/train/ and OUT/val/, each with shards and a manifest.json\n"
                    "(token counts, tokenizer sha256, sources). Interrupted runs resume on re-run.",
        epilog="Demo (no --train/--val): prepares the embedded sample corpus with data/sample/tokenizer.model:\n"
               "    python -m data.prepare --out out/data/sample\n"
               "then data.loader.build_loader('out/data/sample', 'train', seq_len, batch_size).\n"
               "Full data:\n"
               "    python -m data.prepare --out out/c4 --tokenizer tokenizer.model \\\n"
               "        --train 'c4/c4-train.*.json.gz' --val c4/c4-validation.00000-of-00001.json.gz --workers 8\n"
               "    python -m data.prepare --out out/fineweb --tokenizer llama3/tokenizer.json \\\n"
               "        --train 'fineweb/sample/10BT/*.parquet' --val fineweb/val.parquet\n"
               "Across nodes: each of N jobs runs the command with --part K/N (K = 1..N), then one run of the\n"
               "same command without --part writes the manifests (launch/slurm_prepare.sbatch).\n"
               "Bad input is reported as one line 'error: FILE, line N: what', an option value that cannot\n"
               "work as 'error: argument --NAME: what'; both with exit status 2, before anything is written.\n"
               "A write that fails (disk full, a folder not writable) is one line 'error: PATH: what' with\n"
               "exit status 3; the temporary file is removed and a re-run resumes.")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/ subfolders)")
    p.add_argument("--train", nargs="+", metavar="SRC", help="train sources: files, folders or globs")
    p.add_argument("--val", nargs="+", metavar="SRC", help="validation sources: files, folders or globs")
    p.add_argument("--tokenizer", default=str(SAMPLE_TOKENIZER),
                   help="SentencePiece model, or a Hugging Face tokenizer.json (any *.json) (default: %(default)s)")
    p.add_argument("--bos", metavar="TOKEN", help="tokenizer.json: the BOS token (default: bos_token of "
                   "tokenizer_config.json beside it, else the post-processor template's)")
    p.add_argument("--eos", metavar="TOKEN", help="tokenizer.json: the EOS token (default: as for --bos)")
    p.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                   help="the JSON field / parquet column holding the document (default: %(default)s)")
    p.add_argument("--part", type=part_arg, metavar="K/N",
                   help="prepare only the K-th of N parts of the sources (by source file, in sorted order), for "
                        "N jobs on N nodes; a final run without --part writes the manifests")
    p.add_argument("--workers", type=int_in(1, MAX_THREADS), default=min(os.cpu_count() or 1, 8),
                   help="tokenising threads (default: %(default)s); reading runs in one more thread")
    p.add_argument("--skip-set", action="append", default=[], metavar="NAME",
                   help="SlimPajama: skip documents whose meta.redpajama_set_name is NAME (repeatable)")
    p.add_argument("--shard-tokens", type=int_in(1), default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard; each source's last shard holds the rest (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard what is in OUT/<split> and redo it (not with --part)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.part and a.overwrite:
        parser.error("argument --overwrite: not with --part (the parts share OUT; delete it before starting them)")
    if not a.text_field:
        parser.error("argument --text-field: must name a field, got ''")
    if not a.train and not a.val:
        a.train, a.val = [str(SAMPLE_TRAIN)], [str(SAMPLE_VAL)]
    try:
        sources = {split: expand_sources(pats) for split, pats in (("train", a.train), ("val", a.val)) if pats}
        check_splits(sources)  # empty files, one file in both splits: refused before anything is written
        for split, found in sources.items():
            t0 = time.perf_counter()
            m = prepare_split(split, found, a.tokenizer, a.out, a.workers, a.skip_set,
                              a.shard_tokens, a.overwrite, not a.no_progress, a.text_field, a.part, a.bos, a.eos)
            dt = time.perf_counter() - t0
            reused = sum(1 for s in m["sources"] if s.get("reused"))
            skipped = ", ".join(f"{k}={v}" for k, v in sorted(m["skipped"].items())) or "none"
            label = f"{split} part {a.part[0]}/{a.part[1]}" if a.part else split
            print(f"{label}: {m['num_tokens']:,} tokens ({m['dtype']}), {m['num_documents']:,} documents, "
                  f"{len(m['shards'])} shards from {len(m['sources'])} sources ({reused} reused); "
                  f"skipped: {skipped}; {dt:.1f}s -> {Path(a.out) / split}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
