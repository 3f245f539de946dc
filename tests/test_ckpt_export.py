"""amp-ckpt export: litgpt (GPT loads it, identical logits) and Hugging Face Llama (transformers'
LlamaForCausalLM gives the same logits as litgpt's GPT, fp32, <= 1e-4), single file and sharded."""
from __future__ import annotations

import json

import pytest
import torch

from checkpoints_util.__main__ import main
from helpers.checkpoints import model_config, random_model, save_checkpoint_of, tokens, trained_optimizer

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return random_model(seed=11)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory, model):
    return save_checkpoint_of(tmp_path_factory.mktemp("exp") / "run", 3, model,
                              trained_optimizer(random_model(seed=11), 1), 3072)


def gpt_logits(model, x):
    with torch.no_grad():
        return model(x)


def hf_logits(out_dir, x):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out_dir).eval()  # fp32: the export's dtype and transformers' default
    assert hf.dtype == torch.float32
    with torch.no_grad():
        return hf(x).logits


def test_export_litgpt_round_trip(plain_ckpt, model, tmp_path):
    from litgpt import Config
    from litgpt.model import GPT

    out = tmp_path / "lit"
    assert main(["export", str(plain_ckpt), "--format", "litgpt", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lit_model.pth", "model_config.yaml"]
    cfg = Config.from_file(out / "model_config.yaml")
    assert cfg == model_config()
    gpt = GPT(cfg)
    gpt.load_state_dict(torch.load(out / "lit_model.pth", weights_only=True), strict=True)
    x = tokens()
    assert torch.equal(gpt_logits(gpt.eval(), x), gpt_logits(model, x))


@pytest.mark.parametrize("shard", [None, "300KB"])
def test_export_hf_logits_match_litgpt(shard, plain_ckpt, model, tmp_path):
    out = tmp_path / "hf"
    args = ["export", str(plain_ckpt), "--format", "hf", "--out", str(out), "--quiet"]
    if shard:
        args += ["--max-shard-size", shard]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    c = model_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["max_position_embeddings"]) == (
        c.n_embd, c.intermediate_size, c.n_head, c.n_query_groups, c.padded_vocab_size, c.block_size)
    assert cfg["rms_norm_eps"] == c.norm_eps and cfg["rope_theta"] == c.rope_base and cfg["torch_dtype"] == "float32"
    files = sorted(p.name for p in out.iterdir())
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards == [f for f in files if f.endswith(".safetensors")]
        # a shard exceeds the limit only when one tensor alone does (the 1 MB embedding, lm_head)
        for s in shards:
            held = [n for n, f in index["weight_map"].items() if f == s]
            assert (out / s).stat().st_size <= 300_000 + 8192 or len(held) == 1, (s, held)
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    else:
        assert files == ["config.json", "model.safetensors"]

    x = tokens(length=64)
    a, b = gpt_logits(model, x), hf_logits(out, x)
    diff = (a - b).abs().max().item()
    print(f"max |litgpt - hf| logits: {diff:.3g} (max |logit| {a.abs().max().item():.3g})")
    assert diff <= TOL, diff
    assert a.abs().max().item() > 1.0  # not a comparison of near-zero logits


def test_hf_check_detects_a_rope_permutation(plain_ckpt, model, tmp_path):
    """Negative control: HF's Meta->HF q/k row permutation applied where none is needed must be caught."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "hf"
    assert main(["export", str(plain_ckpt), "--format", "hf", "--out", str(out), "--quiet"]) == 0
    sd = load_file(out / "model.safetensors")
    c = model_config()

    def permute(w, n_heads):  # what convert_llama_weights_to_hf.py does to Meta's interleaved rows
        return w.view(n_heads, c.head_size // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    for i in range(c.n_layer):
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        sd[q] = permute(sd[q], c.n_head)
        sd[k] = permute(sd[k], c.n_query_groups)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    x = tokens(length=64)
    diff = (gpt_logits(model, x) - hf_logits(out, x)).abs().max().item()
    print(f"max |litgpt - hf| logits with a wrong q/k permutation: {diff:.3g}")
    assert diff > 100 * TOL


def test_export_hf_bfloat16(plain_ckpt, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf16"
    assert main(["export", str(plain_ckpt), "--format", "hf", "--out", str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    sd = load_file(out / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_size < sum(t.numel() for t in sd.values()) * 2 + 65536
