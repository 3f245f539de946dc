"""Every kind of bad input gives one clear DataError (file, line or offset, what) -- printed by the CLI
as a single ``error:`` line with exit status 2 -- and never a traceback or silent garbage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data.errors import DataError
from data.loader import build_loader
from data.prepare import main, prepare_split
from data.shards import HEADER_SIZE
from data.tokenizer import train_tokenizer
from helpers.corpus import (
    REPO,
    SAMPLE_TOKENIZER,
    c4_lines,
    make_texts,
    shard_bytes,
    slimpajama_lines,
    write_gz,
    write_zst,
)

GOOD = c4_lines(make_texts(30, seed=5, min_words=100, max_words=300))


@pytest.fixture()
def corpus_dir(tmp_path):
    """Three small sources (two C4, one SlimPajama) in one folder."""
    d = tmp_path / "src"
    d.mkdir()
    write_gz(d / "a.json.gz", c4_lines(make_texts(25, seed=11)))
    write_gz(d / "b.json.gz", c4_lines(make_texts(20, seed=12)))
    write_zst(d / "c.jsonl.zst", slimpajama_lines(make_texts(15, seed=13)))
    return d


def run_cli(capsys, *args):
    rc = main(["--no-progress", "--workers", "1", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return rc, err


def expect_error(capsys, src, tmp_path, *patterns, workers=1):
    rc, err = run_cli(capsys, "--out", tmp_path / "out", "--train", src, "--workers", workers)
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(src) in err
    for pat in patterns:
        assert pat in err, (pat, err)
    m = tmp_path / "out" / "train" / "manifest.json"
    assert not m.exists() or not json.loads(m.read_text())["complete"]
    return err


# --- source files -------------------------------------------------------------------------------

def test_truncated_gzip(tmp_path, capsys):
    f = write_gz(tmp_path / "t.json.gz", GOOD)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    expect_error(capsys, f, tmp_path, "truncated gzip stream", "after line")


def test_corrupt_gzip(tmp_path, capsys):
    f = write_gz(tmp_path / "c.json.gz", GOOD)
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # zeroed block inside the deflate stream
    f.write_bytes(bytes(data))
    expect_error(capsys, f, tmp_path, "corrupt gzip data near compressed byte")


def test_not_gzip_at_all(tmp_path, capsys):
    f = tmp_path / "plain.json.gz"
    f.write_bytes(b"\n".join(GOOD))
    expect_error(capsys, f, tmp_path, "corrupt gzip data", "Not a gzipped file")


def test_truncated_zstd(tmp_path, capsys):
    f = write_zst(tmp_path / "t.jsonl.zst", slimpajama_lines(make_texts(30, seed=5)))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    expect_error(capsys, f, tmp_path, "truncated zstd stream", "inside a frame")


def test_corrupt_zstd(tmp_path, capsys):
    f = write_zst(tmp_path / "c.jsonl.zst", slimpajama_lines(make_texts(30, seed=5)))
    data = bytearray(f.read_bytes())
    data[0:4] = b"\x00\x01\x02\x03"  # bad frame magic
    f.write_bytes(bytes(data))
    expect_error(capsys, f, tmp_path, "corrupt zstd data near compressed byte")


@pytest.mark.parametrize("workers", [1, 2])
def test_line_that_is_not_json(tmp_path, capsys, workers):
    lines = list(GOOD)
    lines[6] = b'{"text": "unterminated'
    f = write_gz(tmp_path / "j.json.gz", lines)
    expect_error(capsys, f, tmp_path, "line 7:", "not a JSON object", workers=workers)


def test_json_that_is_not_an_object(tmp_path, capsys):
    f = write_gz(tmp_path / "a.json.gz", GOOD[:2] + [b'["text", "x"]'])
    expect_error(capsys, f, tmp_path, "line 3:", "expected a JSON object, got list")


def test_missing_text_field(tmp_path, capsys):
    f = write_zst(tmp_path / "m.jsonl.zst", slimpajama_lines(["a", "b"]) + [b'{"meta": {"redpajama_set_name": "X"}}'])
    expect_error(capsys, f, tmp_path, "line 3:", "missing 'text' field", "meta")


def test_text_not_a_string(tmp_path, capsys):
    f = write_gz(tmp_path / "n.json.gz", [b'{"text": 42, "url": "u"}'])
    expect_error(capsys, f, tmp_path, "line 1:", "'text' must be a string, got int")


def test_non_utf8_bytes(tmp_path, capsys):
    f = write_gz(tmp_path / "u.json.gz", GOOD[:4] + [b'{"text": "caf\xe9 latin-1"}'])
    expect_error(capsys, f, tmp_path, "line 5:", "not valid UTF-8", "byte offset 13 of the line")


def test_lone_surrogate(tmp_path, capsys):
    f = write_gz(tmp_path / "s.json.gz", [b'{"text": "ok"}', b'{"text": "bad \\udc80 here"}'])
    expect_error(capsys, f, tmp_path, "line 2:", "lone surrogate at character 4")


def test_unknown_suffix_and_missing_tokenizer(tmp_path, capsys):
    f = tmp_path / "x.txt"
    f.write_text("hello")
    expect_error(capsys, f, tmp_path, "unknown source format")
    good = write_gz(tmp_path / "g.json.gz", GOOD[:2])
    rc, err = run_cli(capsys, "--out", tmp_path / "o", "--train", good, "--tokenizer", tmp_path / "none.model")
    assert rc == 2 and "none.model: tokenizer model file not found" in err


def test_cli_process_exits_2_without_traceback(tmp_path):
    f = write_gz(tmp_path / "j.json.gz", GOOD[:3] + [b"not json"])
    p = subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(tmp_path / "o"), "--train", str(f),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: {f}, line 4: not a JSON object (Expecting value at column 1): 'not json'"]


# --- shards, manifests, tokenizers ---------------------------------------------------------------

@pytest.fixture()
def prepared(tmp_path, capsys):
    src = write_gz(tmp_path / "src.json.gz", GOOD)
    out = tmp_path / "out"
    assert run_cli(capsys, "--out", out, "--train", src)[0] == 0
    m = json.loads((out / "train" / "manifest.json").read_text())
    return src, out, out / "train" / m["shards"][0]["file"]


def test_shard_with_wrong_magic(prepared):
    _, out, shard = prepared
    data = bytearray(shard.read_bytes())
    data[:8] = b"GARBAGE!"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad magic b'GARBAGE!' at offset 0") as e:
        build_loader(out, "train", 16, 2)
    assert str(shard) in str(e.value)


@pytest.mark.parametrize("delta", [-1, -2, +2])
def test_shard_with_wrong_size(prepared, delta):
    _, out, shard = prepared
    data = shard.read_bytes()
    shard.write_bytes(data[:delta] if delta < 0 else data + bytes(delta))
    with pytest.raises(DataError, match="does not match header.*truncated or padded"):
        build_loader(out, "train", 16, 2)


def test_shard_shorter_than_header(prepared):
    _, out, shard = prepared
    shard.write_bytes(shard.read_bytes()[: HEADER_SIZE - 1])
    with pytest.raises(DataError, match="shorter than the 32-byte header"):
        build_loader(out, "train", 16, 2)


def test_shard_count_differs_from_manifest(prepared):
    _, out, _ = prepared
    mpath = out / "train" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["num_tokens"] += 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match="but the manifest says"):
        build_loader(out, "train", 16, 2)
    mpath.write_text("{not json")
    with pytest.raises(DataError, match="manifest is not valid JSON"):
        build_loader(out, "train", 16, 2)


def test_tokenizer_that_does_not_match_the_manifest(prepared, tmp_path, capsys):
    src, out, _ = prepared
    other = train_tokenizer([src], tmp_path / "other.model", vocab_size=300)
    with pytest.raises(DataError, match="does not match the one the data was prepared with"):
        build_loader(out, "train", 16, 2, tokenizer=other.path)
    build_loader(out, "train", 16, 2, tokenizer=SAMPLE_TOKENIZER)  # the right one passes

    rc, err = run_cli(capsys, "--out", out, "--train", src, "--tokenizer", other.path)
    assert rc == 2 and "prepared with another tokenizer" in err and "--overwrite" in err
    rc, _ = run_cli(capsys, "--out", out, "--train", src, "--tokenizer", other.path, "--overwrite")
    assert rc == 0
    loader = build_loader(out, "train", 16, 2, tokenizer=other.path)
    assert loader.vocab_size == 300


def test_not_a_tokenizer_file(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00" * 100)
    good = write_gz(tmp_path / "g.json.gz", GOOD[:2])
    rc, err = run_cli(capsys, "--out", tmp_path / "o", "--train", good, "--tokenizer", bad)
    assert rc == 2 and f"error: {bad}: not a valid SentencePiece model" in err


# --- command-line options ------------------------------------------------------------------------

BAD_OPTIONS = [
    ("data.prepare", "--shard-tokens", "0", "must be >= 1, got 0"),  # used to write empty shards forever
    ("data.prepare", "--shard-tokens", "-5", "must be >= 1, got -5"),
    ("data.prepare", "--shard-tokens", "1e6", "expected an integer >= 1, got '1e6'"),
    ("data.prepare", "--workers", "0", "must be between 1 and 1024, got 0"),
    ("data.prepare", "--workers", "5000", "must be between 1 and 1024, got 5000"),
    ("data.tokenizer", "--vocab-size", "259", "must be between 260 and 2147483647, got 259"),
    ("data.tokenizer", "--seed", "-1", "must be between 0 and 4294967295, got -1"),
    ("data.tokenizer", "--input-sentence-size", "-1", "must be >= 0, got -1"),
    ("data.tokenizer", "--num-threads", "0", "must be between 1 and 1024, got 0"),
    ("benchmarks.data_throughput", "--workers", "0", "must be between 1 and 1024, got 0"),
    ("benchmarks.data_throughput", "--repeats", "0", "must be >= 1, got 0"),
    ("benchmarks.data_throughput", "--seq-len", "-1", "must be >= 1, got -1"),
    ("benchmarks.data_throughput", "--loader-workers", "0,-2", "must be >= 0, got -2"),
]


@pytest.mark.parametrize("module,option,value,what", BAD_OPTIONS)
def test_numeric_option_that_cannot_work_is_refused_up_front(tmp_path, module, option, value, what):
    out = tmp_path / "out"
    args = [option, value] if module.startswith("benchmarks") else ["--out", str(out), option, value]
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"error: argument {option}: {what} (see python -m {module} --help)\n"
    assert not out.exists()


def test_prepare_split_refuses_shard_tokens_below_one(tmp_path):
    src = write_gz(tmp_path / "g.json.gz", GOOD[:2])
    with pytest.raises(ValueError, match="shard_tokens and workers must be >= 1, got 0 and 1"):
        prepare_split("train", [src], SAMPLE_TOKENIZER, tmp_path / "out", shard_tokens=0, progress=False)


def test_vocab_size_that_does_not_suit_the_inputs_is_one_line(tmp_path, capsys):
    """How many pieces the inputs need or allow is only known once SentencePiece runs."""
    from data.tokenizer import SAMPLE_VAL
    from data.tokenizer import main as tokenizer_main

    tiny = write_gz(tmp_path / "tiny.json.gz", [b'{"text": "ab ab ab"}'])
    empty = write_gz(tmp_path / "empty.json.gz", [b'{"text": "  "}'])
    for inputs, vocab, what in (([SAMPLE_VAL], 300, "--vocab-size 300: too small: these inputs need at least 369"),
                                ([tiny], 400, "--vocab-size 400: too large: these inputs allow at most 265"),
                                ([empty], 400, f"{empty}: no training text (every document is empty)")):
        out = tmp_path / "new" / "t.model"
        rc = tokenizer_main(["--input", *map(str, inputs), "--out", str(out), "--vocab-size", str(vocab)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: {what}") and err.count("\n") == 1, err
        assert not (tmp_path / "new").exists()


# --- output folder and disk ------------------------------------------------------------------------

def test_out_that_is_a_file(tmp_path, capsys):
    src = write_gz(tmp_path / "g.json.gz", GOOD[:2])
    f = tmp_path / "file"
    f.write_text("not a folder")
    for out in (f, f / "below"):
        rc, err = run_cli(capsys, "--out", out, "--train", src)
        assert rc == 2 and err == f"error: {f}: is a file, not a folder", err
    assert f.read_text() == "not a folder"


def read_only_folder(path):
    """`path` made and locked (mode 555); skips the test where this user may write there anyway (root)."""
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").touch()
    except PermissionError:
        return path
    (path / "probe").unlink()
    pytest.skip("this user may write to a read-only folder (root)")


def test_out_in_an_unwritable_folder(tmp_path, capsys):
    src = write_gz(tmp_path / "g.json.gz", GOOD[:2])
    locked = read_only_folder(tmp_path / "locked")
    try:
        rc, err = run_cli(capsys, "--out", locked / "out", "--train", src)
        assert rc == 3 and err == f"error: {locked / 'out'}: cannot create folder (Permission denied)", err
        split = read_only_folder(tmp_path / "out2")
        split.chmod(0o755)
        split = read_only_folder(split / "train")
        rc, err = run_cli(capsys, "--out", split.parent, "--train", src)
        assert rc == 3 and err == f"error: {split / 'manifest.json'}: cannot write (Permission denied)", err
        assert not list(split.iterdir())
    finally:
        for d in tmp_path.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)
        locked.chmod(0o755)


def test_disk_full_is_one_line_and_leaves_nothing_a_rerun_would_trust(tmp_path, corpus_dir, monkeypatch, capsys):
    """ENOSPC at every kind of write (the first manifest, shards, journal lines, the final manifest): one
    line naming the file, exit 3 (the disk), no temporary file, no complete manifest; a re-run with space again
    writes exactly what a clean run writes."""
    import errno
    import stat

    real_fsync = os.fsync
    calls = []

    def fsync(fd, fail_at=None):
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # a folder's fsync is best effort (amp_common.atomic): not a write
            return real_fsync(fd)
        calls.append(fd)
        if fail_at is not None and len(calls) >= fail_at:  # the disk stays full from then on
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    args = ["--train", corpus_dir, "--shard-tokens", 700]
    monkeypatch.setattr(os, "fsync", fsync)
    assert run_cli(capsys, "--out", tmp_path / "clean", *args)[0] == 0
    total = len(calls)  # 1 manifest + shards + 3 journal lines + 1 manifest
    assert total > 8
    for fail_at in (1, 2, total // 2, total - 1, total):
        out = tmp_path / f"full-{fail_at}"
        calls.clear()
        monkeypatch.setattr(os, "fsync", lambda fd, n=fail_at: fsync(fd, n))
        rc, err = run_cli(capsys, "--out", out, *args)
        assert rc == 3 and err.startswith(f"error: {out / 'train'}/") and "\n" not in err, err
        assert err.endswith(": cannot write (No space left on device)")
        assert not list(out.rglob(".*.tmp"))
        m = out / "train" / "manifest.json"
        assert not m.exists() or not json.loads(m.read_text())["complete"]
        with pytest.raises(DataError, match="no manifest|did not finish"):
            build_loader(out, "train", 8, 2)
        monkeypatch.setattr(os, "fsync", fsync)
        assert run_cli(capsys, "--out", out, *args)[0] == 0
        assert shard_bytes(out / "train") == shard_bytes(tmp_path / "clean" / "train")


# --- loader: every bad case is a DataError naming the path -----------------------------------------

def damage_manifest(out, change):
    mpath = out / "train" / "manifest.json"
    m = json.loads(mpath.read_text())
    change(m)
    mpath.write_text(json.dumps(m))
    return mpath


@pytest.mark.parametrize("change,what", [
    (lambda m: m.pop("shards"), "damaged manifest: 'shards' must be a list"),
    (lambda m: m["shards"][0].update(file=3), "damaged manifest: 'shards' must be a list"),
    (lambda m: m["shards"][0].update(num_tokens="10"), "damaged manifest: 'shards' must be a list"),
    (lambda m: m.pop("dtype"), "damaged manifest: 'dtype' must be int32 or uint16"),
    (lambda m: m.pop("tokenizer"), "damaged manifest: 'tokenizer' must be"),
    (lambda m: m.update(complete="yes"), "prepare did not finish"),
])
def test_damaged_manifest_fields(prepared, change, what):
    _, out, _ = prepared
    mpath = damage_manifest(out, change)
    with pytest.raises(DataError) as e:
        build_loader(out, "train", 16, 2)
    assert str(e.value).startswith(f"{mpath}: {what}")


def test_manifest_that_cannot_be_read_and_tokenizer_that_is_missing(prepared, tmp_path):
    _, out, _ = prepared
    with pytest.raises(DataError) as e:
        build_loader(out, "train", 16, 2, tokenizer=tmp_path / "missing.model")
    assert str(e.value) == f"{tmp_path / 'missing.model'}: cannot read tokenizer model (No such file or directory)"
    mpath = out / "train" / "manifest.json"
    mpath.unlink()
    mpath.mkdir()
    with pytest.raises(DataError) as e:
        build_loader(out, "train", 16, 2)
    assert str(e.value) == f"{mpath}: cannot read manifest (Is a directory)"
