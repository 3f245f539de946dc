"""optim/state.py in one process: the name-keyed format, DCP round trips, Stateful use, errors.

The multi-rank cases (FSDP1/FSDP2 pieces as ShardedTensors, resharding 2 -> 1, 3, 4 ranks, DDP <->
FSDP) are in tests/test_optim_fsdp.py.
"""
from __future__ import annotations

import pytest
import torch

import models
from helpers.optim_reference import HP
from optim.adam_mini import AdamMini
from optim.layout import Partition, model_layout
from optim.state import (
    OptimizerState,
    full_state_dict,
    load_optimizer,
    load_sharded_state_dict,
    save_optimizer,
    sharded_state_dict,
)
from optim.units import units_from_module


def _setup(seed=0, partition=Partition(), **hp):
    torch.manual_seed(seed)
    config = models.get_config("debug")
    model = models.build_model(config, device="cpu")
    models.init_model(model, config.n_layer, config.n_embd)
    layouts = model_layout(config, [(n, tuple(p.shape)) for n, p in model.named_parameters()], partition)
    opt = AdamMini(units_from_module(model), layouts, implementation="eager", **{**HP, **hp})
    return model, opt, layouts


def _steps(model, opt, steps, first=0):
    for t in range(first, first + steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()


def _assert_same(a: dict, b: dict):
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)


def test_format_is_keyed_by_original_names_with_block_vectors():
    model, opt, layouts = _setup()
    _steps(model, opt, 2)
    full = full_state_dict(opt)
    assert set(full["exp_avg"]) == set(layouts) == {n for n, _ in model.named_parameters()}
    for n, lay in layouts.items():
        assert full["exp_avg"][n].shape == (lay.numel,)
        assert full["exp_avg_sq"][n].shape == (lay.n_blocks,)
        assert float(full["step"][n]) == 2.0
        # the unsharded optimizer's state, by name
        st = opt.state[dict(model.named_parameters())[n]]
        assert torch.equal(full["exp_avg"][n], st["exp_avg"]) and torch.equal(full["exp_avg_sq"][n], st["exp_avg_sq"])
    assert float(full["hparams"]["beta2"]) == 0.95 and float(full["hparams"]["weight_decay"]) == 0.1


def test_derived_sizes_need_no_layouts():
    model, opt, layouts = _setup()
    _steps(model, opt, 1)
    _assert_same(full_state_dict(opt), full_state_dict(opt, layouts))


@pytest.mark.parametrize("momentum_dtype, partition", [(torch.float32, Partition()), (torch.bfloat16, Partition()),
                                                       (torch.bfloat16, Partition("elements", "whole"))], ids=str)
def test_dcp_round_trip_continues_bit_exactly(tmp_path, momentum_dtype, partition):
    model_a, opt_a, _ = _setup(partition=partition, momentum_dtype=momentum_dtype)
    _steps(model_a, opt_a, 3)
    save_optimizer(opt_a, tmp_path / "opt")
    # wrong hparams on purpose
    model_b, opt_b, _ = _setup(partition=partition, lr=0.5, weight_decay=0.0, momentum_dtype=momentum_dtype)
    with torch.no_grad():
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            pb.copy_(pa)
    load_optimizer(opt_b, tmp_path / "opt")
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups[0]["weight_decay"] == 0.1
    full = full_state_dict(opt_b)
    assert all(t.dtype == momentum_dtype for t in full["exp_avg"].values())
    _assert_same(full_state_dict(opt_a), full)
    _steps(model_a, opt_a, 2, first=3)
    _steps(model_b, opt_b, 2, first=3)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_dcp_load_casts_the_first_moment_to_the_configured_dtype(tmp_path):
    """fp32 m saved, bf16 m configured: rounded to nearest even (torch's cast); and bf16 back to fp32 exactly."""
    model, opt32, _ = _setup()
    _steps(model, opt32, 2)
    save_optimizer(opt32, tmp_path / "fp32")
    _, opt16, _ = _setup(momentum_dtype=torch.bfloat16)
    load_optimizer(opt16, tmp_path / "fp32")
    saved, loaded = full_state_dict(opt32), full_state_dict(opt16)
    for n, m in saved["exp_avg"].items():
        assert loaded["exp_avg"][n].dtype == torch.bfloat16 and torch.equal(loaded["exp_avg"][n], m.to(torch.bfloat16))
    save_optimizer(opt16, tmp_path / "bf16")
    _, back, _ = _setup()
    load_optimizer(back, tmp_path / "bf16")
    for n, m in full_state_dict(back)["exp_avg"].items():
        assert m.dtype == torch.float32 and torch.equal(m, loaded["exp_avg"][n].float())


