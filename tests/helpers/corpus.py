"""Tiny synthetic corpora in both source formats, for the tests/test_data_*.py files."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np

from helpers.data import REPO
from helpers.data import TOKENIZER as SAMPLE_TOKENIZER  # noqa: F401  (the data tests import it from here)

SHARED = REPO.parent / "shared"
MISTRAL = SHARED / "tokenizers" / "mistral-v1" / "tokenizer.model"

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
         "but have an they you were her she there one all we their been has who will more if no out so "
         "Elizabeth Darcy Bennet Pemberley letter morning sister fortune 1811 3.14 café naïve Ωmega").split()


def make_texts(n: int, seed: int = 0, min_words: int = 5, max_words: int = 200) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(k), "\n\n")
        out.append(" ".join(words).replace(" \n\n ", "\n\n"))
    return out


def c4_lines(texts) -> list[bytes]:
    return [json.dumps({"text": t, "timestamp": "2019-04-25T00:00:00Z", "url": f"test#{i}"}).encode()
            for i, t in enumerate(texts)]


def slimpajama_lines(texts, sets=None) -> list[bytes]:
    sets = sets or ["RedPajamaCommonCrawl"] * len(texts)
    return [json.dumps({"text": t, "meta": {"redpajama_set_name": s}}).encode() for t, s in zip(texts, sets)]


def write_gz(path: Path, lines: list[bytes]) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


def write_zst(path: Path, lines: list[bytes]) -> Path:
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines) + b"\n"))
    return path


def reference_stream(tokenizer_path, texts) -> np.ndarray:
    """Independent tokenisation straight through sentencepiece: BOS + ids + EOS per document."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    out = []
    for t in texts:
        out += [sp.bos_id(), *sp.encode(t), sp.eos_id()]
    return np.asarray(out, dtype=np.int64)


def split_tokens(split_dir: Path) -> np.ndarray:
    """Every token of a completely prepared split, in stream order, as int64."""
    from data.shards import open_shard

    m = json.loads((split_dir / "manifest.json").read_text())
    assert m["complete"]
    parts = [np.asarray(open_shard(split_dir / s["file"]), dtype=np.int64) for s in m["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def shard_bytes(split_dir: Path) -> list[bytes]:
    """The bytes of every shard the split's manifest lists, in order."""
    m = json.loads((split_dir / "manifest.json").read_text())
    return [(split_dir / s["file"]).read_bytes() for s in m["shards"]]


def write_parquet(path: Path, texts, column: str = "text", row_group_size: int = 7) -> Path:
    """A parquet file with the documents in `column` (and an id column), several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: list(texts), "id": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


def train_bpe_json(path: Path, texts, vocab_size: int = 400, template: bool = True, extra_tokens: int = 0) -> Path:
    """A byte-level BPE ``tokenizer.json`` trained on `texts` with special tokens ``<s>`` (0) and ``</s>`` (1);
    with `template`, a ``<s> $A </s>`` post-processor names them BOS/EOS. `extra_tokens` added tokens
    ``<extra_i>`` after the learned vocabulary (a vocabulary above 65,536 ids without a large corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                  ("</s>", 1)])
    if extra_tokens:
        tok.add_special_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    tok.save(str(path))
    return path


def hf_reference_stream(tokenizer_json, texts, bos_id: int, eos_id: int) -> np.ndarray:
    """Independent tokenisation through `tokenizers`, one document at a time: BOS + ids + EOS per document."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out = []
    for t in texts:
        out += [bos_id, *tok.encode(t, add_special_tokens=False).ids, eos_id]
    return np.asarray(out, dtype=np.int64)
