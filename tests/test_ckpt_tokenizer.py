"""amp-ckpt export --tokenizer: the training data's tokenizer travels with the weights (auto from the data
manifest, or a path checked against it), and transformers / litgpt tokenise exactly as SentencePiece does."""
from __future__ import annotations

import json

import pytest

from checkpoints_util.__main__ import main
from helpers.checkpoints import random_model, save_checkpoint_of, trained_optimizer
from helpers.data import TOKENIZER

TEXT = "Elizabeth walked to Pemberley in 1811, café naïve.\n\nA second paragraph."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_dir):
    return save_checkpoint_of(tmp_path_factory.mktemp("tok") / "run", 2, *_model_and_opt(), 2048, data_dir=data_dir)


def _model_and_opt():
    model = random_model()
    return model, trained_optimizer(model, 1)


def sp_ids(text):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    return [sp.bos_id(), *sp.encode(text)]


def test_hf_export_with_tokenizer_auto(ckpt, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", "auto", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.model", "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TEXT)["input_ids"] == sp_ids(TEXT)
    assert tok.eos_token_id == 2


def test_litgpt_export_with_tokenizer_path(ckpt, tmp_path):
    from litgpt.tokenizer import Tokenizer

    out = tmp_path / "lit"
    assert main(["export", str(ckpt), "--format", "litgpt", "--out", str(out), "--tokenizer", str(TOKENIZER),
                 "--quiet"]) == 0
    tok = Tokenizer(out)
    assert tok.encode(TEXT, bos=True).tolist() == sp_ids(TEXT)


def test_wrong_tokenizer_is_refused(ckpt, tmp_path, capsys):
    wrong = tmp_path / "other.model"
    wrong.write_bytes(TOKENIZER.read_bytes() + b"\x00")
    code = main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"), "--tokenizer", str(wrong)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {wrong}: not the tokenizer the training data was prepared with"), err
    assert not (tmp_path / "hf").exists()


def test_tokenizer_auto_without_manifest(tmp_path, capsys):
    ck = save_checkpoint_of(tmp_path / "run", 1, *_model_and_opt(), 1024, data_dir=tmp_path / "no-data")
    code = main(["export", str(ck), "--format", "hf", "--out", str(tmp_path / "hf"), "--tokenizer", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--tokenizer auto: cannot read the tokenizer from the training data's manifest" in err, err
    assert not (tmp_path / "hf").exists()
