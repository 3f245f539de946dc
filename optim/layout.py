"""Adam-mini block layout of a litgpt Llama, as plain data.

Adam-mini keeps one second moment per *block* of a parameter (see the project's Adam-mini notes,
shared/ADAM_MINI.md). Every
block is a contiguous range of the flattened (row-major) tensor, and a parameter's blocks come in a
few *runs* of equal-sized blocks, e.g. a fused qkv weight is `[(n_head, hs*d), (n_query_groups, hs*d),
(n_query_groups*hs, d)]`. This module derives those runs from the model config and the parameter
name alone, with no tensors and no knowledge of sharding, so that the same table serves a whole
parameter, a DTensor shard and a piece of an FSDP FlatParameter.

The reference implementation matches names loosely and silently falls back to one block per tensor;
here a parameter we cannot place, or whose shape disagrees with the config, raises `ValueError`.
Two choices the method leaves open are options (`Partition`); the defaults are the reference's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

from litgpt import Config

KINDS = ("qkv", "rows", "tokens", "whole", "elements")
EMBEDDING_BLOCKS = ("tokens", "elements")
VALUE_BLOCKS = ("rows", "whole")

# Matrices whose blocks are their rows (one per output neuron).
_ROW_SUFFIXES = ("attn.proj.weight", "mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight")
_NORM_NAMES = ("norm_1.weight", "norm_2.weight")
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Partition:
    """Where the blocks fall for the two choices the method leaves open; the defaults match the reference
    implementation (PyPI `adam-mini` 1.1.1) exactly.

    `embedding_blocks`, for `transformer.wte.weight` and `lm_head.weight` (V x d each):
      - `tokens`: one block per row, i.e. per token (the reference: one lr per token for names matching its
        embedding and output keys, `wte` and `lm_head` among them);
      - `elements`: one block per element, i.e. plain AdamW for these two matrices: v as large as the matrices
        (2·V·d·4 bytes more). Under FSDP the v vector of a unit is replicated on every rank and its block sums
        are all-reduced each step, so this also costs 2·V·d·4 bytes per rank and an all-reduce of that size.
    `value_blocks`, for the V rows of each layer's fused `attn.qkv.weight`:
      - `rows`: one block per V row, i.e. per output neuron (the reference, for separate value weights
        `v_proj`/`wv`: one lr per neuron; it does not recognise litgpt's fused qkv and gives the whole tensor
        one block);
      - `whole`: one block for all V rows of the layer (the reference's comment allows one lr for the whole V).
    """

    embedding_blocks: Literal["tokens", "elements"] = "tokens"
    value_blocks: Literal["rows", "whole"] = "rows"

    def __post_init__(self) -> None:
        if self.embedding_blocks not in EMBEDDING_BLOCKS:
            raise ValueError(f"embedding_blocks must be tokens or elements, got {self.embedding_blocks!r}")
        if self.value_blocks not in VALUE_BLOCKS:
            raise ValueError(f"value_blocks must be rows or whole, got {self.value_blocks!r}")

    def __str__(self) -> str:
        return f"embedding_blocks={self.embedding_blocks}, value_blocks={self.value_blocks}"


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
        raise ValueError(f"cannot place parameter {name!r}: shape {tuple(shape)} but the config implies "
                         f"{tuple(expected)}")


def param_layout(config: Config, name: str, shape: Iterable[int], partition: Partition = Partition()) -> ParamLayout:
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
        if partition.embedding_blocks == "elements":
            return ParamLayout(name, shape, "elements", ((shape[0] * shape[1], 1),), weight_decay=True)
        return ParamLayout(name, shape, "tokens", ((shape[0], shape[1]),), weight_decay=True)

    if name == "transformer.ln_f.weight":
        _expect(name, shape, (d,))
        return ParamLayout(name, shape, "whole", ((1, d),), weight_decay=False)

    match = _BLOCK_RE.match(name)
    if match is not None and int(match.group(1)) < config.n_layer:
        local = match.group(2)
        if local == "attn.qkv.weight":
            _expect(name, shape, ((n_head + 2 * n_groups) * hs, d))
            values = (n_groups * hs, d) if partition.value_blocks == "rows" else (1, n_groups * hs * d)
            runs = ((n_head, hs * d), (n_groups, hs * d), values)
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


def model_layout(config: Config, named_shapes: Iterable[tuple[str, Iterable[int]]],
                 partition: Partition = Partition()) -> dict[str, ParamLayout]:
    """Layouts for every `(fqn, shape)`; fqns must carry no wrapper prefixes (`module.`, `_orig_mod.`, ...)."""
    layouts: dict[str, ParamLayout] = {}
    for name, shape in named_shapes:
        if name in layouts:
            raise ValueError(f"parameter {name!r} listed twice")
        layouts[name] = param_layout(config, name, shape, partition)
    return layouts


def format_layout(layouts: Mapping[str, ParamLayout] | Iterable[ParamLayout],
                  partition: Partition | None = None, per_layer: bool = True) -> str:
    """A printable table: parameter, shape, kind, blocks (runs), v entries; with a total line, and a title line
    naming `partition` when given. `per_layer=False` shows each parameter of the transformer blocks once, as
    `transformer.h.*.name` with its v entries summed over the layers (the start-up table)."""
    items = list(layouts.values()) if isinstance(layouts, Mapping) else list(layouts)
    rows = [("parameter", "shape", "kind", "blocks", "v entries", "decay")]
    merged: dict[tuple, list] = {}
    for lay in items:
        name = lay.name if per_layer else _BLOCK_RE.sub(r"transformer.h.*.\2", lay.name)
        key = (name, lay.shape, lay.kind, lay.runs, lay.weight_decay)
        merged.setdefault(key, []).append(lay)
    for (name, shape, kind, runs, decay), lays in merged.items():
        blocks = " + ".join(f"{n}x{b}" for n, b in runs) + (f" (x{len(lays)} layers)" if len(lays) > 1 else "")
        rows.append((name, "x".join(map(str, shape)), kind, blocks, f"{sum(x.n_blocks for x in lays):,}",
                     "yes" if decay else "no"))
    n_params = sum(lay.numel for lay in items)
    n_v = sum(lay.n_blocks for lay in items)
    rows.append(("total", f"{n_params:,} params", "", "", f"{n_v:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    if partition is not None:
        lines.insert(0, f"Adam-mini blocks ({partition})")
    return "\n".join(lines)
