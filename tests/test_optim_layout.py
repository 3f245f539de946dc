"""Adam-mini block layout and its decomposition into chunks, checked against per-row/per-element truth."""
from __future__ import annotations

import random

import pytest
import torch

import models
from optim.blocks import decompose_segment, plan_unit
from optim.layout import ParamLayout, Partition, format_layout, model_layout, param_layout
from optim.units import Segment, Unit, canonical_name, units_from_module


def _shapes(config):
    return [(n, tuple(p.shape)) for n, p in models.build_model(config).named_parameters()]


def _row_block_ids(config, name, shape):
    """Independent truth: the block id of every row (or element, for 1-D tensors) from the table in ADAM_MINI.md."""
    hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
    if name.endswith("attn.qkv.weight"):
        ids = []
        for r in range(shape[0]):
            if r < nh * hs:
                ids.append(r // hs)  # Q head
            elif r < (nh + ng) * hs:
                ids.append(nh + (r - nh * hs) // hs)  # K group
            else:
                ids.append(nh + ng + (r - (nh + ng) * hs))  # one per V row
        return torch.tensor(ids).repeat_interleave(shape[1])
    if len(shape) == 2:  # rows / tokens
        return torch.arange(shape[0]).repeat_interleave(shape[1])
    if name.endswith(".bias"):
        return torch.arange(shape[0])
    return torch.zeros(shape[0], dtype=torch.long)  # norm: whole tensor


def _element_block_ids(layout: ParamLayout):
    sizes = torch.tensor([b for n, b in layout.runs for _ in range(n)])
    return torch.arange(len(sizes)).repeat_interleave(sizes)


@pytest.mark.parametrize("n_query_groups", [1, 2, 4])  # MQA, GQA, MHA (debug has n_head=4)
def test_debug_layout_matches_row_truth(n_query_groups):
    config = models.get_config("debug", n_query_groups=n_query_groups)
    shapes = _shapes(config)
    layouts = model_layout(config, shapes)
    assert list(layouts) == [n for n, _ in shapes]
    for name, shape in shapes:
        lay = layouts[name]
        assert lay.shape == shape and lay.numel == torch.Size(shape).numel()
        assert torch.equal(_element_block_ids(lay), _row_block_ids(config, name, shape)), name
        assert lay.weight_decay == (len(shape) == 2)
    qkv = layouts["transformer.h.0.attn.qkv.weight"]
    assert qkv.kind == "qkv"
    assert qkv.n_blocks == 4 + n_query_groups + n_query_groups * 16


def test_tinyllama_table_and_v_entries():
    config = models.get_config("tinyllama-1.1b")
    layouts = model_layout(config, _shapes(config))
    assert sum(lay.numel for lay in layouts.values()) == models.count_params(config)
    qkv = layouts["transformer.h.0.attn.qkv.weight"]
    assert qkv.runs == ((32, 64 * 2048), (4, 64 * 2048), (256, 2048))
    n_v = sum(lay.n_blocks for lay in layouts.values())
    # per layer: 32 Q heads + 4 K groups + 256 V rows + 2048 proj rows + 2*5632 MLP rows + 2048 rows + 2 norms
    assert n_v == 2 * 32000 + 22 * (32 + 4 + 256 + 2048 + 2 * 5632 + 2048 + 2) + 1
    table = format_layout(layouts)
    assert "transformer.h.21.attn.qkv.weight" in table and "32x131072 + 4x131072 + 256x2048" in table
    assert f"{n_v:,}" in table.splitlines()[-1]


def _partition_truth(config, name, shape, partition: Partition):
    """Independent truth for the non-default choices: block id per element (ADAM_MINI.md's table, altered)."""
    if partition.embedding_blocks == "elements" and name in ("transformer.wte.weight", "lm_head.weight"):
        return torch.arange(shape[0] * shape[1])
    ids = _row_block_ids(config, name, shape)
    if partition.value_blocks == "whole" and name.endswith("attn.qkv.weight"):
        first_v = config.n_head + config.n_query_groups  # every V row -> the one block after the K groups
        ids = ids.clamp(max=first_v)
    return ids


@pytest.mark.parametrize("partition", [Partition(), Partition("elements", "rows"), Partition("tokens", "whole"),
                                       Partition("elements", "whole")], ids=str)
def test_partition_choices_match_element_truth_and_hand_counts(partition):
    config = models.get_config("debug")  # V = 4096, d = 64, 4 Q heads + 2 K groups of 16 rows, 32 V rows
    shapes = _shapes(config)
    layouts = model_layout(config, shapes, partition)
    for name, shape in shapes:
        assert torch.equal(_element_block_ids(layouts[name]), _partition_truth(config, name, shape, partition)), name
        assert layouts[name].weight_decay == (len(shape) == 2)
    elements, whole = partition.embedding_blocks == "elements", partition.value_blocks == "whole"
    assert layouts["lm_head.weight"].runs == (((4096 * 64, 1),) if elements else ((4096, 64),))
    assert layouts["transformer.h.1.attn.qkv.weight"].runs == ((4, 1024), (2, 1024), (1, 2048) if whole else (32, 64))
    # v entries, by hand: root 2 embeddings + ln_f; per layer 2 norms + qkv + 64 proj + 2 x 176 MLP + 64 rows
    per_layer = 2 + (4 + 2 + (1 if whole else 32)) + 64 + 2 * 176 + 64
    assert sum(lay.n_blocks for lay in layouts.values()) == 2 * (4096 * 64 if elements else 4096) + 1 + 2 * per_layer
    table = format_layout(layouts, partition).splitlines()
    assert table[0] == f"Adam-mini blocks (embedding_blocks={partition.embedding_blocks}, " \
                       f"value_blocks={partition.value_blocks})"
    assert ("262144x1" in "\n".join(table)) == elements and ("4x1024 + 2x1024 + 1x2048" in "\n".join(table)) == whole


def test_partition_options_are_checked_naming_them():
    with pytest.raises(ValueError, match="embedding_blocks must be tokens or elements, got 'rows'"):
        Partition(embedding_blocks="rows")
    with pytest.raises(ValueError, match="value_blocks must be rows or whole, got 'heads'"):
        Partition(value_blocks="heads")


def test_elements_embeddings_cost_two_vd_fp32_more_state():
    """2·(V·d - V) extra v entries (fp32) for TinyLlama, Llama-2 7B and 13B; bf16 m halves the m bytes."""
    import math

    from optim.memory import adam_mini_state_bytes

    for name, v, d in (("tinyllama-1.1b", 32000, 2048), ("llama2-7b", 32000, 4096), ("llama2-13b", 32000, 5120)):
        config = models.get_config(name)
        shapes = _shapes(config)
        default = model_layout(config, shapes)
        elements = model_layout(config, shapes, Partition(embedding_blocks="elements"))
        assert adam_mini_state_bytes(elements) - adam_mini_state_bytes(default) == 2 * (v * d - v) * 4, name
        n_params = sum(math.prod(s) for _, s in shapes)
        m32, m16 = adam_mini_state_bytes(default), adam_mini_state_bytes(default, torch.bfloat16)
        assert m32 - m16 == 2 * n_params, name


def test_biases_are_per_element_without_decay():
    config = models.get_config("debug", bias=True)
    layouts = model_layout(config, _shapes(config))
    biases = [lay for name, lay in layouts.items() if name.endswith(".bias")]
    assert biases, "bias=True should give the debug model biases"
    for lay in biases:
        assert lay.kind == "elements" and lay.n_blocks == lay.numel and not lay.weight_decay


@pytest.mark.parametrize("name, shape", [
    ("transformer.h.0.attn.unknown.weight", (64, 64)),
    ("transformer.h.7.attn.qkv.weight", (128, 64)),      # layer beyond n_layer
    ("transformer.h.0.attn.qkv.weight", (96, 64)),       # wrong shape for the config
    ("transformer.wte.weight", (4000, 64)),
    ("module.lm_head.weight", (4096, 64)),               # prefixes must be stripped by the caller
    ("transformer.h.0.norm_1.weight", (64, 1)),
])
def test_unplaceable_parameters_raise_naming_them(name, shape):
    config = models.get_config("debug")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        param_layout(config, name, shape)


def test_canonical_names_strip_wrappers():
    assert canonical_name("_forward_module.module._orig_mod.transformer.h.0.attn.qkv.weight") == \
        "transformer.h.0.attn.qkv.weight"


def _chunk_truth(chunks, local_numel):
    """Per local element: (block id, is-partial) from chunks; -1 where no chunk covers."""
    ids = torch.full((local_numel,), -1, dtype=torch.long)
    for c in chunks:
        seg = ids[c.offset:c.offset + c.numel]
        assert bool((seg == -1).all()), "chunks overlap"
        seg.copy_(torch.arange(c.block, c.block + c.rows).repeat_interleave(c.length))
    return ids


def test_decompose_segment_matches_element_truth_at_random_cuts():
    config = models.get_config("debug")
    lay = param_layout(config, "transformer.h.0.attn.qkv.weight", (128, 64))
    truth = _element_block_ids(lay)
    rng = random.Random(0)
    cuts = [0, 1, 1023, 1024, 4095, 4096, 6143, 6144, 6145, 6207, 8191, 8192]
    cuts += [rng.randrange(0, lay.numel + 1) for _ in range(40)]
    for a in cuts:
        for b in cuts:
            if a > b:
                continue
            base, offset = 5, 3
            chunks = decompose_segment(Segment(lay.name, a, b, offset), lay, base)
            assert len(chunks) <= 3 * len(lay.runs)
            ids = _chunk_truth(chunks, offset + lay.numel)
            assert bool((ids[:offset] == -1).all()) and bool((ids[offset + b - a:] == -1).all())
            assert torch.equal(ids[offset:offset + b - a], truth[a:b] + base), (a, b)
            for c in chunks:
                assert c.rows == 1 or c.length in (1024, 64)  # only full blocks come in batches


def test_plan_unit_of_a_flat_shard():
    """A unit holding pieces of several parameters, as an FSDP FlatParameter shard would."""
    config = models.get_config("debug")
    names = ["transformer.h.0.norm_1.weight", "transformer.h.0.attn.qkv.weight", "transformer.h.0.attn.proj.weight"]
    layouts = model_layout(config, [(n, s) for n, s in _shapes(config) if n in names])
    # the shard holds flat elements [1000, 9000) of norm_1 (64) | qkv (8192) | proj (4096)
    segs = (Segment(names[1], 1000 - 64, 8192, 0), Segment(names[2], 0, 9000 - 64 - 8192, 8192 - 936))
    unit = Unit(param=torch.nn.Parameter(torch.zeros(8000)), names=tuple(names), segments=segs, label="flat")
    plan = plan_unit(unit, layouts)
    assert plan.n_blocks == 1 + 38 + 64
    truth = torch.cat([_element_block_ids(layouts[n]) + off for n, off in zip(names, (0, 1, 39))])
    assert torch.equal(_chunk_truth(plan.chunks, 8000), truth[1000:9000])
    assert plan.spans == ((0, 8000, True),)
    bad = Unit(param=unit.param, names=tuple(names[1:]), segments=segs[:1] + (Segment(names[0], 0, 4, 0),), label="bad")
    with pytest.raises(ValueError, match="not in the unit's names"):
        plan_unit(bad, layouts)


def test_units_from_module_cover_every_parameter():
    model = models.build_model("debug")
    units = units_from_module(model)
    assert [u.names[0] for u in units] == [n for n, _ in model.named_parameters()]
    for u in units:
        assert u.group is None and u.segments == (Segment(u.names[0], 0, u.param.numel(), 0),)
