"""amp-ckpt import: Hugging Face Llama and litgpt weights -> a model-only checkpoint folder.

- round trip: import(export(x)) equals x bitwise (tensors and model config), from one safetensors file, from
  shards with an index, from a litgpt lit_model.pth (also wrapped as {"model": ...}), in bf16 as stored;
- weights written by transformers itself (safetensors, sharded, pytorch_model.bin): litgpt's GPT on the
  imported weights gives transformers' logits (fp32, <= 1e-4);
- bad inputs: one line naming the file, exit 2, nothing written.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints_util.__main__ import main
from helpers.checkpoints import checkpoint_tensors, random_model, save_checkpoint_of, trained_optimizer

TOL = 1e-4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A debug checkpoint of large random weights and its exports (hf, hf in 300 KB shards, bf16 hf, litgpt)."""
    root = tmp_path_factory.mktemp("import")
    ck = save_checkpoint_of(root / "run", 3, random_model(seed=5), trained_optimizer(random_model(seed=5), 1), 3072)
    for name, extra in (("hf", []), ("hf-sharded", ["--max-shard-size", "300KB"]),
                        ("hf-bf16", ["--dtype", "bfloat16"])):
        assert main(["export", str(ck), "--format", "hf", "--out", str(root / name), "--quiet", *extra]) == 0
    assert main(["export", str(ck), "--format", "litgpt", "--out", str(root / "lit"), "--quiet"]) == 0
    return root, ck


def imported(src, out, *extra) -> dict[str, torch.Tensor]:
    assert main(["import", str(src), "--out", str(out), "--quiet", *extra]) == 0
    return {k: v for k, v in checkpoint_tensors(out).items()}


def model_tensors(ck) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint_tensors(ck).items() if k.startswith("model.")}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["hf", "hf-sharded", "lit"])
def test_import_of_export_is_identity(name, source, tmp_path):
    from checkpoints_util.reader import open_checkpoint

    root, ck = source
    if name == "hf-sharded":
        assert len(list((root / name).glob("model-*-of-*.safetensors"))) > 2
    assert_equal(imported(root / name, tmp_path / "imp"), model_tensors(ck))
    back = open_checkpoint(tmp_path / "imp")
    assert back.model_config == open_checkpoint(ck).model_config
    assert back.verify() is None and back.trainer["step"] == 0 and back.trainer["source"]["format"] == (
        "litgpt" if name == "lit" else "hf")
    assert set(back.trainer["source"]["files"]) >= {"config.json" if name != "lit" else "model_config.yaml"}


def test_import_keeps_the_stored_dtype_or_casts(source, tmp_path):
    root, ck = source
    bf16 = imported(root / "hf-bf16", tmp_path / "a")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert_equal(bf16, {k: v.to(torch.bfloat16) for k, v in model_tensors(ck).items()})
    f32 = imported(root / "hf-bf16", tmp_path / "b", "--dtype", "float32")
    assert_equal(f32, {k: v.to(torch.bfloat16).float() for k, v in model_tensors(ck).items()})


def test_litgpt_training_checkpoint_wrapper(source, tmp_path):
    root, ck = source
    lit = tmp_path / "lit"
    shutil.copytree(root / "lit", lit)
    torch.save({"model": torch.load(lit / "lit_model.pth", weights_only=True), "iter_num": 7}, lit / "lit_model.pth")
    assert_equal(imported(lit, tmp_path / "imp"), model_tensors(ck))


def test_litgpt_folder_with_a_hugging_face_config(source, tmp_path):
    """litgpt's checkpoint folders keep the model's config.json beside lit_model.pth (no HF weights)."""
    from checkpoints_util.reader import open_checkpoint

    root, ck = source
    lit = tmp_path / "lit"
    shutil.copytree(root / "lit", lit)
    shutil.copyfile(root / "hf" / "config.json", lit / "config.json")
    assert_equal(imported(lit, tmp_path / "imp"), model_tensors(ck))
    assert open_checkpoint(tmp_path / "imp").trainer["source"]["format"] == "litgpt"


# ------------------------------------------------------------------------- weights written by transformers
def hf_model(seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, **config)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # large weights: attention is peaked, so a q/k mix-up moves the logits by O(1)
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.3 * torch.randn_like(p))
    return model


def litgpt_logits(folder, x):
    from litgpt.model import GPT

    from checkpoints_util.reader import open_checkpoint

    ck = open_checkpoint(folder)
    ck.validate()
    gpt = GPT(ck.model_config)
    gpt.load_state_dict(dict(ck.iter_model_tensors()), strict=True)
    with torch.no_grad():
        return gpt.eval()(x)


@pytest.mark.parametrize("save", ["safetensors", "sharded", "bin"])
def test_transformers_weights_give_transformers_logits(save, tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path / "hf", **({"max_shard_size": "100KB"} if save == "sharded" else {}))
    if save == "sharded":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    if save == "bin":  # what older transformers wrote (and still read): torch.save of the state dict
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp"), "--quiet"]) == 0
    x = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
    got = litgpt_logits(tmp_path / "imp", x)
    diff = (want - got).abs().max().item()
    print(f"max |transformers - litgpt on imported weights| logits: {diff:.3g} (max |logit| {want.abs().max():.3g})")
    assert diff <= TOL and want.abs().max().item() > 1.0


# ------------------------------------------------------------------------------------------ bad inputs
def one_line_error(capsys, args, needle: str) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err
    return err


def hf_copy(source, tmp_path, name: str = "hf-sharded"):
    root, _ = source
    dst = tmp_path / "src"
    shutil.copytree(root / name, dst)
    return dst


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _config(change):
    return lambda src: edit_json(src / "config.json", change)


