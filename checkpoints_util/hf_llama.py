"""litgpt Llama <-> Hugging Face `LlamaForCausalLM`: the config and the tensor names (pure, no I/O).

Why it is its own module: this mapping is where an export goes silently wrong (a swapped q/k/v slice
gives a model that loads fine and produces garbage), so it is kept small and tested by comparing
logits of the two implementations (tests/test_ckpt_export.py, tests/test_ckpt_import.py). The import
direction (`from_hf_names`, `litgpt_config`) is derived from the export's `to_hf` and `hf_config`.

Facts it rests on (litgpt 0.5.13, read from `litgpt/model.py` and `litgpt/scripts/convert_*`):
- `attn.qkv.weight` rows are [all Q heads | all K groups | all V groups] (`CausalSelfAttention.forward`
  does `qkv.split((n_head*hs, n_query_groups*hs, n_query_groups*hs))`), so q/k/v_proj are row slices.
- litgpt's `apply_rope` rotates halves (`cat(-x2, x1)`), the same convention as HF Llama's
  `rotate_half`. HF's q/k row permutation exists to convert *Meta's* interleaved-pair checkpoints;
  between litgpt and HF no permutation is needed (litgpt's own converter applies none for Llama).
  The logits test would catch a wrong choice here.
- `mlp.fc_1` = gate_proj (the SiLU branch), `mlp.fc_2` = up_proj, `mlp.proj` = down_proj.
- RMSNorm: both compute in fp32, x * rsqrt(mean(x^2) + eps) * weight (no unit offset unless "Gemma").
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import torch

from checkpoints_util.layout import CheckpointError

_FIXED = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "norm_1.weight": "input_layernorm.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp.fc_1.weight": "mlp.gate_proj.weight",
    "mlp.fc_2.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def unsupported(config) -> list[str]:
    """Reasons this litgpt config is not a plain Llama that LlamaForCausalLM computes identically."""
    c = config
    checks = [
        (c.mlp_class_name == "LLaMAMLP", f"mlp_class_name={c.mlp_class_name!r} (need 'LLaMAMLP')"),
        (c.norm_class_name == "RMSNorm" and "Gemma" not in c.name, f"norm {c.norm_class_name!r} (need plain RMSNorm)"),
        (not c.bias and not c.attn_bias and not getattr(c, "lm_head_bias", False), "biases (Llama has none)"),
        (not c.parallel_residual and not c.shared_attention_norm, "parallel residual / shared attention norm"),
        (c.rotary_percentage == 1.0 and c.rope_condense_ratio == 1, "partial or condensed RoPE"),
        (c.rope_adjustments is None and not getattr(c, "rope_interleave", False), "RoPE scaling/interleave"),
        (not c.norm_qk and not c.post_attention_norm and not c.post_mlp_norm,
         "extra norms (qk/post-attention/post-MLP)"),
        (c.n_expert == 0, "mixture of experts"),
        (c.sliding_window_size is None, "sliding-window attention"),
        (c.attention_logit_softcapping is None and c.final_logit_softcapping is None, "logit soft-capping"),
        (c.attention_scores_scalar is None, "a custom attention scale"),
        (not c.scale_embeddings, "scaled embeddings"),
        (getattr(c, "latent_attention", None) is None, "latent attention"),
        (c.n_head % c.n_query_groups == 0, f"n_head={c.n_head} not a multiple of n_query_groups={c.n_query_groups}"),
    ]
    return [why for ok, why in checks if not ok]


def hf_config(config, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the equivalent `LlamaForCausalLM`."""
    problems = unsupported(config)
    if problems:
        raise CheckpointError(f"model {config.name!r} is not a plain Llama, cannot export to Hugging Face Llama: "
                              + "; ".join(problems))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_base),
        "rope_scaling": None,
        "vocab_size": config.padded_vocab_size,
        "max_position_embeddings": config.block_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def to_hf(name: str, tensor: torch.Tensor, config) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face tensor(s) for one litgpt tensor; q/k/v are split out of the fused `qkv`."""
    if name in _FIXED:
        yield _FIXED[name], tensor
        return
    m = _LAYER_RE.match(name)
    if m is None:
        raise CheckpointError(f"no Hugging Face Llama name for tensor {name!r}")
    i, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{i}."
    if rest == "attn.qkv.weight":
        hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
        q, k, v = tensor.split((nh * hs, ng * hs, ng * hs), dim=0)
        # clone: the slices share the fused tensor's storage, which safetensors refuses
        yield prefix + "self_attn.q_proj.weight", q.clone()
        yield prefix + "self_attn.k_proj.weight", k.clone()
        yield prefix + "self_attn.v_proj.weight", v.clone()
        return
    if rest not in _PER_LAYER:
        raise CheckpointError(f"no Hugging Face Llama name for tensor {name!r}")
    yield prefix + _PER_LAYER[rest], tensor


# ------------------------------------------------------------------------------------- Hugging Face -> litgpt
# The import direction is the inverse of `to_hf`, derived from it (one mapping, tested both ways), and of
# `hf_config`: a config.json this table cannot express in litgpt's Llama is refused, one reason per line part.
IGNORED_HF_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old .bin files: a buffer
_MAX_DIM = 1 << 20     # larger sizes are not a Llama but a crafted config (the meta model alone would take minutes)
_MAX_LAYERS = 1024


def from_hf_names(config) -> dict[str, tuple[str, int, int, tuple[int, ...]]]:
    """HF tensor name -> (litgpt name, part index, number of parts, HF shape) for `LlamaForCausalLM(config)`.

    Parts are fused in index order along dim 0 (q, k, v into `attn.qkv`); everything else is one part."""
    from checkpoints_util.reader import expected_shapes

    out = {}
    for name, shape in expected_shapes(config).items():
        parts = list(to_hf(name, torch.empty(shape, device="meta"), config))
        for i, (hf_name, t) in enumerate(parts):
            out[hf_name] = (name, i, len(parts), tuple(t.shape))
    return out


def litgpt_config(hf: Any, where: str):
    """The litgpt.Config of a Hugging Face `config.json` (parsed JSON) of a plain `LlamaForCausalLM`.

    Raises one CheckpointError naming `where` for anything else: another architecture, RoPE scaling, biases,
    tied embeddings, another activation, missing or ill-typed sizes."""
    from litgpt import Config

    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: not a Hugging Face config (expected a JSON object)")
    arch = hf.get("architectures")
    if arch is not None and arch != ["LlamaForCausalLM"]:
        raise CheckpointError(f"{where}: architectures {arch!r}: only LlamaForCausalLM can be imported")
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r}: only 'llama' (LlamaForCausalLM) can "
                              f"be imported")

    def size(key: str, default: Any = None, limit: int = _MAX_DIM) -> int:
        value = hf.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise CheckpointError(f"{where}: {key} must be an integer in [1, {limit}], got {value!r}")
        return value

    def number(key: str, default: float) -> float:
        value = hf.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise CheckpointError(f"{where}: {key} must be a positive number, got {value!r}")
        return value

    d, heads = size("hidden_size"), size("num_attention_heads")
    groups = size("num_key_value_heads", heads)
    head_dim = size("head_dim") if hf.get("head_dim") is not None or d % heads else d // heads
    rope = hf.get("rope_parameters")  # transformers >= 5 keeps rope_theta (and the scaling type) here
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{where}: rope_parameters {rope!r}: RoPE scaling cannot be imported (litgpt's "
                                  f"Llama here has plain RoPE)")
        if "rope_theta" in rope:
            hf = {**hf, "rope_theta": rope["rope_theta"]}
    problems = [why for bad, why in (
        (hf.get("rope_scaling") is not None, f"rope_scaling {hf.get('rope_scaling')!r} (only plain RoPE)"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} (only silu)"),
        (bool(hf.get("attention_bias", False)) or bool(hf.get("mlp_bias", False)), "biases (Llama has none)"),
        (bool(hf.get("tie_word_embeddings", False)), "tie_word_embeddings (litgpt's Llama has its own lm_head)"),
        (heads % groups != 0, f"num_attention_heads={heads} not a multiple of num_key_value_heads={groups}"),
    ) if bad]
    if problems:
        raise CheckpointError(f"{where}: cannot be imported as litgpt's Llama: " + "; ".join(problems))
    theta = number("rope_theta", 10000.0)
    vocab = size("vocab_size", limit=1 << 24)
    fields = dict(block_size=size("max_position_embeddings", limit=1 << 24), vocab_size=vocab, padded_vocab_size=vocab,
                  n_layer=size("num_hidden_layers", limit=_MAX_LAYERS), n_head=heads, n_query_groups=groups,
                  n_embd=d, head_size=head_dim, intermediate_size=size("intermediate_size"),
                  bias=False, norm_class_name="RMSNorm", norm_eps=number("rms_norm_eps", 1e-6),
                  mlp_class_name="LLaMAMLP", parallel_residual=False, rotary_percentage=1.0,
                  rope_base=int(theta) if float(theta).is_integer() else theta)
    return Config(name=_known_name(fields), **fields)


def _known_name(fields: dict[str, Any]) -> str:
    """The name of the models/ config these fields equal (e.g. 'tinyllama-1.1b'), else 'llama'."""
    import dataclasses

    from litgpt import Config

    import models

    mine = dataclasses.asdict(Config(name="llama", **fields))
    for name in models.CONFIG_NAMES:
        known = dataclasses.asdict(models.get_config(name))
        if {k: v for k, v in known.items() if k != "name"} == {k: v for k, v in mine.items() if k != "name"}:
            return name
    return "llama"
