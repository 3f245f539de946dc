"""Helpers shared by tests/test_pretrain_*.py: a small prepared slice of the sample corpus and a tiny
`debug`-model config. (Collected by pytest but holds no tests.)"""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import torch

from data.prepare import prepare_split
from pretrain.config import PretrainConfig, from_dict

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TOKENIZER = SAMPLE / "tokenizer.model"


def _head(src: Path, dst: Path, n_docs: int) -> Path:
    with gzip.open(src, "rb") as f, gzip.open(dst, "wb") as g:
        for i, line in enumerate(f):
            if i >= n_docs:
                break
            g.write(line)
    return dst


def prepare_small(root: Path) -> Path:
    """40 train / 4 val documents of the embedded sample, tokenised with the sample tokenizer."""
    out = root / "data"
    if (out / "val" / "manifest.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    train = _head(SAMPLE / "c4-train.00000-of-00001.json.gz", root / "train.json.gz", 40)
    val = _head(SAMPLE / "c4-validation.00000-of-00001.json.gz", root / "val.json.gz", 4)
    prepare_split("train", [train], TOKENIZER, out, workers=1, progress=False)
    prepare_split("val", [val], TOKENIZER, out, workers=1, progress=False)
    return out


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> PretrainConfig:
    """debug model, 2 micro-batches of 2 x 32 tokens per step, checkpoints every 3 steps."""
    values = {
        "out_dir": str(out_dir), "resume": "auto", "seed": 7,
        "model": {"name": "debug"},
        "data": {"dir": str(data_dir), "seq_len": 32},
        "optimizer": {"name": "adam_mini", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"global_batch_tokens": 128, "micro_batch_size": 2, "max_steps": 6},
        "eval": {"interval": 3, "batches": 2},
        "checkpoint": {"interval": 3, "keep_last": 0},
        "logging": {"interval": 1, "tensorboard": False},
        "system": {"accelerator": "cpu"},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            values.setdefault(section, {})[name] = value
        else:
            values[section] = value
    return from_dict(values, "test")


def cli_args(cfg: PretrainConfig) -> list[str]:
    """The same configuration as command-line options."""
    args = []
    for key, value in _flatten(cfg.to_dict()):
        args += [f"--{key}", value if isinstance(value, str) else _yaml_inline(value)]
    return args


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _yaml_inline(v) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def popen_pretrain(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, needle: str, lines: list[str], timeout_s: float = 120) -> bool:
    """Read the child's output until a line contains `needle` (True) or the child ends (False)."""
    import time

    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return True
        if time.monotonic() > deadline:
            return False
    return False


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
