"""amp-ckpt inspect, consolidate and convert, read in one process: the one checkpoint format (written by the
real writer), and checkpoints of the old format 1 (plain files and the FSDP layout) converted to it."""
from __future__ import annotations

import json

import pytest
import torch

import models
from checkpoints_util.__main__ import main
from checkpoints_util.consolidate import consolidate
from checkpoints_util.inspect import inspect_checkpoint
from checkpoints_util.layout import CheckpointError
from checkpoints_util.reader import open_checkpoint
from helpers.checkpoints import (
    model_config,
    random_model,
    save_checkpoint_of,
    save_format1_plain,
    save_format1_sharded,
    trained_optimizer,
)


@pytest.fixture(scope="module")
def trained():
    model = random_model()
    opt = trained_optimizer(model)
    return model, opt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, trained):
    model, opt = trained
    return save_checkpoint_of(tmp_path_factory.mktemp("ck") / "run", 7, model, opt, tokens_seen=7 * 1024)


def optimizer_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_inspect_fields(ckpt, trained, capsys):
    model, opt = trained
    r = inspect_checkpoint(ckpt.parent)  # a run folder: its newest checkpoint
    assert r["path"] == str(ckpt)
    assert (r["step"], r["tokens_seen"], r["world_size"], r["strategy"]) == (7, 7 * 1024, 1, "single")
    assert r["optimizer"]["kind"] == "adam_mini"
    assert r["optimizer"]["state_bytes"] == optimizer_bytes(opt) > 0
    m = r["model"]
    assert m["parameters"] == models.count_params(model_config()) == sum(p.numel() for p in model.parameters())
    assert m["n_layer"] == 2 and m["n_query_groups"] == 2 and m["dtypes"] == ["float32"]
    assert r["train_config"]["model"]["name"] == "debug"
    on_disk = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    assert {f["path"]: f["bytes"] for f in r["files"]} == on_disk
    assert {"trainer.json", ".metadata", "__0_0.distcp", "model_config.yaml", "config.yaml"} <= set(on_disk)

    assert main(["inspect", str(ckpt), "--verify"]) == 0
    text = capsys.readouterr().out
    for needle in ("step         7", "tokens seen  7,168", "written on   1 rank(s)", "optimizer    adam_mini",
                   f"{m['parameters']:,} parameters", "training config:", ".metadata",
                   "every file matches its sha256"):
        assert needle in text, needle
    assert main(["inspect", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 7


def test_consolidate_weights_equal_the_model(ckpt, trained, tmp_path):
    model, _ = trained
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


def assert_state_equals_live(state: dict, model, opt) -> None:
    """The optimizer state by name equals the optimizer's live state (exp_avg parameter-shaped, v per block)."""
    params = dict(model.named_parameters())
    assert sorted(state) == sorted(params)
    for name, p in params.items():
        live = opt.state[p]
        assert state[name]["exp_avg"].shape == p.shape
        assert torch.equal(state[name]["exp_avg"].flatten(), live["exp_avg"]), name
        assert torch.equal(state[name]["exp_avg_sq"], live["exp_avg_sq"]), name
        assert float(state[name]["step"]) == float(live["step"]) == 2.0


def test_consolidate_with_optimizer_by_name(ckpt, trained, tmp_path):
    model, opt = trained
    a = torch.load(consolidate(ckpt, tmp_path / "a.pt", with_optimizer=True), weights_only=True)
    assert a["trainer"]["step"] == 7 and a["model_config"]["n_layer"] == 2
    assert_state_equals_live(a["optimizer"]["state"], model, opt)
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_format1_is_refused_with_the_converter_named_then_converts(layout, trained, tmp_path, capsys):
    model, opt = trained
    loader = {"version": 1, "batches_consumed": 7, "seed": 42, "shuffle": True, "seq_len": 256, "batch_size": 4,
              "world_size": 2, "num_tokens": 100_000, "split": "train"}
    write = save_format1_plain if layout == "plain" else save_format1_sharded
    old = write(tmp_path / "run", 7, model, opt, 7 * 1024, loader)
    with pytest.raises(CheckpointError, match=f"format 1 .* convert it with `amp-ckpt convert {old}`"):
        open_checkpoint(old)

    assert main(["convert", str(old.parent), "--quiet"]) == 0  # a run folder: all its format-1 checkpoints
    assert (tmp_path / "run" / "format1-step-00000007" / "trainer.json").is_file()  # the old one is kept
    new = open_checkpoint(old)
    assert new.trainer["format"] == 2 and new.trainer["step"] == 7 and new.verify() is None
    sd = dict(new.iter_model_tensors())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert_state_equals_live(new.load_optimizer_by_name()["state"], model, opt)
    # 7 micro-batches of 2 ranks x 4 windows each (an epoch has 390 windows): 56 windows into epoch 0
    from helpers.checkpoints import checkpoint_tensors

    data = {k: int(v) for k, v in checkpoint_tensors(new.path).items() if k.startswith("data.")}
    assert (data["data.epoch"], data["data.position"], data["data.seed"]) == (0, 56, 42)


def test_format1_position_inside_an_optimizer_step_converts_to_a_loadable_one(data_dir):
    """Format 1 cut epochs into micro-batches; with gradient accumulation an old epoch can end inside an
    optimizer step. The converted position is rounded up to a whole step, and the loader takes it."""
    from checkpoints_util.convert import _data_position
    from data.loader import build_loader

    per_micro = 2 * 4  # format 1: world size 2 x batch size 4
    first = build_loader(data_dir, "train", 32, 4, world_size=2, seed=3)
    old_epoch = first.windows_per_epoch // per_micro  # micro-batches of a format-1 epoch
    accum = next(a for a in range(2, 10) if old_epoch % a)  # an epoch that ends inside an optimizer step
    G = per_micro * accum
    old = {"version": 1, "batches_consumed": old_epoch + 2, "seed": 3, "shuffle": True, "seq_len": 32,
           "batch_size": 4, "world_size": 2, "num_tokens": first.num_tokens, "split": "train"}
    state, skipped = _data_position(old, {"train": {"global_batch_tokens": G * 32}})
    position = int(state["position"])
    assert int(state["epoch"]) == 1 and position == G and skipped == G - 2 * per_micro
    loader = build_loader(data_dir, "train", 32, 4, world_size=2, seed=3, global_batch=G)
    loader.load_state_dict({**{k: int(v) for k, v in state.items()}, "shuffle": True, "split": "train"})
    assert loader.batches_consumed == loader.steps_per_epoch + position // per_micro


def test_format1_with_an_empty_config_converts_and_says_so(trained, tmp_path, capsys):
    """An empty config.yaml is no config (the optimizer's stored hparams and the loader's own batch are used);
    without --quiet the converter prints one line naming both folders."""
    model, opt = trained
    loader = {"version": 1, "batches_consumed": 3, "seed": 42, "shuffle": True, "seq_len": 256, "batch_size": 4,
              "world_size": 2, "num_tokens": 100_000, "split": "train"}
    old = save_format1_plain(tmp_path / "run", 3, model, opt, 3 * 1024, loader)
    (old / "config.yaml").write_text("")
    assert main(["convert", str(old)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f"converted {old} (format 1) -> {old}", err
    assert open_checkpoint(old).verify() is None
