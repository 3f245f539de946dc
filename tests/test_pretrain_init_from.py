"""`--init.from`: a run that starts from imported weights (pretrain/init_from.py, checkpoints_util/importer.py).

The debug model is trained a few steps, exported to Hugging Face, imported back, and a new run starts from it:
its first step's loss must equal the loss of the exported model on the same batch computed independently by
transformers' `LlamaForCausalLM` (<= 1e-5 relative), on one device, under fsdp x 2 (and fsdp2 x 2, extended);
the same from a litgpt `lit_model.pth`. Existing checkpoints in out_dir win over init.from; trainer.json records
the source; a model section or a tokenizer that disagrees with the weights is one line.
"""
from __future__ import annotations

import json

import pytest
import torch

from amp_common.checksum import file_sha256
from checkpoints_util.__main__ import main as ckpt
from helpers.checkpoints import checkpoint_tensors
from helpers.runs import cli_args, logged_losses, run_pretrain, tiny_config
from pretrain.loop import fit

RTOL = 1e-5


@pytest.fixture(scope="module")
def weights(data_dir, tmp_path_factory):
    """A 2-step debug run exported to Hugging Face (with its tokenizer) and to litgpt, and both imported."""
    root = tmp_path_factory.mktemp("init_from")
    fit(tiny_config(data_dir, root / "trained", train__max_steps=2, checkpoint__interval=2, eval__interval=0))
    step = root / "trained" / "step-00000002"
    assert ckpt(["export", str(step), "--format", "hf", "--out", str(root / "hf"), "--tokenizer", "auto",
                 "--quiet"]) == 0
    assert ckpt(["export", str(step), "--format", "litgpt", "--out", str(root / "lit"), "--quiet"]) == 0
    for src in ("hf", "lit"):
        assert ckpt(["import", str(root / src), "--out", str(root / f"imported-{src}"), "--quiet"]) == 0
    assert ckpt(["import", str(root / "hf"), "--out", str(root / "imported-bf16"), "--dtype", "bfloat16",
                 "--quiet"]) == 0
    return root


def run_config(data_dir, out_dir, source, **extra):
    values = dict(init__from=str(source), train__max_steps=1, eval__interval=0, checkpoint__interval=1)
    return tiny_config(data_dir, out_dir, **{**values, **extra})


