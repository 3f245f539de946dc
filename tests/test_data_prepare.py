"""prepare: tokens equal an independent tokenisation, formats and worker counts agree, counted skips,
atomic writes under a hard kill, resume, and the demo default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from amp_common.checksum import file_sha256
from data.errors import DataError
from data.prepare import main, prepare_split
from data.readers import expand_sources
from data.shards import dtype_for_vocab, open_shard, read_header, write_shard
from helpers.corpus import (
    MISTRAL,
    REPO,
    SAMPLE_TOKENIZER,
    SHARED,
    c4_lines,
    make_texts,
    reference_stream,
    shard_bytes,
    slimpajama_lines,
    split_tokens,
    write_gz,
    write_zst,
)


@pytest.fixture()
def corpus(tmp_path):
    t1, t2, t3 = make_texts(25, seed=11), make_texts(20, seed=12), make_texts(15, seed=13)
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    write_gz(d / "c4-train.00000-of-00002.json.gz", c4_lines(t1))
    write_gz(d / "c4-train.00001-of-00002.json.gz", c4_lines(t2))
    write_zst(d / "sub" / "example_train_0.jsonl.zst", slimpajama_lines(t3))
    # sorted by full path: the two C4 files, then sub/...
    return d, t1 + t2 + t3


def test_tokens_equal_independent_tokenisation_for_any_worker_count(tmp_path, corpus):
    src, texts = corpus
    ref = reference_stream(SAMPLE_TOKENIZER, texts)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        m = prepare_split("train", expand_sources([str(src)]), SAMPLE_TOKENIZER, out, workers=workers,
                          shard_tokens=1000, progress=False)
        assert np.array_equal(split_tokens(out / "train"), ref)
        assert m["num_tokens"] == len(ref) == sum(s["num_tokens"] for s in m["shards"])
        assert m["num_documents"] == len(texts) and m["dtype"] == "uint16"
        assert m["tokenizer"]["sha256"] == file_sha256(SAMPLE_TOKENIZER)
        assert [s["format"] for s in m["sources"]] == ["c4", "c4", "slimpajama"]
        assert all(s["num_tokens"] == 1000 for s in m["sources"][0]["shards"][:-1])  # exact cuts, tail kept
        outs.append(shard_bytes(out / "train"))
    assert outs[0] == outs[1]


def test_read_ahead_keeps_order_raises_errors_in_place_and_stops_its_thread():
    """prepare's reading thread: items in order, an error raised after the items before it, and closing the
    consumer (an error or Ctrl-C while tokenising) stops a producer that is blocked on a full queue."""
    import threading

    from data.prepare import _read_ahead

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise DataError("src.json.gz, line 8", "not a JSON object")
            yield i

    assert list(_read_ahead(items(100), 3)) == list(range(100))
    got = []
    with pytest.raises(DataError, match="line 8: not a JSON object"):
        for x in _read_ahead(items(100, fail_at=7), 3):
            got.append(x)
    assert got == list(range(7))
    endless = _read_ahead(items(10**12), 2)
    assert next(endless) == 0
    endless.close()
    assert not [t for t in threading.enumerate() if t.name == "prepare-reader"]


def test_globs_folders_and_files_expand_to_the_same_sorted_list(corpus):
    src, _ = corpus
    by_dir = expand_sources([str(src)])
    by_glob = expand_sources([str(src / "*.json.gz"), str(src / "sub" / "*.zst")])
    by_files = expand_sources([str(p) for p in reversed(by_dir)])
    assert by_dir == by_glob == by_files and len(by_dir) == 3
    with pytest.raises(DataError, match="matches no source file"):
        expand_sources([str(src / "nothing-*.json.gz")])


def test_empty_documents_and_skipped_sets_are_counted(tmp_path, capsys):
    texts = ["first document", "", "   \n ", "code", "last"]
    sets = ["RedPajamaBook", "RedPajamaBook", "RedPajamaC4", "RedPajamaGithub", "RedPajamaC4"]
    lines = slimpajama_lines(texts, sets)
    lines.insert(2, b"")  # a blank line is not a document
    f = write_zst(tmp_path / "x.jsonl.zst", lines)
    rc = main(["--out", str(tmp_path / "out"), "--train", str(f), "--skip-set", "RedPajamaGithub",
               "--workers", "1", "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert m["skipped"] == {"empty": 2, "set:RedPajamaGithub": 1} and m["num_documents"] == 2
    assert np.array_equal(split_tokens(tmp_path / "out" / "train"),
                          reference_stream(SAMPLE_TOKENIZER, ["first document", "last"]))
    assert "skipped: empty=2, set:RedPajamaGithub=1" in capsys.readouterr().out


def test_int32_shards_when_vocab_exceeds_uint16(tmp_path):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.int32
    toks = np.array([0, 1, 65535, 65536, 150000, 2], dtype=np.int64)
    write_shard(tmp_path / "s.bin", toks, dtype_for_vocab(152064))
    assert read_header(tmp_path / "s.bin") == (np.dtype("<i4"), 6)
    assert np.array_equal(open_shard(tmp_path / "s.bin"), toks)
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "t.bin", toks, np.uint16)


def test_rerun_resumes_and_redoes_changed_sources(tmp_path, corpus):
    src, texts = corpus
    out = tmp_path / "out"
    sources = expand_sources([str(src)])
    prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=1, shard_tokens=1000, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.bin")}
    m = prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=1, shard_tokens=1000, progress=False)
    assert all(s.get("reused") for s in m["sources"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.bin")} == before

    new = make_texts(5, seed=99)  # change the second source: only it is redone
    write_gz(sources[1], c4_lines(new))
    m = prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=1, shard_tokens=1000, progress=False)
    assert [bool(s.get("reused")) for s in m["sources"]] == [True, False, True]
    assert np.array_equal(split_tokens(out / "train"),
                          reference_stream(SAMPLE_TOKENIZER, texts[:25] + new + texts[45:]))
    assert {p.name for p in (out / "train").glob("*.bin")} == {s["file"] for s in m["shards"]}  # stale gone

    shard = out / "train" / m["sources"][2]["shards"][0]["file"]  # a damaged shard is detected and redone
    shard.write_bytes(shard.read_bytes()[:-2])
    m = prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=1, shard_tokens=1000, progress=False)
    assert [bool(s.get("reused")) for s in m["sources"]] == [True, True, False]
    assert read_header(shard)[1] == m["sources"][2]["shards"][0]["num_tokens"]


def test_torn_journal_line_is_ignored_and_repaired(tmp_path, corpus):
    src, texts = corpus
    out = tmp_path / "out"
    sources = expand_sources([str(src)])
    prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=1, progress=False)
    journal = out / "train" / "progress.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    journal.write_bytes(lines[0] + lines[1][:-10])  # killed in the middle of appending line 2 ...
    mpath = out / "train" / "manifest.json"  # ... so the manifest is still the one written at the start
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "complete": False, "sources": [], "shards": []}))
    m = prepare_split("train", sources, SAMPLE_TOKENIZER, out, workers=1, progress=False)
    assert [bool(s.get("reused")) for s in m["sources"]] == [True, False, False]
    assert journal.read_bytes().endswith(b"\n") and len(journal.read_bytes().splitlines()) == 3
    assert np.array_equal(split_tokens(out / "train"), reference_stream(SAMPLE_TOKENIZER, texts))


def test_source_made_with_another_tokenizer_is_not_reused_when_the_manifest_is_gone(tmp_path, capsys):
    """The reported case: val prepared with a 5,000-piece tokenizer, its manifest deleted, then prepared with
    the 4,096-piece sample tokenizer. The journal entry used to be trusted ('(1 reused)'): a manifest naming
    the sample tokenizer over shards holding ids up to 4,999, and an IndexError in training's embedding."""
    from data.readers import iter_texts
    from data.tokenizer import SAMPLE_VAL, train_tokenizer

    other = train_tokenizer([SAMPLE_VAL], tmp_path / "other.model", vocab_size=5000)
    out = tmp_path / "out"
    args = ["--out", str(out), "--val", str(SAMPLE_VAL), "--workers", "1", "--no-progress"]
    assert main(args + ["--tokenizer", str(other.path)]) == 0
    assert split_tokens(out / "val").max() >= 4096
    (out / "val" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "(0 reused)" in capsys.readouterr().out
    m = json.loads((out / "val" / "manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == file_sha256(SAMPLE_TOKENIZER)
    assert np.array_equal(split_tokens(out / "val"), reference_stream(SAMPLE_TOKENIZER, list(iter_texts(SAMPLE_VAL))))


@pytest.mark.parametrize("first,second", [(["--shard-tokens", "1000"], ["--shard-tokens", "700"]),
                                          ([], ["--skip-set", "RedPajamaCommonCrawl"])])
def test_source_made_with_other_options_is_not_reused_when_the_manifest_is_gone(tmp_path, corpus, first, second):
    """Any option that changes the bytes (shard size, skipped sets) makes every source be redone."""
    src, _ = corpus
    out = tmp_path / "out"
    args = ["--out", str(out), "--train", str(src), "--workers", "1", "--no-progress"]
    assert main(args + first) == 0
    (out / "train" / "manifest.json").unlink()
    assert main(args + second) == 0
    clean = tmp_path / "clean"
    assert main(["--out", str(clean), *args[2:], *second]) == 0
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert [bool(s.get("reused")) for s in m["sources"]] == [False, False, False]
    assert shard_bytes(out / "train") == shard_bytes(clean / "train")
    assert m["options"] == json.loads((clean / "train" / "manifest.json").read_text())["options"]


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import data.shards as shards
    calls = {"n": 0}
    real_replace = os.replace
    def dying_replace(a, b):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[2]):
            os._exit(9)  # hard kill between writing the data and renaming it: no cleanup runs
        real_replace(a, b)
    shards.os.replace = dying_replace
    from data.prepare import main
    main(["--out", sys.argv[1], "--train", *sys.argv[3:], "--workers", "1", "--no-progress",
          "--shard-tokens", "700"])
""")


@pytest.mark.parametrize("die_at", [2, 4, 7])
def test_hard_kill_leaves_no_complete_looking_shard_and_rerun_recovers(tmp_path, corpus, die_at):
    from data.loader import build_loader

    src, texts = corpus
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), str(die_at), str(src)],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    split = out / "train"
    assert list(split.glob(".*.tmp")), "the kill should have left a temporary file behind"
    for shard in split.glob("*.bin"):  # whatever carries a shard name is complete and valid
        read_header(shard)
    m = json.loads((split / "manifest.json").read_text()) if (split / "manifest.json").exists() else None
    assert m is None or not m["complete"]
    with pytest.raises(DataError, match="no manifest|did not finish"):
        build_loader(out, "train", 8, 2)
    journal = split / "progress.jsonl"
    finished = journal.read_text().splitlines() if journal.exists() else []

    args = ["--train", str(src), "--workers", "1", "--no-progress", "--shard-tokens", "700"]
    assert main(["--out", str(out), *args]) == 0
    m = json.loads((split / "manifest.json").read_text())
    assert sum(bool(s.get("reused")) for s in m["sources"]) == len(finished)  # finished sources not redone
    assert not list(split.glob(".*.tmp"))
    assert np.array_equal(split_tokens(split), reference_stream(SAMPLE_TOKENIZER, texts))
    clean = tmp_path / "clean"
    assert main(["--out", str(clean), *args]) == 0
    assert shard_bytes(split) == shard_bytes(clean / "train")


def test_demo_default_survives_ctrl_c_and_rerun_prepares_the_sample(tmp_path):
    """The demo command (no --train/--val) is interrupted by SIGINT to its process group (what Ctrl-C
    does) while 2 worker processes run: one message, exit 130, no traceback. Re-running it finishes,
    and both splits equal an independent tokenisation of the sample files."""
    import signal
    import time

    from data.readers import iter_texts
    from data.tokenizer import SAMPLE_TRAIN, SAMPLE_VAL

    out = tmp_path / "out"
    args = [sys.executable, "-m", "data.prepare", "--out", str(out), "--workers", "2", "--shard-tokens", "50000",
            "--no-progress"]
    p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         process_group=0, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not list((out / "train").glob("*.bin")) and time.time() - t0 < 60 and p.poll() is None:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip() == "interrupted; re-run the same command to resume"
    assert not json.loads((out / "train" / "manifest.json").read_text())["complete"]

    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train:" in done.stdout and "val:" in done.stdout
    for split, f in (("train", SAMPLE_TRAIN), ("val", SAMPLE_VAL)):
        assert np.array_equal(split_tokens(out / split), reference_stream(SAMPLE_TOKENIZER, list(iter_texts(f))))


def test_help_documents_demo_and_document_convention():
    p = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0
    assert "BOS + tokens + EOS" in p.stdout and "python -m data.prepare --out out/data/sample" in p.stdout


@pytest.mark.skipif(not (SHARED / "corpus" / "slimpajama").exists() or not MISTRAL.exists(),
                    reason="../shared corpus/tokenizer not present")
def test_shared_slimpajama_and_c4_of_the_same_text_give_the_same_tokens(tmp_path):
    """Real files: the SlimPajama copy holds the same documents as C4 train (in another order). Take
    the first 40 SlimPajama records, their raw C4 records, and compare the prepared token streams."""
    import gzip
    import io

    import zstandard

    sp_file = SHARED / "corpus" / "slimpajama" / "example_train_0.jsonl.zst"
    with open(sp_file, "rb") as f:
        sp_lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f)).read().split(b"\n")[:40]
    wanted = {json.loads(line)["text"]: i for i, line in enumerate(sp_lines)}
    c4_raw = [None] * len(sp_lines)
    for g in sorted((SHARED / "corpus" / "c4").glob("c4-train.*.json.gz")):
        for line in gzip.open(g).read().split(b"\n"):
            if line.strip() and (i := wanted.get(json.loads(line)["text"])) is not None:
                c4_raw[i] = line
    assert all(c4_raw), "SlimPajama documents missing from C4"
    write_zst(tmp_path / "s.jsonl.zst", sp_lines)
    write_gz(tmp_path / "c.json.gz", c4_raw)
    a = prepare_split("train", [tmp_path / "s.jsonl.zst"], MISTRAL, tmp_path / "a", workers=1, progress=False)
    b = prepare_split("train", [tmp_path / "c.json.gz"], MISTRAL, tmp_path / "b", workers=1, progress=False)
    ta, tb = split_tokens(tmp_path / "a" / "train"), split_tokens(tmp_path / "b" / "train")
    assert a["num_documents"] == b["num_documents"] == 40 and np.array_equal(ta, tb)
    assert np.array_equal(ta, reference_stream(MISTRAL, list(wanted)))
