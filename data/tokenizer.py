"""SentencePiece tokenizer: load any Llama-layout model, or train a small one for the demo.

A document is always encoded as ``[bos] + pieces + [eos]`` so that document boundaries survive the
packing of documents into one contiguous token stream (the model sees EOS then BOS between documents).

Llama layout: BPE, byte fallback (no token is ever <unk> for valid UTF-8), unk/bos/eos = 0/1/2, no pad
id, identity normalisation, digits split. Llama-2, TinyLlama and Mistral-v0.1 models all have it; the
demo tokenizer in ``data/sample/tokenizer.model`` is trained here with the same settings, only smaller.

Regenerate the demo tokenizer (deterministic for a given sentencepiece version)::

    python -m data.tokenizer --out data/sample/tokenizer.model
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from amp_common.checksum import file_sha256
from data.cli import MAX_THREADS, Parser, int_in
from data.errors import DataError
from data.readers import DEFAULT_TEXT_FIELD

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLE_TOKENIZER = SAMPLE_DIR / "tokenizer.model"
SAMPLE_TRAIN = SAMPLE_DIR / "c4-train.00000-of-00001.json.gz"
SAMPLE_VAL = SAMPLE_DIR / "c4-validation.00000-of-00001.json.gz"
MIN_VOCAB = 3 + 256 + 1  # unk/bos/eos, the byte-fallback pieces, one character
MAX_VOCAB = 2**31 - 1  # SentencePiece stores the size as an int32


class Tokenizer:
    """Thin wrapper around a SentencePieceProcessor with the document convention built in."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "tokenizer model file not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise DataError(self.path, f"not a valid SentencePiece model ({e})") from None
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(self.path, f"tokenizer has no BOS/EOS (bos_id={self.bos_id}, "
                                       f"eos_id={self.eos_id}); a Llama-layout model is required")
        self.sha256 = file_sha256(self.path)
        self.cuts_at_spaces = cuts_at_spaces_are_exact(self.sp)

    def encode_document(self, text: str) -> list[int]:
        """BOS + tokens + EOS."""
        return [self.bos_id, *self.sp.encode(text), self.eos_id]

    def encode_stream(self, texts: Sequence[str], num_threads: int = 1) -> np.ndarray:
        """BOS + tokens + EOS of every text, concatenated in order, as one int32 array.

        SentencePiece encodes the batch on `num_threads` threads without holding the GIL and returns one
        int32 buffer per text, so no Python int is ever made for a token."""
        if not texts:
            return np.zeros(0, np.int32)
        if self.cuts_at_spaces and any(len(t) > CHUNK_CHARS for t in texts):
            return self._encode_in_pieces(texts, num_threads)
        ids = self.sp.encode(list(texts), add_bos=True, add_eos=True, num_threads=num_threads, out_type="numpy")
        return np.concatenate(ids)

    def _encode_in_pieces(self, texts: Sequence[str], num_threads: int) -> np.ndarray:
        """`encode_stream` with every text longer than CHUNK_CHARS encoded in pieces (`split_at_spaces`): the
        same ids (the model cuts at spaces itself, see `cuts_at_spaces_are_exact`), and SentencePiece's working
        memory (~45 bytes per input byte) bounded by a piece instead of the whole document."""
        pieces, counts = [], []
        for text in texts:
            parts = split_at_spaces(text, CHUNK_CHARS)
            pieces += parts
            counts.append(len(parts))
        ids = iter(self.sp.encode(pieces, num_threads=num_threads, out_type="numpy"))
        del pieces
        bos, eos = np.array([self.bos_id], np.int32), np.array([self.eos_id], np.int32)
        out = []
        for n in counts:
            out += [bos, *(next(ids) for _ in range(n)), eos]
        return np.concatenate(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def options(self) -> dict:
        """What shapes the bytes besides the model file: nothing (BOS/EOS are the model's own)."""
        return {}

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


# A document longer than this is encoded in pieces cut at spaces (where the model provably cuts too; see
# data/README.md): SentencePiece needs about 45 bytes of memory per input byte, 2.3 GB for one 50 MB document.
CHUNK_CHARS = 1 << 20
_SPACE = " "


def cuts_at_spaces_are_exact(sp) -> bool:
    """Whether encoding a text cut at a space (`split_at_spaces`) gives the ids of the whole text: the model
    splits words at spaces before it segments them (no piece spans a space), writes a space as "▁" and adds a
    "▁" before each text (the dummy prefix, which stands for the space the cut removed), and normalises
    nothing (identity: no rule can join characters across the cut). Mistral-v0.1 and the demo tokenizer are
    such models; with others documents are encoded whole."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        m = sentencepiece_model_pb2.ModelProto()
        m.ParseFromString(sp.serialized_model_proto())
    except Exception:  # noqa: BLE001 -- no protobuf, or a model it cannot read: do not cut
        return False
    t, n = m.trainer_spec, m.normalizer_spec
    if not (t.split_by_whitespace and not t.treat_whitespace_as_suffix and n.add_dummy_prefix
            and n.escape_whitespaces and not n.remove_extra_whitespaces and n.name == "identity"
            and not n.precompiled_charsmap):
        return False
    # a user-defined piece is matched before the split at spaces: none may hold a space after another character
    return not any("\u2581" in p.piece.lstrip("\u2581") for p in m.pieces)


def _cut_ok(text: str, i: int) -> bool:
    """A single space between two non-space characters (a run of spaces may be one whitespace piece)."""
    return text[i] == _SPACE and 0 < i < len(text) - 1 and text[i - 1] != _SPACE and text[i + 1] != _SPACE


def split_at_spaces(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars` characters where possible, each cut at a single space between
    two non-space characters, the space itself left out (the tokenizer's dummy prefix stands for it). A piece
    is longer only where no such space lies within `max_chars` characters: it then ends at the next one."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind(_SPACE, start + 1, start + max_chars + 1)
        while cut > start and not _cut_ok(text, cut):
            cut = text.rfind(_SPACE, start + 1, cut)
        if cut <= start:  # no space to cut at within max_chars: the next one after
            cut = text.find(_SPACE, start + max_chars + 1)
            while cut != -1 and not _cut_ok(text, cut):
                cut = text.find(_SPACE, cut + 1)
            if cut == -1:
                break
        pieces.append(text[start:cut])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def is_hf_tokenizer(path: str | os.PathLike) -> bool:
    """A Hugging Face ``tokenizer.json`` (any ``*.json`` file), else a SentencePiece model."""
    return str(path).endswith(".json")


def load_tokenizer(path: str | os.PathLike, bos: str | None = None, eos: str | None = None):
    """`Tokenizer` (SentencePiece) or, for a ``*.json`` file, `data.hf_tokenizer.HFTokenizer`; both encode
    documents as BOS + tokens + EOS. `bos`/`eos` name those tokens (tokenizer.json only)."""
    if is_hf_tokenizer(path):
        from data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path, bos, eos)
    if bos or eos:
        raise DataError(f"--bos/--eos with {path}", "name BOS/EOS for a tokenizer.json only; a SentencePiece "
                                                    "model has its own")
    return Tokenizer(path)


def _training_lines(files: Sequence[str | os.PathLike], max_line_bytes: int,
                    text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """Non-empty lines of every document, long lines cut at spaces into pieces of <= max_line_bytes.

    SentencePiece treats one input item as a sentence and silently drops items longer than
    max_sentence_length, so whole documents (or long paragraphs) would otherwise be lost."""
    from data.readers import iter_texts

    for f in files:
        for text in iter_texts(f, text_field=text_field):
            for line in text.split("\n"):
                while line.strip():
                    if len(line.encode("utf-8")) <= max_line_bytes:
                        yield line
                        break
                    cut = line.rfind(" ", 0, max_line_bytes // 4)  # <= 4 bytes per character
                    cut = cut if cut > 0 else max_line_bytes // 4
                    yield line[:cut]
                    line = line[cut:]


def _training_error(message: str, inputs: Sequence[str | os.PathLike], vocab_size: int) -> DataError:
    """SentencePiece's training failures (C++ check messages) as a DataError naming what to change."""
    if "!sentences_.empty()" in message:
        return DataError(", ".join(map(str, inputs)), "no training text (every document is empty)")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return DataError(f"--vocab-size {vocab_size}", f"too small: these inputs need at least {m[1]} pieces")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return DataError(f"--vocab-size {vocab_size}", f"too large: these inputs allow at most {m[1]} pieces")
    return DataError("sentencepiece training", message.split("] ", 1)[-1].strip() or message)


def train_tokenizer(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, vocab_size: int = 4096,
                    seed: int = 0, input_sentence_size: int = 300_000, num_threads: int = 2,
                    text_field: str = DEFAULT_TEXT_FIELD) -> Tokenizer:
    """Train a Llama-layout BPE model from C4/SlimPajama/parquet files (the document in `text_field`) and
    write it atomically to `out`."""
    import sentencepiece as spm

    out = Path(out)
    max_len = 4192
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(inputs, max_len, text_field), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.99995, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
            max_sentence_length=max_len, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(str(e), inputs, vocab_size) from None
    from data.shards import atomic_write_bytes, make_folder

    make_folder(out.parent)
    atomic_write_bytes(out, [model.getvalue()])
    return Tokenizer(out)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m data.tokenizer",
        description="Train a Llama-layout SentencePiece BPE tokenizer (byte fallback, unk/bos/eos = 0/1/2, "
                    "no pad) from C4 *.json.gz, SlimPajama *.jsonl.zst or *.parquet files. Documents are later encoded "
                    "as BOS + tokens + EOS. With no arguments it regenerates data/sample/tokenizer.model.")
    p.add_argument("--input", nargs="+", default=[str(SAMPLE_TRAIN)],
                   help="source files (default: the sample train file)")
    p.add_argument("--out", default=str(SAMPLE_TOKENIZER), help="model file to write (default: %(default)s)")
    p.add_argument("--vocab-size", type=int_in(MIN_VOCAB, MAX_VOCAB), default=4096,
                   help=f"pieces, >= {MIN_VOCAB}: 3 special + 256 byte pieces + at least one character; how many "
                        "the inputs need or allow is known only once training runs (default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    p.add_argument("--input-sentence-size", type=int_in(0), default=300_000,
                   help="cap on training lines sampled, 0 = all (default: %(default)s)")
    p.add_argument("--num-threads", type=int_in(1, MAX_THREADS), default=2)
    p.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                   help="the JSON field / parquet column holding the document (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if Path(a.out).is_dir():  # found before training, not when the model is written
        parser.error(f"argument --out: {a.out} is a folder; name the model file to write")
    if not a.text_field:
        parser.error("argument --text-field: must name a field, got ''")
    try:
        tok = train_tokenizer(a.input, a.out, a.vocab_size, a.seed, a.input_sentence_size, a.num_threads,
                              a.text_field)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {tok.path} vocab_size={tok.vocab_size} sha256={tok.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
