"""`manifest.json`: what one prepared split contains, and the checks the loader runs on it.

One manifest per split folder (``OUT/train/manifest.json``, ``OUT/val/manifest.json``). It lists the
shards in stream order with their token counts, the tokenizer (sha256 of the model file, vocab size,
bos/eos), the source files with size/mtime (so a re-run can tell which sources are already done) and
the skip counts. ``"complete": true`` is written last, atomically; a loader refuses anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data.errors import DataError
from data.shards import DTYPES, read_header

MANIFEST_NAME = "manifest.json"
FORMAT = "amp-token-shards"
FORMAT_VERSION = 1


def read_manifest(split_dir: str | os.PathLike) -> dict | None:
    """The manifest of `split_dir`, or None if there is none yet. An unreadable or damaged one is a DataError."""
    path = Path(split_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"manifest is not valid JSON ({e})") from None
    except OSError as e:
        raise DataError(path, f"cannot read manifest ({e.strerror})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(path, f"not a token-shard manifest (format != {FORMAT!r})")
    if m.get("version") != FORMAT_VERSION:
        raise DataError(path, f"unsupported manifest version {m.get('version')}")
    _check_fields(m, path)
    return m


def load_complete_manifest(split_dir: str | os.PathLike) -> dict:
    split_dir = Path(split_dir)
    m = read_manifest(split_dir)
    if m is None:
        raise DataError(split_dir / MANIFEST_NAME,
                        "no manifest: run `python -m data.prepare --out DIR` first (the loader takes DIR)")
    if m.get("complete") is not True:
        raise DataError(split_dir / MANIFEST_NAME, "prepare did not finish for this split; re-run it to resume")
    return m


def _is_str(x) -> bool:
    return isinstance(x, str)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_list_of(items, key: str, check) -> bool:
    return isinstance(items, list) and all(isinstance(x, dict) and check(x.get(key)) for x in items)


def _check_fields(m: dict, path: Path) -> None:
    """DataError unless the fields prepare and the loader read are present and of the right type (a
    hand-edited or damaged manifest then fails here, naming the field, not later with a KeyError)."""
    dtypes = sorted(d.name for d in DTYPES.values())
    tok = m.get("tokenizer")
    checks = [
        ("shards", "a list of {file, num_tokens, ...}", _is_list_of(m.get("shards"), "file", _is_str)
         and _is_list_of(m["shards"], "num_tokens", _is_count)),
        ("sources", "a list of {path, ...}", _is_list_of(m.get("sources"), "path", _is_str)),
        ("options", "an object", isinstance(m.get("options"), dict)),
        ("dtype", " or ".join(dtypes), m.get("dtype") in dtypes),
        ("tokenizer", "{sha256, vocab_size, ...}",
         isinstance(tok, dict) and _is_str(tok.get("sha256")) and _is_count(tok.get("vocab_size"))),
    ]
    for name, want, ok in checks:
        if not ok:
            raise DataError(path, f"damaged manifest: {name!r} must be {want}")


def check_shards(split_dir: str | os.PathLike, manifest: dict) -> list[tuple[Path, int]]:
    """Validate every listed shard (header, size, count == manifest); return ``[(path, tokens)]``."""
    out = []
    for s in manifest["shards"]:
        path = Path(split_dir) / s["file"]
        dtype, count = read_header(path)
        if count != s["num_tokens"] or dtype.name != manifest["dtype"]:
            raise DataError(path, f"shard holds {count} {dtype.name} tokens but the manifest says "
                                  f"{s['num_tokens']} {manifest['dtype']}")
        out.append((path, count))
    return out


def check_tokenizer(manifest: dict, tokenizer, where: str | os.PathLike = "manifest") -> None:
    """DataError unless `tokenizer` (a data.tokenizer.Tokenizer or a model path) is the one used."""
    from amp_common.checksum import file_sha256

    path = getattr(tokenizer, "path", tokenizer)
    try:
        sha = tokenizer.sha256 if hasattr(tokenizer, "sha256") else file_sha256(tokenizer)
    except OSError as e:
        raise DataError(path, f"cannot read tokenizer model ({e.strerror})") from None
    want = manifest["tokenizer"]["sha256"]
    if sha != want:
        raise DataError(where, f"tokenizer {path} (sha256 {sha[:12]}...) does not match the one the data was "
                               f"prepared with ({manifest['tokenizer'].get('path')}, sha256 {want[:12]}...)")
