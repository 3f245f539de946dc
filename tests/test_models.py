"""Named configs: exact sizes, FLOPs per token, meta-device build, init statistics."""
import math

import pytest
import torch

from models import CONFIG_NAMES, build_model, count_params, flops_per_token, get_config, init_model


@pytest.mark.parametrize(
    "name, expected",
    [("tinyllama-1.1b", 1_100_048_384), ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320)],
)
def test_published_parameter_counts(name, expected):
    config = get_config(name)
    model = build_model(config)  # meta device: no memory
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected
    assert count_params(config) == expected


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_count_params_matches_built_model(name):
    config = get_config(name)
    assert count_params(config) == sum(p.numel() for p in build_model(config).parameters())


def test_small_configs_sizes():
    assert count_params(get_config("debug")) <= 1_000_000
    assert 10_000_000 <= count_params(get_config("tiny")) <= 30_000_000
    # GQA in the small configs, so the optimizer's K-group blocks are exercised.
    for name in ("debug", "tiny"):
        c = get_config(name)
        assert 1 < c.n_query_groups < c.n_head


def test_vocab_override_sets_padded_vocab():
    c = get_config("tiny", vocab_size=1000)
    assert c.vocab_size == c.padded_vocab_size == 1000
    assert build_model(c).lm_head.weight.shape == (1000, c.n_embd)


def test_unknown_name_lists_known_configs():
    with pytest.raises(ValueError) as e:
        get_config("llama3-70b")
    for name in CONFIG_NAMES:
        assert name in str(e.value)


def test_flops_per_token_by_hand_tinyllama():
    c = get_config("tinyllama-1.1b")
    d, L, V, inter = 2048, 22, 32000, 5632
    qkv = (32 + 2 * 4) * 64 * d
    per_layer_matmul = qkv + d * d + 3 * inter * d
    n_matmul = L * per_layer_matmul + V * d  # lm_head; embedding lookup and norms excluded
    T = 2048
    expected = 6 * n_matmul + 12 * L * 32 * 64 * T
    assert flops_per_token(c, T) == expected
    # Sanity against the usual rule of thumb: within 25% of 6·N for N = all params.
    assert 0.75 < flops_per_token(c, T) / (6 * 1_100_048_384) < 1.25


def test_flops_counts_a_real_forward_by_matmul_shapes():
    """Forward FLOPs measured with torch's FlopCounterMode match one third of our training figure."""
    from torch.utils.flop_counter import FlopCounterMode

    c = get_config("debug")
    model = build_model(c, device="cpu")
    T = 32
    x = torch.randint(0, c.padded_vocab_size, (1, T))
    with FlopCounterMode(display=False) as counter:
        model(x)
    measured = counter.get_total_flops() / T
    # FlopCounterMode counts the linear layers' matmuls but not CPU's fused SDPA kernel, so it sees
    # our 6·N term / 3; the attention term is 12·L·H·hs·T, which the formula must add on top.
    attention = 12 * c.n_layer * c.n_head * c.head_size * T
    assert measured == pytest.approx((flops_per_token(c, T) - attention) / 3, rel=1e-9)
    assert flops_per_token(c, 2 * T) - flops_per_token(c, T) == attention


def test_init_statistics():
    torch.manual_seed(0)
    c = get_config("tiny")
    model = build_model(c, device="cpu")
    init_model(model, c.n_layer, c.n_embd)
    std = math.sqrt(2 / 5 / c.n_embd)
    assert model.transformer.wte.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.transformer.h[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.02)
    proj_std = 1 / math.sqrt(c.n_embd) / c.n_layer
    assert model.transformer.h[0].mlp.proj.weight.std().item() == pytest.approx(proj_std, rel=0.02)
    assert model.transformer.h[0].attn.proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
    assert torch.all(model.transformer.h[0].norm_1.weight == 1)


@pytest.mark.parametrize("override, message", [
    ({"n_layer": -1}, "n_layer must be an integer >= 1, got -1"),  # litgpt built a model with no layers
    ({"n_layer": 0}, "n_layer must be an integer >= 1, got 0"),
    ({"n_embd": 0}, "n_embd must be an integer >= 1, got 0"),
    ({"head_size": 0}, "head_size must be an integer >= 1, got 0"),
    ({"vocab_size": 0}, "vocab_size must be an integer >= 1, got 0"),
    ({"intermediate_size": -5}, "intermediate_size must be an integer >= 1, got -5"),
    ({"n_head": 0}, "n_head must be an integer >= 1, got 0"),
    ({"n_layer": 2.5}, "n_layer must be an integer >= 1, got 2.5"),
    ({"n_layer": True}, "n_layer must be an integer >= 1, got True"),
    ({"block_size": "128"}, "block_size must be an integer >= 1, got '128'"),
    ({"n_query_groups": 3}, "n_query_groups (3) must divide n_head (4)"),  # litgpt: a bare AssertionError
    ({"padded_vocab_size": 10}, "padded_vocab_size (10) is smaller than vocab_size (4096)"),
    ({"rotary_percentage": 1.5}, "rotary_percentage must lie in [0, 1], got 1.5"),
    ({"rope_base": 0}, "rope_base must be > 0, got 0"),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number, got nan"),
    # litgpt looks these names up when it builds the model: an AttributeError traceback (exit 1) before
    ({"mlp_class_name": "Foo"}, "mlp_class_name must be one of"),
    ({"norm_class_name": "Linear"}, "norm_class_name must be one of"),
    ({"rope_adjustments": 5}, "rope_adjustments must be a mapping or null, got 5"),
    ({"rope_condense_ratio": 0}, "rope_condense_ratio must be an integer >= 1, got 0"),  # was a NaN loss (exit 1)
])
def test_shapes_that_cannot_work_are_named(override, message):
    with pytest.raises(ValueError) as e:
        get_config("debug", **override)
    assert str(e.value).startswith(message)


def test_shape_checks_accept_every_named_config_and_odd_but_valid_shapes():
    for name in CONFIG_NAMES:
        get_config(name)
    for override in ({"head_size": 15}, {"rotary_percentage": 0.0}, {"n_query_groups": 4}, {"n_query_groups": 1},
                     {"n_embd": 63}, {"vocab_size": 1, "n_layer": 1}):
        assert count_params(get_config("debug", **override)) == sum(
            p.numel() for p in build_model(get_config("debug", **override)).parameters())
