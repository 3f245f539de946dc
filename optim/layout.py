"""Adam-mini block layout of a litgpt Llama, as plain data.

Adam-mini keeps one second moment per *block* of a parameter (see /work/shared/ADAM_MINI.md). Every
block is a contiguous range of the flattened (row-major) tensor, and a parameter's blocks come in a
few *runs* of equal-sized blocks, e.g. a fused qkv weight is `[(n_head, hs*d), (n_query_groups, hs*d),
(n_query_groups*hs, d)]`. This module derives those runs from the model config and the parameter
name alone, with no tensors and no knowledge of sharding, so that the same table serves a whole
parameter, a DTensor shard and a piece of an FSDP FlatParameter.

The reference implementation matches names loosely and silently falls back to one block per tensor;
here a parameter we cannot place, or whose shape disagrees with the config, raises `ValueError`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from litgpt import Config

KINDS = ("qkv", "rows", "tokens", "whole", "elements")

# Matrices whose blocks are their rows (one per output neuron).
_ROW_SUFFIXES = ("attn.proj.weight", "mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight")
_NORM_NAMES = ("norm_1.weight", "norm_2.weight")
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is cut into Adam-mini blocks.

    `runs` lists `(n_blocks, block_numel)` in flattened row-major order; together they cover the
    parameter exactly. `weight_decay` says whether decoupled weight decay applies (matrices and
    embeddings yes, norm weights and biases no).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    runs: tuple[tuple[int, int], ...]
    weight_decay: bool

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown layout kind {self.kind!r}")
        covered = sum(n * b for n, b in self.runs)
        if covered != self.numel or any(n <= 0 or b <= 0 for n, b in self.runs):
            raise ValueError(f"{self.name}: runs {self.runs} do not cover shape {self.shape} ({self.numel} elements)")

    @property
    def n_blocks(self) -> int:
        return sum(n for n, _ in self.runs)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _expect(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"cannot place parameter {name!r}: shape {tuple(shape)} but the config implies {tuple(expected)}")


def param_layout(config: Config, name: str, shape: Iterable[int]) -> ParamLayout:
    """The layout of one parameter, from its FQN (no wrapper prefixes) and shape; ValueError if unknown."""
    shape = tuple(int(s) for s in shape)
    d, hs = config.n_embd, config.head_size
    n_head, n_groups = config.n_head, config.n_query_groups

    if name.endswith(".bias"):  # any bias: one block per element, i.e. plain AdamW
        if len(shape) != 1:
            raise ValueError(f"cannot place parameter {name!r}: a bias of shape {shape}")
        return ParamLayout(name, shape, "elements", ((shape[0], 1),), weight_decay=False)

    if name in ("transformer.wte.weight", "lm_head.weight"):
        _expect(name, shape, (config.padded_vocab_size, d))
        return ParamLayout(name, shape, "tokens", ((shape[0], shape[1]),), weight_decay=True)

    if name == "transformer.ln_f.weight":
        _expect(name, shape, (d,))
        return ParamLayout(name, shape, "whole", ((1, d),), weight_decay=False)

    match = _BLOCK_RE.match(name)
    if match is not None and int(match.group(1)) < config.n_layer:
        local = match.group(2)
        if local == "attn.qkv.weight":
            _expect(name, shape, ((n_head + 2 * n_groups) * hs, d))
            runs = ((n_head, hs * d), (n_groups, hs * d), (n_groups * hs, d))
            return ParamLayout(name, shape, "qkv", runs, weight_decay=True)
        if local in _ROW_SUFFIXES:
            expected = {
                "attn.proj.weight": (d, n_head * hs),
                "mlp.fc_1.weight": (config.intermediate_size, d),
                "mlp.fc_2.weight": (config.intermediate_size, d),
                "mlp.proj.weight": (d, config.intermediate_size),
            }[local]
            _expect(name, shape, expected)
            return ParamLayout(name, shape, "rows", ((shape[0], shape[1]),), weight_decay=True)
        if local in _NORM_NAMES:
            _expect(name, shape, (d,))
            return ParamLayout(name, shape, "whole", ((1, d),), weight_decay=False)

    raise ValueError(f"cannot place parameter {name!r} (shape {shape}) in the Adam-mini block layout")


def model_layout(config: Config, named_shapes: Iterable[tuple[str, Iterable[int]]]) -> dict[str, ParamLayout]:
    """Layouts for every `(fqn, shape)`; fqns must carry no wrapper prefixes (`module.`, `_orig_mod.`, ...)."""
    layouts: dict[str, ParamLayout] = {}
    for name, shape in named_shapes:
        if name in layouts:
            raise ValueError(f"parameter {name!r} listed twice")
        layouts[name] = param_layout(config, name, shape)
    return layouts


def format_layout(layouts: Mapping[str, ParamLayout] | Iterable[ParamLayout]) -> str:
    """A printable table: parameter, shape, kind, blocks (runs), v entries; with a total line."""
    items = list(layouts.values()) if isinstance(layouts, Mapping) else list(layouts)
    rows = [("parameter", "shape", "kind", "blocks", "v entries", "decay")]
    for lay in items:
        blocks = " + ".join(f"{n}x{b}" for n, b in lay.runs)
        rows.append((lay.name, "x".join(map(str, lay.shape)), lay.kind, blocks, f"{lay.n_blocks:,}",
                     "yes" if lay.weight_decay else "no"))
    n_params = sum(lay.numel for lay in items)
    n_v = sum(lay.n_blocks for lay in items)
    rows.append(("total", f"{n_params:,} params", "", "", f"{n_v:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
