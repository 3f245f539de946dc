"""The pretraining configuration: --help lists every option, precedence defaults < YAML < CLI, clear
errors, the shipped recipes are valid; the learning-rate schedule against hand-computed values."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import tiny_config
from pretrain.config import ConfigError, PretrainConfig, iter_options, load_yaml, parse_args
from pretrain.loop import plan_steps
from pretrain.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _field_docs() -> dict[str, str]:
    """dotted option -> the docstring under its field, read from the source (independently of jsonargparse)."""
    import ast
    import dataclasses
    import inspect
    import typing

    docs = {}

    def walk(cls, prefix):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[prefix + stmt.target.id] = " ".join(nxt.value.value.split())
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(PretrainConfig, "")
    return docs


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "pretrain", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    keys = [key for key, _ in iter_options()]
    docs = _field_docs()
    assert len(keys) >= 39 and set(keys) <= set(docs), set(keys) - set(docs)  # every option has a docstring
    for key in keys:
        assert f"--{key.removesuffix('_')}" in text, key  # the field init.from_ is the option --init.from
        assert " ".join(docs[key].split()[:4]) in text, key
    for flag in ("--config", "--print_config"):
        assert flag in text


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: {name: debug, overrides: {n_layer: 3}}\n"
                 "optimizer: {lr: 1.0e-3, betas: [0.8, 0.9]}\n"
                 "train: {max_steps: 10, micro_batch_size: 4}\n")
    cfg, print_only = parse_args(["--config", str(y), "--train.max_steps", "20", "--optimizer.eps", "1e-6",
                                  "--logging.tensorboard", "false", "--train.max_tokens", "null"])
    assert not print_only
    assert cfg.model.name == "debug" and cfg.model.overrides == {"n_layer": 3}
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.betas == (0.8, 0.9)  # from YAML
    assert cfg.train.max_steps == 20 and cfg.optimizer.eps == 1e-6        # CLI wins
    assert cfg.train.micro_batch_size == 4 and cfg.logging.tensorboard is False
    assert cfg.train.max_tokens is None
    assert cfg.data.seq_len == PretrainConfig().data.seq_len              # default kept
    # the resolved config round-trips through YAML
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    cfg2, _ = parse_args(["--config", str(again)])
    assert cfg2 == cfg


@pytest.mark.parametrize("text, message", [
    ("train: {max_stepz: 3}\n", "unknown option 'train.max_stepz'"),
    ("trian: {max_steps: 3}\n", "unknown option 'trian'"),
    ("train: {max_steps: three}\n", "train.max_steps: expected an integer"),
    ("optimizer: {name: sgd}\n", "optimizer.name: 'sgd' is not one of adam_mini, adamw"),
    ("optimizer: {betas: [0.9]}\n", "optimizer.betas: expected a list of 2 values"),
    ("optimizer: {adam_mini: {momentum_dtype: fp8}}\n",
     "optimizer.adam_mini.momentum_dtype: 'fp8' is not one of float32, bfloat16"),
    ("model: {name: gpt5}\n", "model.name: 'gpt5' is not one of debug, tiny"),
    ("model: {overrides: {n_lyer: 3}}\n", "model.overrides: 'n_lyer' is not a litgpt.Config field"),
    ("train: 5\n", "section 'train' must be a mapping"),
    ("train: {max_steps: null, max_tokens: null}\n", "set at least one"),
    ("optimizer: {lr: 1.0e-4, min_lr: 1.0e-3}\n", "larger than optimizer.lr"),
    ("optimizer: {lr: .nan}\n", "optimizer.lr must be a finite number > 0"),
    ("eval: {batches: 0}\n", "eval.batches must be > 0"),
    ("data: {num_workers: -1}\n", "data.num_workers must be >= 0"),
    ("logging: {peak_flops: -5}\n", "logging.peak_flops must be > 0 or null"),
])
def test_yaml_errors_name_file_and_key(tmp_path, text, message):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(y), "--train.max_steps", "3"] if "max_steps: null" not in text
                   else ["--config", str(y)])
    assert message in str(err.value)
    if "unknown" in message or "expected" in message or "not one of" in message:
        assert str(y) in str(err.value)


def test_cli_errors_exit_2_with_one_line(capsys):
    from pretrain.__main__ import main

    for argv, message in ((["--train.max_steps", "x"], "command line: train.max_steps: expected an integer, got 'x'"),
                          (["--no_such_option", "1"], "unknown option 'no_such_option'"),
                          (["--config", "/no/such.yaml"], "/no/such.yaml: config file not found"),
                          (["--model.name", "debug", "--model.overrides", "{n_query_groups: 0}",
                            "--train.max_steps", "3"], "model.overrides: "),  # litgpt divides by it
                          (["--optimizer.name", "adamw", "--optimizer.implementation", "native",
                            "--train.max_steps", "3"], "optimizer.implementation=native applies to adam_mini only")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg, _ = parse_args(["--config", str(path)])
    assert set(load_yaml(path)) <= {k.split(".")[0] for k, _ in iter_options()}
    world = cfg.system.devices * cfg.system.num_nodes
    steps = plan_steps(cfg, world)  # raises if the global batch is not divisible
    assert steps.total > cfg.optimizer.warmup_steps
    import models

    mc = models.get_config(cfg.model.name, **cfg.model.overrides)
    assert cfg.data.seq_len <= mc.block_size


def test_expected_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "tinyllama-1.1b.yaml", "llama2-7b.yaml", "llama2-13b.yaml"} <= names


def test_global_batch_must_divide():
    cfg = PretrainConfig()
    cfg.train.global_batch_tokens, cfg.train.micro_batch_size, cfg.data.seq_len = 3000, 2, 256
    cfg.train.max_steps = 5
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size x data.seq_len x world size"):
        plan_steps(cfg, 1)
    cfg.train.global_batch_tokens = 2 * 256 * 3 * 4
    assert plan_steps(cfg, 3).micro_batches == 4
    cfg.train.max_tokens = 2 * 256 * 3 * 4 * 3 + 5  # three whole steps and a bit
    assert plan_steps(cfg, 3).total == 3            # the smaller limit wins
    cfg.train.max_steps = None
    assert plan_steps(cfg, 3).total == 3


def test_schedule_against_hand_computation():
    lr, min_lr, warm, total = 1e-3, 1e-4, 4, 14
    # warm-up: lr * s / warm
    assert [lr_at(s, lr, min_lr, warm, total) for s in (1, 2, 3, 4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # cosine over the 10 steps after warm-up: min + (lr - min) * (1 + cos(pi * k / 10)) / 2
    assert lr_at(9, lr, min_lr, warm, total) == pytest.approx(1e-4 + 9e-4 * 0.5)   # halfway, k = 5
    assert lr_at(6, lr, min_lr, warm, total) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert lr_at(14, lr, min_lr, warm, total) == pytest.approx(1e-4)
    assert lr_at(20, lr, min_lr, warm, total) == 1e-4                                # after the end
    assert lr_at(1, lr, min_lr, 0, total) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 14)) / 2)
    values = [lr_at(s, lr, min_lr, warm, total) for s in range(warm, total + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))                            # strictly decreasing
    with pytest.raises(ValueError):
        lr_at(0, lr, min_lr, warm, total)


def test_print_config(capsys):
    from pretrain.__main__ import main

    assert main(["--print_config", "--model.name", "debug", "--train.max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "name: debug" in out and "max_steps: 3" in out


def test_vocabulary_mismatch_is_refused(data_dir, tmp_path):
    """Refused from the manifest when the stream is built, on every rank alike (rank 1 of 2 here), before any
    batch is read; a batch holding an id beyond the model's embedding (a damaged shard) is refused too."""
    import torch

    from data.errors import DataError
    from data.loader import build_loader
    from pretrain.batches import BatchStream, check_batch
    from pretrain.loop import fit

    loader = build_loader(str(data_dir), "train", 32, 2)
    pieces = loader.vocab_size
    cfg = tiny_config(data_dir, tmp_path / "run", model__overrides={"vocab_size": 1000})
    with pytest.raises(DataError, match=f"tokenised with a {pieces:,}-piece tokenizer .* the model has 1,000 emb"):
        BatchStream(cfg, 1, 2, 1000)
    with pytest.raises(DataError, match="tokenised with a .* the model has 1,000 embeddings"):
        fit(cfg)
    assert not list((tmp_path / "run").glob("step-*"))
    BatchStream(cfg, 1, 2, pieces)  # the tokenizer's own size fits
    with pytest.raises(DataError, match="holds token id 4100, but the model has 4,096 embeddings"):
        check_batch(torch.tensor([[1, 4100]]), 4096, loader)


def test_model_names_match_the_registry():
    import typing

    import models
    from pretrain.config import ModelName

    assert typing.get_args(ModelName) == models.CONFIG_NAMES
