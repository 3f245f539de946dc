"""TinyLlama-style Llama configurations by name, built as `litgpt.Config`.

| name | use | layers | d | heads (kv) | MLP | vocab |
|---|---|---|---|---|---|---|
| `debug` | unit tests, < 1 M params | 2 | 64 | 4 (2) | 176 | 4,096 |
| `tiny` | the CPU demo, ~12.6 M params | 6 | 384 | 6 (2) | 1,024 | 4,096 |
| `tinyllama-1.1b` | TinyLlama 1.1B | 22 | 2,048 | 32 (4) | 5,632 | 32,000 |
| `llama2-7b` | Llama-2 7B | 32 | 4,096 | 32 (32) | 11,008 | 32,000 |
| `llama2-13b` | Llama-2 13B | 40 | 5,120 | 40 (40) | 13,824 | 32,000 |
| `llama3.2-1b` | Llama 3.2 1B (litgpt `Llama-3.2-1B`) | 16 | 2,048 | 32 (8) | 8,192 | 128,256 |

`vocab_size` can be overridden to match a tokenizer (the demo trains a 4,096-piece one).

`llama3.2-1b` is litgpt's `Llama-3.2-1B` field for field (vocabulary 128,000 padded to 128,256 rows, the
size of Llama 3's tokenizer.json with its special tokens; rope base 500,000 with Llama 3.1's frequency
adjustments; 131,072-token context). Meta's checkpoint ties `lm_head` to the embedding; litgpt's GPT has
no tying (its converter copies the matrix into `lm_head`), so here they are two parameters, 1,498,482,688
in all (Meta counts 1,235,814,400 with one copy), each with one Adam-mini block per token row.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from litgpt import Config
from litgpt.model import GPT

_LLAMA = dict(
    bias=False,
    norm_class_name="RMSNorm",
    norm_eps=1e-5,
    mlp_class_name="LLaMAMLP",
    parallel_residual=False,
    rotary_percentage=1.0,
    rope_base=10000,
)

_CONFIGS: dict[str, dict[str, Any]] = {
    # Sizes chosen so that FSDP shards on 2-4 ranks cut rows and heads mid-way (see tests).
    "debug": dict(block_size=128, vocab_size=4096, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
                  head_size=16, intermediate_size=176),
    "tiny": dict(block_size=256, vocab_size=4096, n_layer=6, n_head=6, n_query_groups=2, n_embd=384,
                 head_size=64, intermediate_size=1024),
    "tinyllama-1.1b": dict(block_size=2048, vocab_size=32000, n_layer=22, n_head=32, n_query_groups=4,
                           n_embd=2048, head_size=64, intermediate_size=5632),
    "llama2-7b": dict(block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_query_groups=32,
                      n_embd=4096, head_size=128, intermediate_size=11008),
    "llama2-13b": dict(block_size=4096, vocab_size=32000, n_layer=40, n_head=40, n_query_groups=40,
                       n_embd=5120, head_size=128, intermediate_size=13824),
    "llama3.2-1b": dict(block_size=131072, vocab_size=128000, padded_vocab_size=128256, padding_multiple=512,
                        n_layer=16, n_head=32, n_query_groups=8, n_embd=2048, head_size=64, intermediate_size=8192,
                        rope_base=500000, rope_adjustments=dict(factor=32.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0, original_max_seq_len=8192)),
}

CONFIG_NAMES: tuple[str, ...] = tuple(_CONFIGS)


def get_config(name: str, **overrides: Any) -> Config:
    """The named config as a `litgpt.Config`; keyword arguments override fields (e.g. `vocab_size`)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known configs: {', '.join(CONFIG_NAMES)}")
    fields = {**_LLAMA, **_CONFIGS[name], **overrides}
    fields.setdefault("padded_vocab_size", fields["vocab_size"])
    if "vocab_size" in overrides and "padded_vocab_size" not in overrides:
        fields["padded_vocab_size"] = overrides["vocab_size"]
    check_shape(fields)
    return Config(name=name, **fields)


# Sizes that must be whole numbers >= 1 (litgpt builds 0 or -1 layers silently, and fails later on others).
_POSITIVE_INTS = ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size", "vocab_size",
                  "padded_vocab_size", "block_size")


_MLP_CLASSES = ("LLaMAMLP", "GptNeoxMLP", "GemmaMLP", "LLaMAMoE")  # litgpt.model's feed-forward classes
_NORM_CLASSES = ("RMSNorm", "LayerNorm")


def check_shape(fields: dict[str, Any]) -> None:
    """A ValueError naming the first field of a Llama config that cannot make a working model."""
    def number(key: str) -> float:
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return value

    for key in _POSITIVE_INTS:
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if fields["n_head"] % fields["n_query_groups"]:
        raise ValueError(f"n_query_groups ({fields['n_query_groups']}) must divide n_head ({fields['n_head']}): "
                         "every key/value group serves the same number of query heads")
    if fields["padded_vocab_size"] < fields["vocab_size"]:
        raise ValueError(f"padded_vocab_size ({fields['padded_vocab_size']}) is smaller than vocab_size "
                         f"({fields['vocab_size']})")
    if not 0 <= number("rotary_percentage") <= 1:
        raise ValueError(f"rotary_percentage must lie in [0, 1], got {fields['rotary_percentage']!r}")
    for key in ("rope_base", "norm_eps"):
        if number(key) <= 0:
            raise ValueError(f"{key} must be > 0, got {fields[key]!r}")
    # names litgpt looks up (litgpt.model / torch.nn) only when it builds the model
    for key, known in (("mlp_class_name", _MLP_CLASSES), ("norm_class_name", _NORM_CLASSES)):
        if fields.get(key, known[0]) not in known:
            raise ValueError(f"{key} must be one of {', '.join(known)}, got {fields[key]!r}")
    ratio = fields.get("rope_condense_ratio", 1)
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"rope_condense_ratio must be an integer >= 1, got {ratio!r}")
    if not isinstance(fields.get("rope_adjustments"), (dict, type(None))):
        raise ValueError(f"rope_adjustments must be a mapping or null, got {fields['rope_adjustments']!r}")


def build_model(config: Config | str, device: torch.device | str | None = "meta") -> GPT:
    """Instantiate `litgpt.model.GPT`; on the meta device by default (no memory is allocated)."""
    if isinstance(config, str):
        config = get_config(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return GPT(config)
