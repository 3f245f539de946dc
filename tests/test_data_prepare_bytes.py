"""prepare's output, byte for byte: every shard and the manifest equal what a deliberately simple reference
writer in this file produces, for several worker counts.

The reference follows the output rules as they stood before prepare was made faster (it was checked to
pass against that code, commit 2a046c6): each document is BOS + tokens + EOS (tokens from SentencePiece,
one document at a time); documents are concatenated in source order; each source is cut into shards of
exactly --shard-tokens tokens plus a shorter tail, named ``<stem>-<sha1(path)[:8]>-NNNN.bin``; a shard is
the 32-byte header of data/shards.py and the little-endian tokens; the manifest is ``json.dumps(indent=1)``
of the fields below, in this order. The manifest holds no timestamp besides each source's ``mtime_ns``,
which the reference reads with os.stat, so the whole manifest file is compared. ``progress.jsonl`` (the
resume journal) is not part of the output and is not compared.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from data.prepare import main, prepare_split
from helpers.corpus import SAMPLE_TOKENIZER, c4_lines, make_texts, slimpajama_lines, write_gz, write_zst

SAMPLE = SAMPLE_TOKENIZER.parent


def read_records(src: Path) -> list[dict]:
    raw = src.read_bytes()
    if src.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    else:
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return [json.loads(line) for line in raw.split(b"\n") if line.strip()]


@functools.lru_cache(maxsize=None)
def reference_tokens(src: Path, tokenizer: Path, skip_sets: tuple[str, ...]) -> tuple[list[int], int, dict]:
    """(BOS + tokens + EOS of every kept document, kept documents, skip counts) of one source."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tokens, docs, skipped = [], 0, {}
    for rec in read_records(src):
        set_name = (rec.get("meta") or {}).get("redpajama_set_name")
        if set_name in skip_sets:
            reason = f"set:{set_name}"
        elif not rec["text"].strip():
            reason = "empty"
        else:
            tokens += [sp.bos_id(), *sp.encode(rec["text"]), sp.eos_id()]
            docs += 1
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return tokens, docs, skipped


def reference_split(split: str, sources: list[Path], tokenizer: Path, shard_tokens: int,
                    skip_sets: tuple[str, ...] = ()) -> dict[str, bytes]:
    """{file name: bytes} of every shard and of manifest.json that prepare must write for this split."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    vocab = sp.vocab_size()
    code, dtype, dtype_name = (1, "<u2", "uint16") if vocab <= 65536 else (2, "<i4", "int32")
    files: dict[str, bytes] = {}
    manifest_sources, manifest_shards, skipped_total, docs_total = [], [], {}, 0
    for src in sources:
        tokens, docs, skipped = reference_tokens(src, tokenizer, skip_sets)
        stem = re.sub(r"\.jsonl?\.(gz|zst)$", "", src.name) + "-" + hashlib.sha1(str(src).encode()).hexdigest()[:8]
        shards = []
        for i, start in enumerate(range(0, len(tokens), shard_tokens)):
            piece = tokens[start:start + shard_tokens]
            data = struct.pack("<8sIIQQ", b"AMPTOKS\0", 1, code, len(piece), 0) + np.array(piece, dtype).tobytes()
            name = f"{stem}-{i:04d}.bin"
            files[name] = data
            shards.append({"file": name, "num_tokens": len(piece), "bytes": len(data)})
        st = os.stat(src)
        manifest_sources.append({"path": str(src), "format": "c4" if src.name.endswith(".gz") else "slimpajama",
                                 "size": st.st_size, "mtime_ns": st.st_mtime_ns, "documents": docs,
                                 "skipped": skipped, "num_tokens": len(tokens), "shards": shards})
        manifest_shards += [{**s, "source": str(src)} for s in shards]
        docs_total += docs
        for k, v in skipped.items():
            skipped_total[k] = skipped_total.get(k, 0) + v
    manifest = {
        "format": "amp-token-shards", "version": 1, "complete": True, "split": split,
        "tokenizer": {"path": str(tokenizer), "sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
                      "vocab_size": vocab, "bos_id": sp.bos_id(), "eos_id": sp.eos_id()},
        "dtype": dtype_name,
        "options": {"skip_sets": sorted(set(skip_sets)), "shard_tokens": shard_tokens, "dtype": dtype_name},
        "num_tokens": sum(s["num_tokens"] for s in manifest_sources), "num_documents": docs_total,
        "skipped": skipped_total, "shards": manifest_shards, "sources": manifest_sources,
    }
    files["manifest.json"] = json.dumps(manifest, indent=1).encode() + b"\n"
    return files


def assert_same_files(split_dir: Path, expected: dict[str, bytes]) -> None:
    got = {p.name for p in split_dir.iterdir() if p.name != "progress.jsonl"}
    assert got == set(expected)
    for name, data in expected.items():
        assert (split_dir / name).read_bytes() == data, name


@pytest.fixture(scope="module")
def sample_reference():
    """The demo command's output (no --train/--val), at the default shard size and at 300,000 tokens."""
    train = (SAMPLE / "c4-train.00000-of-00001.json.gz").resolve()
    val = (SAMPLE / "c4-validation.00000-of-00001.json.gz").resolve()
    return {n: {"train": reference_split("train", [train], SAMPLE_TOKENIZER, n),
                "val": reference_split("val", [val], SAMPLE_TOKENIZER, n)} for n in (1 << 26, 300_000)}


@pytest.mark.parametrize("workers,shard_tokens", [(1, 300_000), (2, None)])
def test_demo_output_equals_reference(tmp_path, sample_reference, workers, shard_tokens):
    out = tmp_path / "out"
    args = ["--out", str(out), "--workers", str(workers), "--no-progress"]
    assert main(args + (["--shard-tokens", str(shard_tokens)] if shard_tokens else [])) == 0
    expected = sample_reference[shard_tokens or 1 << 26]
    assert len(expected["train"]) == (9 if shard_tokens else 2)  # 8 shards or 1, + manifest
    for split in ("train", "val"):
        assert_same_files(out / split, expected[split])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_multi_source_output_equals_reference(tmp_path, workers):
    """Two C4 files and a SlimPajama file with empty documents and a skipped set, small shards."""
    src = tmp_path / "src"
    src.mkdir()
    sources = [write_gz(src / "a.json.gz", c4_lines(make_texts(40, seed=21) + ["  "] + make_texts(9, seed=22))),
               write_gz(src / "b.jsonl.gz", c4_lines([])),
               write_zst(src / "c.jsonl.zst", slimpajama_lines(make_texts(30, seed=23) + [""],
                                                              ["RedPajamaC4", "RedPajamaGithub"] * 15 + ["X"]))]
    out = tmp_path / "out"
    prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=workers, skip_sets=["RedPajamaGithub"],
                  shard_tokens=777, progress=False)
    expected = reference_split("train", sources, SAMPLE_TOKENIZER, 777, ("RedPajamaGithub",))
    assert len(expected) > 10
    assert_same_files(out / "train", expected)
