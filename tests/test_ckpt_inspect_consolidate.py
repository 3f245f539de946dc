"""amp-ckpt inspect and consolidate on both checkpoint layouts: plain files written by the real writer
(save_checkpoint) and torch.distributed.checkpoint folders (the FSDP layout), read in one process."""
from __future__ import annotations

import json
import math

import pytest
import torch

import models
from checkpoints_util.__main__ import main
from checkpoints_util.consolidate import consolidate
from checkpoints_util.inspect import inspect_checkpoint
from test_ckpt_helpers import (model_config, random_model, save_plain, save_sharded_single_process,
                               trained_optimizer)


@pytest.fixture(scope="module")
def trained():
    model = random_model()
    opt = trained_optimizer(model)
    return model, opt


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory, trained):
    model, opt = trained
    return save_plain(tmp_path_factory.mktemp("plain") / "run", 7, model, opt, tokens_seen=7 * 1024)


@pytest.fixture(scope="module")
def dcp_ckpt(tmp_path_factory, trained):
    model, opt = trained
    return save_sharded_single_process(tmp_path_factory.mktemp("dcp") / "run", 9, model, opt,
                                       tokens_seen=9 * 2048, world_size=2)


def optimizer_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_inspect_plain_fields(plain_ckpt, trained, capsys):
    model, opt = trained
    r = inspect_checkpoint(plain_ckpt.parent)  # a run folder: its newest checkpoint
    assert r["path"] == str(plain_ckpt)
    assert (r["step"], r["tokens_seen"], r["world_size"]) == (7, 7 * 1024, 1)
    assert r["strategy"] == "SingleDeviceStrategy" and r["sharded"] is False
    assert r["optimizer"]["kind"] == "adam_mini"
    assert r["optimizer"]["state_bytes"] == optimizer_bytes(opt) > 0
    m = r["model"]
    assert m["parameters"] == models.count_params(model_config()) == sum(p.numel() for p in model.parameters())
    assert m["n_layer"] == 2 and m["n_query_groups"] == 2 and m["dtypes"] == ["float32"]
    assert r["train_config"]["model"]["name"] == "debug"
    on_disk = {str(p.relative_to(plain_ckpt)): p.stat().st_size for p in plain_ckpt.rglob("*") if p.is_file()}
    assert {f["path"]: f["bytes"] for f in r["files"]} == on_disk
    assert {"trainer.json", "model.pt", "optimizer.pt", "model_config.yaml", "config.yaml"} <= set(on_disk)

    assert main(["inspect", str(plain_ckpt)]) == 0
    text = capsys.readouterr().out
    for needle in ("step         7", "tokens seen  7,168", "written on   1 rank(s)", "optimizer    adam_mini",
                   f"{m['parameters']:,} parameters", "training config:", "model.pt"):
        assert needle in text, needle
    assert main(["inspect", str(plain_ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 7


def test_inspect_sharded_fields(dcp_ckpt, trained):
    model, opt = trained
    r = inspect_checkpoint(dcp_ckpt)
    assert (r["step"], r["tokens_seen"], r["world_size"], r["sharded"]) == (9, 9 * 2048, 2, True)
    # optimizer/ is optim/state.py's name-keyed layout: the same numbers as the optimizer in memory
    assert r["optimizer"]["state_bytes"] == optimizer_bytes(opt)
    assert r["model"]["bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert any(f["path"].startswith("model/") and f["path"].endswith(".distcp") for f in r["files"])


@pytest.mark.parametrize("layout", ["plain", "dcp"])
def test_consolidate_weights_equal_the_model(layout, plain_ckpt, dcp_ckpt, trained, tmp_path):
    model, _ = trained
    ckpt = plain_ckpt if layout == "plain" else dcp_ckpt
    out = tmp_path / "full.pth"
    assert main(["consolidate", str(ckpt), "--out", str(out), "--quiet"]) == 0
    sd = torch.load(out, weights_only=True)
    ref = model.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    # litgpt's GPT takes it as it is
    from litgpt.model import GPT

    GPT(model_config()).load_state_dict(sd, strict=True)


def test_consolidate_with_optimizer_by_name_agrees_across_layouts(plain_ckpt, dcp_ckpt, trained, tmp_path):
    model, opt = trained
    a = consolidate(plain_ckpt, tmp_path / "a.pt", with_optimizer=True)
    b = consolidate(dcp_ckpt, tmp_path / "b.pt", with_optimizer=True)
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["trainer"]["step"] == 7 and a["model_config"]["n_layer"] == 2
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(sa) == sorted(sb) == sorted(names)
    params = dict(model.named_parameters())
    by_param = {id(u.param): u for u in opt.units}
    for name in names:
        live = opt.state[params[name]]
        assert id(params[name]) in by_param
        # exp_avg comes back in the parameter's shape, per-block v as a vector
        assert sa[name]["exp_avg"].shape == params[name].shape
        assert torch.equal(sa[name]["exp_avg"].flatten(), live["exp_avg"])
        assert torch.equal(sa[name]["exp_avg_sq"], live["exp_avg_sq"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)
        assert float(sa[name]["step"]) == float(sb[name]["step"]) == 2.0
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # optim/state.py's hparams
    assert math.isclose(float(torch.cat([v["exp_avg"].flatten() for v in sa.values()]).abs().sum()),
                        float(torch.cat([v["exp_avg"].flatten() for v in sb.values()]).abs().sum()))
