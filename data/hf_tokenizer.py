"""Hugging Face ``tokenizer.json`` tokenizers (Llama 3, Mistral, most new models) through `tokenizers`.

The same interface and document convention as data.tokenizer.Tokenizer (SentencePiece): every document
is ``[bos] + tokens + [eos]``. Which tokens are BOS and EOS, first match wins:

1. the names given (``python -m data.prepare --bos TOKEN --eos TOKEN``);
2. ``bos_token`` / ``eos_token`` of ``tokenizer_config.json`` beside the file (how transformers ships them);
3. the tokenizer's post-processor template (``TemplateProcessing``: the special token before ``$A`` is
   BOS, the one after it EOS).

A tokenizer where either is still unknown is refused in one line naming the options. The text itself is
encoded without the tokenizer's own special tokens (``add_special_tokens=False``), so the template never
adds a second BOS. `sha256` is the sha256 of ``tokenizer.json`` (what the manifest records and
``amp-ckpt export --tokenizer auto`` copies); the BOS/EOS ids are part of prepare's options.

Threads: `tokenizers` encodes a batch on its own Rayon pool, sized once per process by the
``RAYON_NUM_THREADS`` environment variable; `encode_stream` sets it from ``num_threads`` when nothing set
it before the first batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from amp_common.checksum import file_sha256
from data.errors import DataError

CONFIG_NAME = "tokenizer_config.json"


def _config_token(value) -> str | None:
    """A ``bos_token``/``eos_token`` value of tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_tokens(post_processor) -> tuple[str | None, str | None]:
    """(BOS, EOS) token names from a TemplateProcessing post-processor (also inside a Sequence)."""
    if not isinstance(post_processor, dict):
        return None, None
    if post_processor.get("type") == "Sequence":
        found = [_template_tokens(p) for p in post_processor.get("processors") or []]
        bos = next((b for b, _ in found if b), None)
        eos = next((e for _, e in found if e), None)
        return bos, eos
    if post_processor.get("type") != "TemplateProcessing":
        return None, None
    items = post_processor.get("single") or []
    seq = next((i for i, it in enumerate(items) if isinstance(it, dict) and "Sequence" in it), None)
    if seq is None:
        return None, None

    def special(it) -> str | None:
        return it["SpecialToken"].get("id") if isinstance(it, dict) and "SpecialToken" in it else None

    before = [special(it) for it in items[:seq] if special(it)]
    after = [special(it) for it in items[seq + 1:] if special(it)]
    return (before[-1] if before else None), (after[0] if after else None)


class HFTokenizer:
    """A ``tokenizer.json`` with the document convention built in (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, bos: str | None = None, eos: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "tokenizer file not found")
        try:
            raw = self.path.read_text("utf-8")
            self.tok = _Tokenizer.from_str(raw)
            spec = json.loads(raw)
        except OSError as e:
            raise DataError(self.path, f"cannot read tokenizer ({e.strerror})") from None
        except Exception as e:  # tokenizers raises its own Exception subclass with a serde message
            raise DataError(self.path, f"not a valid tokenizer.json ({' '.join(str(e).split())[:200]})") from None
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        names = {"bos": bos, "eos": eos}
        source = {k: f"--{k}" for k, v in names.items() if v}
        config = self._config() if not (bos and eos) else {}  # both named: tokenizer_config.json is not read
        for k in ("bos", "eos"):
            if not names[k] and (name := _config_token(config.get(f"{k}_token"))):
                names[k], source[k] = name, CONFIG_NAME
        template = _template_tokens(spec.get("post_processor") if isinstance(spec, dict) else None)
        for k, name in zip(("bos", "eos"), template):
            if not names[k] and name:
                names[k], source[k] = name, "the post-processor template"
        missing = [k.upper() for k in ("bos", "eos") if not names[k]]
        if missing:
            raise DataError(self.path, f"no {' or '.join(missing)} token found (neither {CONFIG_NAME} beside it "
                                       "nor the post-processor template names one); name them with --bos TOKEN "
                                       "--eos TOKEN")
        ids = {}
        for k in ("bos", "eos"):
            token_id = self.tok.token_to_id(names[k])
            if token_id is None:
                raise DataError(self.path, f"{k.upper()} token {names[k]!r} (from {source[k]}) is not in the "
                                           "vocabulary")
            ids[k] = int(token_id)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.bos_token, self.eos_token = names["bos"], names["eos"]
        self.sha256 = file_sha256(self.path)

    def _config(self) -> dict:
        path = self.path.parent / CONFIG_NAME
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(path, f"cannot read ({e}); fix it or name the tokens with --bos/--eos") from None
        return config if isinstance(config, dict) else {}

    def encode_document(self, text: str) -> list[int]:
        """BOS + tokens + EOS."""
        return [self.bos_id, *self.tok.encode(text, add_special_tokens=False).ids, self.eos_id]

    def encode_stream(self, texts: Sequence[str], num_threads: int = 1) -> np.ndarray:
        """BOS + tokens + EOS of every text, concatenated in order, as one int32 array (batch-encoded in Rust)."""
        if not texts:
            return np.zeros(0, np.int32)
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))  # read once, when the pool starts
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: faster (>= 0.20)
        encodings = encode(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 2 for e in encodings), np.int64, len(encodings))
        out = np.empty(int(lengths.sum()), np.int32)
        pos = 0
        for e, n in zip(encodings, lengths.tolist()):
            out[pos] = self.bos_id
            out[pos + 1:pos + n - 1] = e.ids
            out[pos + n - 1] = self.eos_id
            pos += n
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def options(self) -> dict:
        """What shapes the bytes besides the file: the BOS/EOS ids (chosen by option, config or template)."""
        return {"bos_id": self.bos_id, "eos_id": self.eos_id}

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}
