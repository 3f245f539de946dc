"""litgpt Llama -> Hugging Face `LlamaForCausalLM`: the config and the tensor names (pure, no I/O).

Why it is its own module: this mapping is where an export goes silently wrong (a swapped q/k/v slice
gives a model that loads fine and produces garbage), so it is kept small and tested by comparing
logits of the two implementations (tests/test_ckpt_export.py).

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
