"""tokenizer.json tokenizers: BOS/EOS from options, tokenizer_config.json or the template (else one line),
tokens equal an independent tokenisation, a vocabulary over 65,536 ids in int32 shards read back by the
loader and trained on by `pretrain` end to end, and `amp-ckpt export --tokenizer auto` shipping the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amp_common.checksum import file_sha256
from data.errors import DataError
from data.hf_tokenizer import HFTokenizer
from data.prepare import main, prepare_split
from data.shards import read_header
from helpers.corpus import (
    c4_lines,
    hf_reference_stream,
    make_texts,
    split_tokens,
    train_bpe_json,
    write_gz,
    write_parquet,
)

TEXTS = make_texts(60, seed=41)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 400-piece byte-level BPE with a ``<s> $A </s>`` template."""
    return train_bpe_json(tmp_path_factory.mktemp("bpe") / "tokenizer.json", TEXTS)


def test_tokens_equal_independent_tokenisation(tmp_path, bpe):
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", TEXTS[:25])
    write_gz(src / "b.json.gz", c4_lines(TEXTS[25:]))
    out = tmp_path / "out"
    assert main(["--out", str(out), "--tokenizer", str(bpe), "--train", str(src), "--workers", "2",
                 "--shard-tokens", "700", "--no-progress"]) == 0
    assert np.array_equal(split_tokens(out / "train"), hf_reference_stream(bpe, TEXTS, 0, 1))
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["tokenizer"] == {"path": str(bpe), "sha256": file_sha256(bpe), "vocab_size": 400, "bos_id": 0,
                              "eos_id": 1}
    assert m["dtype"] == "uint16" and m["options"]["bos_id"] == 0 and m["options"]["eos_id"] == 1


def test_bos_eos_sources_in_order(tmp_path, bpe):
    """--bos/--eos > tokenizer_config.json beside the file > the post-processor template."""
    d = tmp_path / "t"
    d.mkdir()
    path = d / "tokenizer.json"
    path.write_bytes(bpe.read_bytes())
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # the template
    names = {i: tok.tok.id_to_token(i) for i in (300, 301)}  # two learned pieces
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": names[300]},
                                                         "eos_token": names[301]}))
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (300, 301)
    tok = HFTokenizer(path, bos="</s>", eos="<s>")
    assert (tok.bos_id, tok.eos_id) == (1, 0)
    text = "Darcy wrote a letter"
    assert tok.encode_stream([text]).tolist() == [1, *tok.tok.encode(text, add_special_tokens=False).ids, 0]


def _run(tmp_path, capsys, *args) -> tuple[int, str]:
    src = write_gz(tmp_path / "a.json.gz", c4_lines(TEXTS[:3]))
    code = main(["--out", str(tmp_path / "out"), "--train", str(src), "--no-progress", *args])
    return code, capsys.readouterr().err.strip()


def test_tokenizer_json_without_bos_eos_is_one_line(tmp_path, capsys):
    path = train_bpe_json(tmp_path / "tokenizer.json", TEXTS, template=False)
    code, err = _run(tmp_path, capsys, "--tokenizer", str(path))
    assert code == 2 and err == (f"error: {path}: no BOS or EOS token found (neither tokenizer_config.json beside it "
                                 "nor the post-processor template names one); name them with --bos TOKEN --eos TOKEN")
    assert not (tmp_path / "out").exists()
    assert main(["--out", str(tmp_path / "out"), "--train", str(tmp_path / "a.json.gz"), "--no-progress",
                 "--tokenizer", str(path), "--bos", "<s>", "--eos", "</s>"]) == 0