def _index(change):
    return lambda src: edit_json(src / "model.safetensors.index.json", change)


def _shape(src) -> None:
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(sd, f)


def _tensor(change):
    def edit(src) -> None:
        from safetensors.torch import load_file, save_file

        f = src / "model.safetensors"
        sd = load_file(f)
        change(sd)
        save_file(sd, f)
    return edit


def _nan(sd) -> None:
    sd["model.norm.weight"][3] = float("nan")


def _escape(src) -> None:
    """The index names a valid shard outside the source folder."""
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"]["lm_head.weight"]
    (src / shard).rename(src.parent / "outside.safetensors")
    data["weight_map"] = {k: ("../outside.safetensors" if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def _bin_with_code(src) -> None:
    import pickle

    (src / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": Evil()}, f)


BAD = [
    ("missing-shard", "hf-sharded", lambda s: sorted(s.glob("model-*.safetensors"))[1].unlink(),
     "which is missing from"),
    ("index-escapes-folder", "hf-sharded", _escape, "'../outside.safetensors' is not the name of a .safetensors file"),
    ("index-lies", "hf-sharded", _index(lambda d: d["weight_map"].update(  # embed_tokens is alone in its shard
        {"lm_head.weight": d["weight_map"]["model.embed_tokens.weight"]})), "that file does not hold it"),
    ("index-not-json", "hf-sharded", lambda s: (s / "model.safetensors.index.json").write_text("{oops"),
     "not valid JSON"),
    ("wrong-shape", "hf", _shape, "has shape [175, 64] but"),
    ("missing-tensor", "hf", _tensor(lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight")),
     "model.layers.1.self_attn.k_proj.weight"),
    ("extra-tensor", "hf", _tensor(lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})),
     "does not belong"),
    ("int-tensor", "hf", _tensor(lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
     "dtype I32"),
    ("nan", "hf", _tensor(_nan), "NaN"),
    ("truncated", "hf", lambda s: (s / "model.safetensors").write_bytes((s / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors"),
    ("not-llama", "hf", _config(lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral")),
     "only LlamaForCausalLM"),
    ("rope-scaling", "hf", _config(lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0})),
     "rope_scaling"),
    ("tied", "hf", _config(lambda c: c.update(tie_word_embeddings=True)), "tie_word_embeddings"),
    ("size-not-int", "hf", _config(lambda c: c.update(hidden_size="64")), "hidden_size must be an integer"),
    ("huge-layers", "hf", _config(lambda c: c.update(num_hidden_layers=10**9)), "num_hidden_layers"),
    ("config-not-json", "hf", lambda s: (s / "config.json").write_text("not json"), "config.json: not valid JSON"),
    ("no-weights", "hf", lambda s: (s / "model.safetensors").unlink(), "no weights"),
    ("pickled-code", "hf", _bin_with_code, "refused"),
    ("lit-not-llama", "lit", lambda s: (s / "model_config.yaml").write_text(
        (s / "model_config.yaml").read_text().replace("parallel_residual: false", "parallel_residual: true")),
     "not a plain Llama"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_source_is_one_line(case, source, tmp_path, capsys):
    _, name, damage, needle = case
    src = hf_copy(source, tmp_path, name)
    damage(src)
    out = tmp_path / "out"
    one_line_error(capsys, ["import", str(src), "--out", str(out), "--quiet"], needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) in (["src"], ["outside.safetensors", "src"])


def test_not_a_folder_and_existing_out(source, tmp_path, capsys):
    root, _ = source
    one_line_error(capsys, ["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "no such folder")
    one_line_error(capsys, ["import", str(tmp_path), "--out", str(tmp_path / "o")], "neither config.json")
    (tmp_path / "o").mkdir()
    one_line_error(capsys, ["import", str(root / "hf"), "--out", str(tmp_path / "o")], "already exists")


# the config.json files as published (values of TinyLlama-1.1B-intermediate-step-1431k-3T and Llama-2-7b-hf)
PUBLISHED = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, max_position_embeddings=2048,
                           num_attention_heads=32, num_hidden_layers=22, num_key_value_heads=4, rms_norm_eps=1e-05,
                           rope_theta=10000.0, torch_dtype="float32"),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, max_position_embeddings=4096, num_attention_heads=32,
                      num_hidden_layers=32, num_key_value_heads=32, rms_norm_eps=1e-05, pretraining_tp=1,
                      torch_dtype="float16"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_are_the_named_models(name):
    """What README promises: the recipes' model.name agrees with the imported TinyLlama / Llama-2 7B."""
    import dataclasses

    import models
    from checkpoints_util.hf_llama import litgpt_config

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 32000,
          "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          **PUBLISHED[name]}
    config = litgpt_config(hf, "config.json")
    assert config.name == name
    assert dataclasses.asdict(config) == dataclasses.asdict(models.get_config(name))


def test_inspect_of_an_import_says_what_it_is(source, tmp_path, capsys):
    """amp-ckpt inspect on an imported folder names its source and says it holds weights only (it printed
    'optimizer unknown' and '(no config.yaml)' beside the folder's config.yaml)."""
    root, _ = source
    imported(root / "hf", tmp_path / "imp")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "imp")]) == 0
    out = capsys.readouterr().out
    assert f"imported     {(root / 'hf').resolve()} (hf)" in out
    assert "optimizer    none (weights only)" in out and "(none: weights only)" in out
    assert "unknown" not in out and "no config.yaml" not in out
    assert main(["inspect", "--json", str(tmp_path / "imp")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"]["format"] == "hf" and report["optimizer"] == {"kind": None, "state_bytes": None}
