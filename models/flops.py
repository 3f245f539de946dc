"""Parameter counts and training FLOPs per token, from the config alone (no model is built)."""
from __future__ import annotations

from litgpt import Config


def count_params(config: Config) -> int:
    """Exact number of parameters of a bias-free litgpt Llama (`GPT`) with this config."""
    d, hs, L = config.n_embd, config.head_size, config.n_layer
    V, inter = config.padded_vocab_size, config.intermediate_size
    qkv = (config.n_head + 2 * config.n_query_groups) * hs * d
    proj = d * config.n_head * hs
    mlp = 3 * inter * d
    norms = 2 * d
    per_layer = qkv + proj + mlp + norms
    embeddings = V * d  # transformer.wte
    head = V * d  # lm_head (untied)
    return embeddings + head + L * per_layer + d  # + final norm


def flops_per_token(config: Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) = 6·N + 12·L·n_head·head_size·seq_len.

    N counts the parameters that take part in matrix multiplies: everything except the token
    embedding (a lookup) and the norm weights. The attention term is the PaLM convention: the score
    (QKᵀ) and value (AV) products, 2·2·L·T·(n_head·hs) forward and twice that backward, counted over
    the full T×T matrix as kernels that do not skip the masked half do.
    """
    d, L = config.n_embd, config.n_layer
    n_matmul = count_params(config) - config.padded_vocab_size * d - (2 * L + 1) * d
    attention = 12 * L * config.n_head * config.head_size * seq_len
    return 6.0 * n_matmul + attention
