"""data.prepare --part K/N: three parts and a final run write the same bytes as one process, a failed part is
re-run alone, and bad --part values are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data.parts import part_sources
from data.prepare import main
from helpers.corpus import (
    REPO,
    SAMPLE_TOKENIZER,
    c4_lines,
    make_texts,
    slimpajama_lines,
    write_gz,
    write_parquet,
    write_zst,
)


def _files(split_dir) -> dict[str, bytes]:
    """Every file of a prepared split except the resume journals (not part of the output)."""
    return {p.name: p.read_bytes() for p in split_dir.iterdir() if not p.name.startswith("progress")}


@pytest.fixture()
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        write_parquet(src / f"fw-{i}.parquet", make_texts(12, seed=50 + i))
    write_gz(src / "c4-a.json.gz", c4_lines(make_texts(10, seed=60)))
    write_zst(src / "sp-b.jsonl.zst", slimpajama_lines(make_texts(8, seed=61)))
    write_gz(src / "c4-c.json.gz", c4_lines([]))  # a source without documents: a part with no shards
    (tmp_path / "val").mkdir()
    write_gz(tmp_path / "val" / "c4-v.json.gz", c4_lines(make_texts(6, seed=62)))  # validation is not training data
    return src


def test_part_sources_cover_every_source_once():
    got = [part_sources(list(range(10)), (k, 3)) for k in (1, 2, 3)]
    assert got == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert part_sources([1], (2, 3)) == []


def test_three_parts_and_the_final_run_equal_one_process(tmp_path, sources, capsys):
    """Parts 1 and 3 finish, part 2 fails on a damaged source and is re-run alone once it is fixed; the final
    run (no --part) tokenises nothing and writes the manifest: every file equals a one-process prepare's."""
    common = ["--train", str(sources), "--val", str(tmp_path / "val" / "c4-v.json.gz"), "--shard-tokens", "300",
              "--no-progress"]
    parts = tmp_path / "parts"
    for k in (1, 3):
        assert main(["--out", str(parts), "--part", f"{k}/3", *common]) == 0
    victim = sources / "fw-2.parquet"  # sorted: c4-a, c4-c, fw-0, fw-1, fw-2, ...: part 2 = c4-c, fw-2
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    assert main(["--out", str(parts), "--part", "2/3", *common]) == 2
    assert "fw-2.parquet: not a readable parquet file" in capsys.readouterr().err
    assert not (parts / "train" / "manifest.json").read_text().count('"complete": true')
    victim.write_bytes(good)
    assert main(["--out", str(parts), "--part", "2/3", *common]) == 0
    capsys.readouterr()
    assert main(["--out", str(parts), *common]) == 0
    assert "(7 reused)" in capsys.readouterr().out  # the final run re-tokenised nothing

    one = tmp_path / "one"
    assert main(["--out", str(one), *common]) == 0
    for split in ("train", "val"):
        expected = _files(one / split)
        assert len(expected) > (20 if split == "train" else 1)
        assert _files(parts / split) == expected
    m = json.loads((parts / "train" / "manifest.json").read_text())
    assert m["complete"] and [s["path"].rsplit("/", 1)[1] for s in m["sources"]] == sorted(
        p.name for p in sources.iterdir())


def test_final_run_does_what_no_part_finished(tmp_path, sources):
    """Only part 1 of 2 ran: the final run tokenises the rest itself and the result is still the same."""
    common = ["--train", str(sources), "--shard-tokens", "500", "--no-progress"]
    assert main(["--out", str(tmp_path / "parts"), "--part", "1/2", *common]) == 0
    assert not (tmp_path / "parts" / "train" / "manifest.json").read_text().count('"complete": true')
    assert main(["--out", str(tmp_path / "parts"), *common]) == 0
    assert main(["--out", str(tmp_path / "one"), *common]) == 0
    assert _files(tmp_path / "parts" / "train") == _files(tmp_path / "one" / "train")


def test_a_starting_part_leaves_the_running_parts_files_alone(tmp_path, sources):
    """Parts run at once in one --out (a SLURM array's tasks start whenever nodes free up): a part that starts
    must not delete another part's shard being written (its `.*.tmp`, renamed when complete), which made that
    part fail; the final run (no --part, after every part) removes what a killed part left."""
    common = ["--train", str(sources), "--shard-tokens", "300", "--no-progress"]
    train = tmp_path / "parts" / "train"
    train.mkdir(parents=True)
    writing = train / ".fw-0-0123abcd-0000.bin.x1y2.tmp"  # part 1's shard, still being written
    writing.write_bytes(b"half a shard")
    assert main(["--out", str(tmp_path / "parts"), "--part", "2/3", *common]) == 0
    assert writing.read_bytes() == b"half a shard"
    assert main(["--out", str(tmp_path / "parts"), *common]) == 0
    assert not writing.exists()


@pytest.mark.parametrize("args,message", [
    (["--part", "0/3"], "argument --part: K must be between 1 and N, got 0/3"),
    (["--part", "4/3"], "argument --part: K must be between 1 and N, got 4/3"),
    (["--part", "two"], "argument --part: expected K/N (e.g. 2/8), got 'two'"),
    (["--part", "1/2", "--overwrite"], "argument --overwrite: not with --part"),
])
def test_bad_part_is_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "out"), "--tokenizer", str(SAMPLE_TOKENIZER), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def _sbatch(args: list[str], **env) -> subprocess.CompletedProcess:
    """launch/slurm_prepare.sbatch run as SLURM would run it (its environment variables), without SLURM."""
    env = {**os.environ, "AMP_REPO": str(REPO), "AMP_VENV": "/nonexistent", "AMP_PYTHON": sys.executable,
           "SLURM_CPUS_PER_TASK": "1", **env}
    return subprocess.run(["bash", str(REPO / "launch" / "slurm_prepare.sbatch"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_sbatch_array_recipe_equals_one_process(tmp_path, sources):
    """The recipe of launch/slurm_prepare.sbatch: array tasks 0..2 of 3, then the job without an array index."""
    args = ["--train", str(sources), "--shard-tokens", "400", "--tokenizer", str(SAMPLE_TOKENIZER)]
    for i in (2, 0, 1):  # in any order
        proc = _sbatch(["--out", str(tmp_path / "parts"), *args], SLURM_ARRAY_TASK_ID=str(i),
                       SLURM_ARRAY_TASK_COUNT="3")
        assert proc.returncode == 0 and f"train part {i + 1}/3:" in proc.stdout, proc.stdout + proc.stderr
    assert _sbatch(["--out", str(tmp_path / "parts"), *args]).returncode == 0
    assert main(["--out", str(tmp_path / "one"), *args, "--no-progress"]) == 0
    assert _files(tmp_path / "parts" / "train") == _files(tmp_path / "one" / "train")
    bad = _sbatch(["--out", str(tmp_path / "x"), *args], SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="1",
                  AMP_PARTS="3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: array index 3 does not name a part of N=3")
