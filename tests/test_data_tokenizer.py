"""Tokenizer: Llama layout of the committed demo model, document convention, reproducible training,
loading real Llama-layout models (Mistral v0.1 from ../shared when present)."""

from __future__ import annotations

import numpy as np
import pytest

from amp_common.checksum import file_sha256
from data.errors import DataError
from data.tokenizer import Tokenizer, train_tokenizer
from helpers.corpus import MISTRAL, SAMPLE_TOKENIZER, c4_lines, make_texts, write_gz

UNSEEN = "日本語のテキスト ☃ \u0001 Ωmega"  # characters the demo model never saw -> byte fallback


def check_llama_layout(tok, vocab_size):
    sp = tok.sp
    assert tok.vocab_size == vocab_size
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(3 + b) for b in (0, 10, 255)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    ids = tok.encode_document(UNSEEN)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # no <unk>: byte fallback
    assert tok.decode(ids) == UNSEEN


def test_demo_tokenizer_has_llama_layout():
    check_llama_layout(Tokenizer(SAMPLE_TOKENIZER), 4096)


def test_document_is_bos_tokens_eos():
    tok = Tokenizer(SAMPLE_TOKENIZER)
    text = "It is a truth universally acknowledged."
    assert tok.encode_document(text) == [1, *tok.sp.encode(text), 2]
    for threads in (1, 3):
        stream = tok.encode_stream([text, "x", UNSEEN], num_threads=threads)
        assert stream.dtype == np.int32
        assert stream.tolist() == tok.encode_document(text) + tok.encode_document("x") + tok.encode_document(UNSEEN)
    assert tok.encode_stream([]).tolist() == []
    assert len(tok.sp.encode(text)) < len(text) / 2  # it learned English merges, not just bytes


def test_training_is_reproducible_and_llama_layout(tmp_path):
    src = write_gz(tmp_path / "t.json.gz", c4_lines(make_texts(200, seed=4)))
    a = train_tokenizer([src], tmp_path / "a.model", vocab_size=400, seed=0)
    b = train_tokenizer([src], tmp_path / "b.model", vocab_size=400, seed=0)
    assert a.sha256 == b.sha256 == file_sha256(tmp_path / "a.model")
    check_llama_layout(a, 400)


def test_committed_demo_tokenizer_regenerates_byte_for_byte(tmp_path):
    """The command in data/sample/SOURCES.md must reproduce the committed file."""
    import sentencepiece

    from data.tokenizer import main

    assert main(["--out", str(tmp_path / "t.model")]) == 0
    assert file_sha256(tmp_path / "t.model") == file_sha256(SAMPLE_TOKENIZER), (
        f"sentencepiece {sentencepiece.__version__} trains a different demo tokenizer")


def test_not_a_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(DataError, match="not a valid SentencePiece model") as e:
        Tokenizer(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="not found"):
        Tokenizer(tmp_path / "missing.model")


@pytest.mark.skipif(not MISTRAL.exists(), reason="../shared/tokenizers/mistral-v1 not present")
def test_loads_mistral_llama_layout_model():
    tok = Tokenizer(MISTRAL)
    check_llama_layout(tok, 32000)
    assert tok.encode_document("Hello world") == [1, 22557, 1526, 2]


def test_trains_from_parquet_with_a_named_column(tmp_path):
    """data.tokenizer reads every data.prepare format, and --text-field names the column (data.readers' error
    for a missing column tells the user to pass it): the model equals one trained on the same texts as JSON."""
    from data.tokenizer import main
    from helpers.corpus import write_parquet

    texts = make_texts(300, seed=3)
    src = write_parquet(tmp_path / "a.parquet", texts, column="content")
    gz = write_gz(tmp_path / "a.json.gz", c4_lines(texts))
    assert main(["--input", str(src), "--out", str(tmp_path / "p.model"), "--vocab-size", "400",
                 "--text-field", "content"]) == 0
    assert main(["--input", str(gz), "--out", str(tmp_path / "j.model"), "--vocab-size", "400"]) == 0
    assert file_sha256(tmp_path / "p.model") == file_sha256(tmp_path / "j.model")