def reference_loss(data_dir, cfg, hf_dir, bf16: bool = False) -> float:
    """transformers' loss of the exported model (`bf16`: its weights rounded to bfloat16) on the run's first global
    batch (the same on every world size)."""
    from transformers import LlamaForCausalLM

    from pretrain.batches import BatchStream

    stream = BatchStream(cfg, 0, 1, 4096)
    rows = cfg.train.global_batch_tokens // cfg.data.seq_len
    batch = torch.cat([stream.next() for _ in range(rows // cfg.train.micro_batch_size)])
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        for p in hf.parameters() if bf16 else []:
            p.copy_(p.to(torch.bfloat16).float())
        logits = hf(batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


def assert_first_loss(loss: float, ref: float) -> None:
    print(f"first step loss {loss:.7f}, transformers {ref:.7f}")
    assert abs(loss - ref) <= RTOL * abs(ref), (loss, ref)


def assert_records_source(out_dir, imported) -> None:
    trainer = json.loads((out_dir / "step-00000001" / "trainer.json").read_text())
    assert trainer["init_from"]["path"] == str(imported.resolve())
    assert trainer["init_from"]["sha256"] == file_sha256(imported / "trainer.json")


SOURCES = {"hf": "imported-hf", "lit": "imported-lit", "step": "trained/step-00000002", "run": "trained",
           "bf16": "imported-bf16"}


@pytest.mark.parametrize("src", list(SOURCES))
def test_first_step_loss_equals_transformers_one_device(src, data_dir, weights, tmp_path, capsys):
    """From an import of the HF or litgpt export (also one stored in bf16: loaded into the run's fp32 weights), or
    from the trained checkpoint itself (a step folder, or its run folder: the newest step): the weights only; the
    first step sees the run's first batch (data position 0)."""
    out = tmp_path / "run"
    cfg = run_config(data_dir, out, weights / SOURCES[src])
    result = fit(cfg)
    assert list(result.losses) == [1]
    assert_first_loss(result.losses[1], reference_loss(data_dir, cfg, weights / "hf", bf16=src == "bf16"))
    assert_records_source(out, weights / "trained" / "step-00000002" if src == "run" else weights / SOURCES[src])
    saved = checkpoint_tensors(out / "step-00000001")
    steps = {k: v.item() for k, v in saved.items() if k.startswith("optimizer.step.")}
    assert steps and set(steps.values()) == {1.0}  # a fresh optimizer (the trained checkpoint's had taken 2 steps)
    assert "initial weights from" in capsys.readouterr().out


def test_checkpoints_in_out_dir_win_over_init_from(data_dir, weights, tmp_path, capsys):
    """A requeued run continues from its checkpoints, never from PATH, even once PATH is gone."""
    import shutil

    out, source = tmp_path / "run", tmp_path / "imported"
    shutil.copytree(weights / "imported-hf", source)
    fit(run_config(data_dir, out, source))
    first = logged_losses(out)
    sha = file_sha256(source / "trainer.json")
    capsys.readouterr()
    result = fit(run_config(data_dir, out, source, train__max_steps=2))
    said = capsys.readouterr().out
    assert "not used" in said and "resumed from step-00000001" in said, said
    assert list(result.losses) == [2] and logged_losses(out)[1] == first[1]
    shutil.rmtree(source)
    result = fit(run_config(data_dir, out, source, train__max_steps=3))
    assert list(result.losses) == [3]
    for step in (2, 3):
        trainer = json.loads((out / f"step-{step:08d}" / "trainer.json").read_text())
        assert trainer["init_from"] == {"path": str(source.resolve()), "sha256": sha, "step": 0,
                                        "source": str((weights / "hf").resolve())}


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("fsdp2", marks=pytest.mark.extended),
                                      pytest.param("ddp", marks=pytest.mark.extended)])
def test_first_step_loss_equals_transformers_two_ranks(strategy, data_dir, weights, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(data_dir, out, weights / "imported-hf", system__strategy=strategy, system__devices=2)
    code, text = run_pretrain(cli_args(cfg))
    assert code == 0, text
    assert f"{strategy} x 2 cpu" in text and "initial weights from" in text
    assert_first_loss(logged_losses(out)[1], reference_loss(data_dir, cfg, weights / "hf"))
    assert_records_source(out, weights / "imported-hf")


# ------------------------------------------------------------------------------------------ bad inputs
def test_model_section_that_disagrees_is_one_line(data_dir, weights, tmp_path):
    from pretrain.config import ConfigError

    narrower = {"name": "debug", "overrides": {"intermediate_size": 20}}
    for model, diff in (({"name": "llama2-7b"}, r"block_size \(128 vs 4096\)"),
                        (narrower, r"intermediate_size \(176 vs 20\)")):
        with pytest.raises(ConfigError, match=rf"^init.from=.*differs from model.name=.* in .*{diff}.*leave "
                                              r"model.name and model.overrides unset"):
            fit(tiny_config(data_dir, tmp_path / "run", init__from=str(weights / "imported-hf"), model=model))
    assert not (tmp_path / "run").exists()


def test_vocabulary_that_does_not_fit_the_data_is_one_line(data_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from data.errors import DataError

    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "hf")
    assert ckpt(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp"), "--quiet"]) == 0
    cfg = run_config(data_dir, tmp_path / "run", tmp_path / "imp", model={"name": "tiny"})  # default: not compared
    with pytest.raises(DataError, match="4,096-piece tokenizer .* but the model has 1,000 embeddings"):
        fit(cfg)


def test_tokenizer_other_than_the_datas_is_one_line(data_dir, weights, tmp_path):
    import shutil

    from pretrain.config import ConfigError

    shutil.copytree(weights / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"another tokenizer")
    assert ckpt(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp"), "--quiet"]) == 0
    with pytest.raises(ConfigError, match=r"was tokenised with another tokenizer .* than the one that comes with "
                                          r"init.from \(.*tokenizer.model\): prepare the data with it"):
        fit(run_config(data_dir, tmp_path / "run", tmp_path / "imp"))
