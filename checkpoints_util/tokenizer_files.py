"""The tokenizer that goes with an export (`amp-ckpt export ... --tokenizer PATH|auto`).

Why: exported weights are only usable with the exact SentencePiece model the training data was
tokenised with, and a wrong one fails silently (the model just produces nonsense). The data manifest
(`<data.dir>/train/manifest.json`, written by `python -m data.prepare`) records that tokenizer's path and
sha256, so `auto` takes it from there and an explicit PATH is checked against it when the manifest is
readable. The files written are what litgpt and transformers read: `tokenizer.model` +
`tokenizer_config.json` (LlamaTokenizer), or for a Hugging Face tokenizer (data prepared with a
`tokenizer.json`) `tokenizer.json` + `tokenizer_config.json` (PreTrainedTokenizerFast, with the BOS/EOS the
data was prepared with), and for Hugging Face the bos/eos ids in `config.json` and `generation_config.json`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from checkpoints_util.layout import CheckpointError


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    unk_id: int | None
    bos: str
    eos: str
    unk: str | None


def _manifest(ck) -> tuple[Path | None, dict | None]:
    data_dir = ((ck.train_config or {}).get("data") or {}).get("dir")
    if not data_dir:
        return None, None
    path = Path(data_dir) / "train" / "manifest.json"
    try:
        return path, json.loads(path.read_text()).get("tokenizer")
    except (OSError, ValueError):
        return path, None


def resolve_tokenizer(ck, spec: str | None) -> TokenizerInfo | None:
    """None (no tokenizer wanted), or the checked tokenizer for `spec` ("auto" or a path)."""
    if spec is None:
        return None
    manifest_path, recorded = _manifest(ck)
    if spec == "auto":
        if not recorded or not recorded.get("path"):
            raise CheckpointError(f"--tokenizer auto: cannot read the tokenizer from the training data's manifest "
                                  f"({manifest_path or 'config.yaml names no data.dir'}); pass --tokenizer PATH")
        path = Path(recorded["path"])
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer named in {manifest_path} not found; pass --tokenizer PATH")
    else:
        path = Path(spec)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such tokenizer file")
    from amp_common.checksum import file_sha256

    if recorded and recorded.get("sha256") and file_sha256(path) != recorded["sha256"]:
        raise CheckpointError(f"{path}: not the tokenizer the training data was prepared with (sha256 differs "
                              f"from {manifest_path}: {recorded.get('path')})")
    from data.tokenizer import is_hf_tokenizer

    if is_hf_tokenizer(path):
        return _hf_tokenizer(ck, path, recorded)
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from None
    vocab = sp.vocab_size()
    if vocab > ck.model_config.padded_vocab_size:
        raise CheckpointError(f"{path}: {vocab} pieces, but the model's embedding has "
                              f"{ck.model_config.padded_vocab_size} rows")
    ids = {k: int(getattr(sp, f"{k}_id")()) for k in ("bos", "eos", "unk")}
    if min(ids.values()) < 0:
        raise CheckpointError(f"{path}: tokenizer lacks a bos/eos/unk piece ({ids})")
    return TokenizerInfo(path=path, vocab_size=vocab, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"],
                         bos=sp.id_to_piece(ids["bos"]), eos=sp.id_to_piece(ids["eos"]), unk=sp.id_to_piece(ids["unk"]))


def _hf_tokenizer(ck, path: Path, recorded: dict | None) -> TokenizerInfo:
    """A tokenizer.json: BOS/EOS as recorded in the manifest (what the data was made with), else as
    data.prepare would choose them (tokenizer_config.json beside it, the post-processor template)."""
    from data.errors import DataError
    from data.hf_tokenizer import HFTokenizer

    ids = {k: (recorded or {}).get(f"{k}_id") for k in ("bos", "eos")}
    try:
        if all(isinstance(v, int) for v in ids.values()):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            vocab = tok.get_vocab_size(with_added_tokens=True)
            names = {k: tok.id_to_token(v) for k, v in ids.items()}
        else:
            hf = HFTokenizer(path)
            vocab, ids, names = hf.vocab_size, {"bos": hf.bos_id, "eos": hf.eos_id}, {"bos": hf.bos_token,
                                                                                     "eos": hf.eos_token}
    except DataError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # tokenizers' own exception type
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({' '.join(str(e).split())[:200]})") from None
    if None in names.values():
        raise CheckpointError(f"{path}: the bos/eos ids recorded in the data manifest ({ids}) are not in it")
    if vocab > ck.model_config.padded_vocab_size:
        raise CheckpointError(f"{path}: {vocab} tokens, but the model's embedding has "
                              f"{ck.model_config.padded_vocab_size} rows")
    return TokenizerInfo(path=path, vocab_size=vocab, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=None,
                         bos=names["bos"], eos=names["eos"], unk=None)


def write_tokenizer_files(out_dir: Path, tok: TokenizerInfo, max_length: int) -> None:
    """tokenizer.model or tokenizer.json + tokenizer_config.json (read by litgpt's Tokenizer and transformers'
    LlamaTokenizer / PreTrainedTokenizerFast)."""
    from data.tokenizer import is_hf_tokenizer

    if is_hf_tokenizer(tok.path):
        shutil.copyfile(tok.path, out_dir / "tokenizer.json")
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos, "eos_token": tok.eos,
            "model_max_length": max_length,
        }, indent=2) + "\n")
        return
    shutil.copyfile(tok.path, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": tok.bos, "eos_token": tok.eos, "unk_token": tok.unk,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": max_length, "legacy": False,
    }, indent=2) + "\n")


def hf_token_ids(tok: TokenizerInfo) -> dict[str, int]:
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