@pytest.mark.parametrize("case", ["unknown_token", "not_json", "bos_with_sentencepiece", "bad_config"])
def test_bad_tokenizer_json_is_one_line(tmp_path, capsys, bpe, case):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    path.write_bytes(bpe.read_bytes())
    args = ["--tokenizer", str(path)]
    if case == "unknown_token":
        args += ["--eos", "<|eot|>"]
        expect = f"{path}: EOS token '<|eot|>' (from --eos) is not in the vocabulary"
    elif case == "not_json":
        path.write_text('{"version": "1.0", "model": ')
        expect = f"{path}: not a valid tokenizer.json ("
    elif case == "bos_with_sentencepiece":
        args = ["--bos", "<s>"]
        expect = "--bos/--eos with "
    else:
        (path.parent / "tokenizer_config.json").write_text("{broken")
        expect = f"{path.parent / 'tokenizer_config.json'}: cannot read ("
    code, err = _run(tmp_path, capsys, *args)
    assert code == 2 and err.startswith(f"error: {expect}") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_bos_eos_named_do_not_read_a_broken_tokenizer_config(tmp_path, bpe):
    """The refusal of a broken tokenizer_config.json says 'or name the tokens with --bos/--eos': doing so works."""
    path = tmp_path / "tokenizer.json"
    path.write_bytes(bpe.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(DataError, match="name the tokens with --bos/--eos"):
        HFTokenizer(path)
    tok = HFTokenizer(path, bos="<s>", eos="</s>")
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A tokenizer.json of 70,000 ids whose BOS/EOS are ids above 65,535 (so shards must be 32-bit)."""
    d = tmp_path_factory.mktemp("big")
    path = train_bpe_json(d / "tokenizer.json", TEXTS, vocab_size=400, extra_tokens=70_000 - 400)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<extra_69598>", "eos_token": "<extra_69599>"}))
    return path


def test_vocabulary_over_65536_ids_writes_int32_shards(tmp_path, big_vocab):
    tok = HFTokenizer(big_vocab)
    assert tok.vocab_size == 70_000 and (tok.bos_id, tok.eos_id) == (69_998, 69_999)
    out = tmp_path / "out"
    src = write_parquet(tmp_path / "a.parquet", TEXTS)
    m = prepare_split("train", [src], big_vocab, out, shard_tokens=900, progress=False)
    assert m["dtype"] == "int32"
    assert all(read_header(out / "train" / s["file"])[0] == np.dtype("<i4") for s in m["shards"])
    assert np.array_equal(split_tokens(out / "train"), hf_reference_stream(big_vocab, TEXTS, 69_998, 69_999))
    from data.loader import build_loader

    loader = build_loader(out, "train", seq_len=16, batch_size=2, shuffle=False, tokenizer=big_vocab)
    assert loader.vocab_size == 70_000
    assert int(next(iter(loader))[0, 0]) == 69_998  # the first window starts with BOS, beyond uint16


def test_pretrain_end_to_end_with_a_32_bit_vocabulary_and_export(tmp_path, big_vocab):
    """The debug model with a 70,000-row embedding trains on int32 shards (loss falls, finite), and
    `amp-ckpt export --tokenizer auto` ships the tokenizer.json with the BOS/EOS the data was made with."""
    from checkpoints_util.__main__ import main as ckpt_main
    from helpers.runs import logged_losses, tiny_config
    from pretrain.loop import fit

    data = tmp_path / "data"
    texts = make_texts(200, seed=42)
    prepare_split("train", [write_parquet(tmp_path / "train.parquet", texts[:180])], big_vocab, data, progress=False)
    prepare_split("val", [write_parquet(tmp_path / "val.parquet", texts[180:])], big_vocab, data, progress=False)
    run = tmp_path / "run"
    fit(tiny_config(data, run, model__overrides={"vocab_size": 70_000}, train__max_steps=3,
                    checkpoint__interval=3, eval__interval=3))
    losses = logged_losses(run)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    assert losses[1] > 10.5  # ~ln(70,000) = 11.16 at the start: the full 70,000-way softmax is used

    out = tmp_path / "hf"
    assert ckpt_main(["export", str(run / "step-00000003"), "--format", "hf", "--out", str(out), "--tokenizer",
                      "auto", "--quiet"]) == 0
    assert (out / "tokenizer.json").read_bytes() == big_vocab.read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (69_998, 69_999, 70_000)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<extra_69598>", "<extra_69599>")


def test_hf_tokenizer_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        HFTokenizer(tmp_path / "nope.json")
