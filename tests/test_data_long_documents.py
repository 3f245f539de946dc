"""Long documents are tokenised in pieces cut at spaces (data/tokenizer.py, issue #21 item 12), which bounds
SentencePiece's memory by a piece: the pieces keep every character, and the ids equal an independent
whole-document encoding. A tiny CHUNK_CHARS stands in for the 1 Mi characters of a real run; the peak memory
of a 50 MB document is measured by benchmarks/prepare_memory.py."""
from __future__ import annotations

import pytest

import data.tokenizer as tokenizer_module
from data.prepare import prepare_split
from data.tokenizer import Tokenizer, cuts_at_spaces_are_exact, split_at_spaces
from helpers.corpus import MISTRAL, SAMPLE_TOKENIZER, c4_lines, make_texts, reference_stream, split_tokens, write_gz

TOKENIZERS = [SAMPLE_TOKENIZER, pytest.param(MISTRAL, marks=pytest.mark.skipif(not MISTRAL.is_file(),
                                                                                reason="no shared Mistral tokenizer"))]


def awkward_texts() -> list[str]:
    """Words with runs of spaces, tabs, newlines, digits and non-ASCII text, leading and trailing spaces."""
    texts = make_texts(12, seed=4, min_words=40, max_words=160)
    texts = [t.replace(" the ", " the   ", 1).replace(" of ", "\n of\t ", 2) + "  x y  z " for t in texts]
    return texts + [" lead", "x", "nospaceatall" * 9, "end ", "a b", "1811 3.14  café Ωmega"]


@pytest.mark.parametrize("max_chars", [1, 2, 5, 16, 64])
def test_split_keeps_every_character_and_cuts_only_at_single_spaces(max_chars):
    for text in awkward_texts():
        pieces = split_at_spaces(text, max_chars)
        assert " ".join(pieces) == text
        for i, piece in enumerate(pieces):
            assert piece  # never an empty piece
            if i:  # a cut: the dropped space stood between two non-space characters
                assert not piece.startswith(" ") and not pieces[i - 1].endswith(" ")
        # a piece is over max_chars only where no cut was possible within it
        for piece in pieces:
            if len(piece) > max_chars:
                assert not any(piece[j] == " " and piece[j - 1] != " " and piece[j + 1] != " "
                               for j in range(1, min(max_chars + 1, len(piece) - 1)))
    assert split_at_spaces("a b c d", 3) == ["a b", "c d"]
    assert split_at_spaces("a  b c", 1) == ["a  b", "c"]  # never inside a run of spaces
    assert split_at_spaces("abcdef gh", 2) == ["abcdef", "gh"]  # the next space when none lies within reach


@pytest.mark.parametrize("path", TOKENIZERS)
@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_pieces_encode_to_the_ids_of_the_whole_document(monkeypatch, path, chunk):
    tok = Tokenizer(path)
    assert tok.cuts_at_spaces
    texts = awkward_texts()
    seen = []

    class Spy:  # what SentencePiece is asked to encode
        def __init__(self, sp):
            self.sp = sp

        def encode(self, items, **kw):
            seen.extend(items)
            return self.sp.encode(items, **kw)

    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", chunk)
    tok.sp = Spy(tok.sp)
    ids = tok.encode_stream(texts, num_threads=2)
    assert ids.tolist() == reference_stream(path, texts).tolist()
    longest = max(len(t) for t in texts)
    assert len(seen) > len(texts) and max(len(s) for s in seen) < longest  # long documents went in pieces


def test_models_that_could_join_across_a_space_are_not_cut(monkeypatch):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    good = Tokenizer(SAMPLE_TOKENIZER).sp
    assert cuts_at_spaces_are_exact(good)
    for change in (lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True),
                   lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", False),
                   lambda m: setattr(m.trainer_spec, "split_by_whitespace", False),
                   lambda m: setattr(m.pieces[300], "piece", "a\u2581b")):
        m = sentencepiece_model_pb2.ModelProto()
        m.ParseFromString(good.serialized_model_proto())
        change(m)
        assert not cuts_at_spaces_are_exact(spm.SentencePieceProcessor(model_proto=m.SerializeToString()))


def test_prepare_of_a_long_document_equals_the_reference(tmp_path, monkeypatch):
    texts = [" ".join(make_texts(30, seed=9, min_words=200, max_words=400)), *make_texts(5, seed=10)]
    src = write_gz(tmp_path / "long.json.gz", c4_lines(texts))
    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", 500)
    prepare_split("train", [src], SAMPLE_TOKENIZER, tmp_path / "out", workers=2, progress=False)
    assert split_tokens(tmp_path / "out" / "train").tolist() == reference_stream(SAMPLE_TOKENIZER, texts).tolist()