@pytest.mark.filterwarnings("ignore:.*single process:UserWarning")
def test_stateful_inside_a_dcp_dict(tmp_path):
    import torch.distributed.checkpoint as dcp
    model_a, opt_a, _ = _setup()
    _steps(model_a, opt_a, 2)
    dcp.save({"optimizer": OptimizerState(opt_a), "extra": torch.arange(3)}, checkpoint_id=str(tmp_path / "c"))
    _, opt_b, _ = _setup()
    extra = torch.zeros(3, dtype=torch.long)
    dcp.load({"optimizer": OptimizerState(opt_b), "extra": extra}, checkpoint_id=str(tmp_path / "c"))
    assert torch.equal(extra, torch.arange(3))
    _assert_same(full_state_dict(opt_a), full_state_dict(opt_b))


def test_load_from_full_state_dict_and_shaped_tensors():
    model_a, opt_a, layouts = _setup()
    _steps(model_a, opt_a, 2)
    full = full_state_dict(opt_a)
    # parameter-shaped exp_avg (as a consolidated checkpoint may store it) loads too
    shaped = {**full, "exp_avg": {n: t.reshape(layouts[n].shape) for n, t in full["exp_avg"].items()}}
    _, opt_b, _ = _setup()
    load_sharded_state_dict(opt_b, shaped)
    _assert_same(full, full_state_dict(opt_b))


def test_sharded_state_dict_aliases_the_state():
    model, opt, _ = _setup()
    _steps(model, opt, 1)
    sd = sharded_state_dict(opt)
    name, p = next(iter(model.named_parameters()))
    assert sd["exp_avg"][name].data_ptr() == opt.state[p]["exp_avg"].data_ptr()
    assert sd["exp_avg_sq"][name].data_ptr() == opt.state[p]["exp_avg_sq"].data_ptr()


def test_errors_name_the_problem():
    model, opt, layouts = _setup()
    _steps(model, opt, 1)
    full = full_state_dict(opt)
    name = "transformer.h.0.attn.qkv.weight"
    missing = {k: ({n: t for n, t in v.items() if n != name} if k != "hparams" else v) for k, v in full.items()}
    with pytest.raises(KeyError, match="missing"):
        load_sharded_state_dict(opt, missing)
    bad_v = {**full, "exp_avg_sq": {**full["exp_avg_sq"], name: torch.zeros(3)}}
    with pytest.raises(ValueError, match=f"{name}: exp_avg_sq has 3 entries"):
        load_sharded_state_dict(opt, bad_v)
    bad_m = {**full, "exp_avg": {**full["exp_avg"], name: torch.zeros(5)}}
    with pytest.raises(ValueError, match=f"{name}: exp_avg has 5 elements"):
        load_sharded_state_dict(opt, bad_m)
    _, whole_v, _ = _setup(partition=Partition(value_blocks="whole"))
    with pytest.raises(ValueError, match=f"{name}: exp_avg_sq has 38 entries, the layout has 7 blocks "
                                         r"\(written with another Adam-mini partition\?\)"):
        load_sharded_state_dict(whole_v, full)


def test_before_the_first_step_state_is_zero_and_loadable(tmp_path):
    _, opt, _ = _setup()
    full = full_state_dict(opt)  # creates the (zero) state
    assert all(float(t) == 0.0 for t in full["step"].values())
    save_optimizer(opt, tmp_path / "o")
    _, opt_b, _ = _setup()
    load_optimizer(opt_b, tmp_path / "o")
    _assert_same(full, full_state_dict(opt_b))
