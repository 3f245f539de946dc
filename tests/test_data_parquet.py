"""Parquet sources and --text-field: tokens equal an independent tokenisation, reading is row group by row
group, and a damaged file, a missing column or a non-string value is one line naming file and row group/row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.prepare import main, prepare_split
from data.readers import expand_sources, parquet_text_batches
from helpers.corpus import (
    SAMPLE_TOKENIZER,
    c4_lines,
    make_texts,
    reference_stream,
    split_tokens,
    write_gz,
    write_parquet,
)


def test_parquet_tokens_equal_independent_tokenisation(tmp_path):
    """Two parquet files (row groups of 7) and a C4 file, in sorted path order; empty documents skipped."""
    t1, t2, t3 = make_texts(30, seed=31), make_texts(12, seed=32), make_texts(9, seed=33)
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", t1[:10] + ["  \n"] + t1[10:])
    write_gz(src / "b.json.gz", c4_lines(t2))
    write_parquet(src / "c.parquet", t3, row_group_size=100)
    out = tmp_path / "out"
    m = prepare_split("train", expand_sources([str(src)]), SAMPLE_TOKENIZER, out, workers=2, shard_tokens=999,
                      progress=False)
    assert np.array_equal(split_tokens(out / "train"), reference_stream(SAMPLE_TOKENIZER, t1 + t2 + t3))
    assert [s["format"] for s in m["sources"]] == ["parquet", "c4", "parquet"]
    assert m["skipped"] == {"empty": 1} and m["num_documents"] == len(t1 + t2 + t3)
    assert "text_field" not in m["options"]  # the default keeps the options (and older folders) as they were


def test_text_field_names_the_column_and_the_json_field(tmp_path):
    texts = make_texts(14, seed=34)
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", texts[:7], column="content")
    write_gz(src / "b.json.gz", [b'{"content": %s, "text": 3}' % json.dumps(t).encode()
                                 for t in texts[7:]])
    out = tmp_path / "out"
    assert main(["--out", str(out), "--train", str(src), "--text-field", "content", "--no-progress"]) == 0
    assert np.array_equal(split_tokens(out / "train"), reference_stream(SAMPLE_TOKENIZER, texts))
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["options"]["text_field"] == "content"


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    """Bounded memory: every pyarrow read asks for one row group (never the whole file)."""
    import pyarrow.parquet as pq

    texts = make_texts(40, seed=35)
    path = write_parquet(tmp_path / "a.parquet", texts, row_group_size=6)
    asked = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        asked.append(kw.get("row_groups"))
        return real(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    got = [t for texts_, _, _ in parquet_text_batches(path, batch_bytes=500) for t in texts_]
    assert got == texts
    assert asked == [[g] for g in range(7)]


def _run(tmp_path, capsys, *args) -> tuple[int, str]:
    code = main(["--out", str(tmp_path / "out"), "--no-progress", *args])
    return code, capsys.readouterr().err.strip()


def _damage_data_page(path):
    """Overwrite bytes in the middle of the file (inside a data page, the footer intact)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid:mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["truncated", "not_parquet", "damaged_page", "missing_column", "int_column",
                                  "null_value", "bad_utf8"])
def test_bad_parquet_is_one_line(tmp_path, capsys, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    texts = make_texts(30, seed=36)
    expect = f"{path}: "
    if case == "truncated":
        write_parquet(path, texts)
        path.write_bytes(path.read_bytes()[:-20])
        expect += "not a readable parquet file"
    elif case == "not_parquet":
        path.write_bytes(b'{"text": "a json line in a .parquet file"}\n' * 4)
        expect += "not a readable parquet file"
    elif case == "damaged_page":
        pq.write_table(pa.table({"text": texts}), path, row_group_size=10, compression="snappy")
        _damage_data_page(path)
        expect = f"{path}, row group "
    elif case == "missing_column":
        write_parquet(path, texts, column="body")
        expect += "no column 'text' (columns: ['body', 'id']); name the text column with --text-field"
    elif case == "int_column":
        pq.write_table(pa.table({"text": list(range(5))}), path)
        expect += "column 'text' holds int64, not strings"
    elif case == "null_value":
        pq.write_table(pa.table({"text": texts[:12] + [None] + texts[12:]}), path, row_group_size=5)
        expect = f"{path}, row group 2, row 12: 'text' is null, not a string"
    else:  # bytes that are not UTF-8 under a string column (pyarrow writes a view without checking)
        raw = [t.encode() for t in texts[:9]] + [b"ok \xff\xfe bad"]
        pq.write_table(pa.table({"text": pa.array(raw, pa.binary()).view(pa.string())}), path, row_group_size=4)
        expect = f"{path}, row group 2, row 9: 'text' is not valid UTF-8"
    code, err = _run(tmp_path, capsys, "--train", str(path))
    assert code == 2, err
    assert err.startswith(f"error: {expect}") and "\n" not in err, err
    assert not (tmp_path / "out" / "train" / "manifest.json").exists() or \
        '"complete": false' in (tmp_path / "out" / "train" / "manifest.json").read_text()
