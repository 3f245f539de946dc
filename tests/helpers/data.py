"""A small prepared slice of the embedded sample corpus (40 train / 4 val documents, sample tokenizer)."""
from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
TOKENIZER = SAMPLE / "tokenizer.model"


def _head(src: Path, dst: Path, n_docs: int) -> Path:
    with gzip.open(src, "rb") as f, gzip.open(dst, "wb") as g:
        for i, line in enumerate(f):
            if i >= n_docs:
                break
            g.write(line)
    return dst


def prepare_small(root: Path) -> Path:
    """40 train / 4 val documents of the embedded sample, tokenised with the sample tokenizer."""
    from data.prepare import prepare_split

    out = root / "data"
    if (out / "val" / "manifest.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    train = _head(SAMPLE / "c4-train.00000-of-00001.json.gz", root / "train.json.gz", 40)
    val = _head(SAMPLE / "c4-validation.00000-of-00001.json.gz", root / "val.json.gz", 4)
    prepare_split("train", [train], TOKENIZER, out, workers=1, progress=False)
    prepare_split("val", [val], TOKENIZER, out, workers=1, progress=False)
    return out
