"""Read a training checkpoint outside of training, in ONE process (inspect, consolidate, export, convert).

The tools run on a login node or a laptop, with no process group, no GPU and often less memory than the
model. So this module

- accepts a `step-XXXXXXXX/` folder or a run folder (its newest complete checkpoint is used);
- reads the one checkpoint format (checkpoints_util/store.py: a torch.distributed.checkpoint folder,
  whatever strategy and world size wrote it) with DCP in this process, through the metadata reader that
  unpickles nothing but DCP's own metadata classes (tensor files are read with `weights_only=True`);
- yields tensors one transformer block at a time (`iter_model_tensors`), so an export can stream;
- checks every tensor name and shape against the checkpoint's own `model_config.yaml` BEFORE anything is
  written, and reports the first problem as ONE `CheckpointError` naming the path.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from amp_common import yaml_safe
from amp_common.quiet import quiet_checkpoint_warnings
from amp_common.tensors import nbytes, numel
from checkpoints_util import store
from checkpoints_util.layout import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    PARTIAL_RE,
    TRAINER_FILE,
    CheckpointError,
    is_complete,
    latest_checkpoint,
    step_of,
)

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "expected_shapes"]


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of `litgpt.GPT(config)`, built on the meta device (no memory)."""
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def load_model_config(path: Path):
    """The litgpt.Config of `model_config.yaml`; one CheckpointError naming the file if it is not one."""
    from litgpt import Config

    from models.configs import check_shape

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (every checkpoint holds the model's litgpt config)")
    try:
        fields = yaml_safe.load(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"expected a mapping of litgpt.Config fields, got {type(fields).__name__}")
        try:
            config = Config(**fields)
        except AssertionError:  # litgpt's bare asserts (n_head % n_query_groups, n_embd % n_head): name the fields
            raise ValueError(f"n_query_groups ({fields.get('n_query_groups')}) must divide n_head "
                             f"({fields.get('n_head')}), and n_head must divide n_embd ({fields.get('n_embd')}) when "
                             f"head_size is not given") from None
        check_shape(dataclasses.asdict(config))  # the same checks as a run's model.overrides
        return config
    except Exception as e:  # yaml errors, unknown fields (TypeError), invalid values
        raise CheckpointError(f"{path}: not a valid litgpt model config: "
                              f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None


def load_keys(path: Path, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill `targets` ({flattened DCP key: tensor of the stored shape}) from the DCP folder, in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with quiet_checkpoint_warnings():
            dcp.load(targets, storage_reader=store.safe_reader(path), no_dist=True)
    except (Exception, CheckpointException) as e:
        cause = store.root_cause(e)
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(cause).__name__}: "
                              f"{' '.join(str(cause).split())[:300]})") from None
    return targets


@dataclass
class Checkpoint:
    path: Path
    trainer: dict[str, Any]
    model_config: Any                       # litgpt.Config
    train_config: dict[str, Any] | None     # config.yaml (PretrainConfig.to_dict()), None if absent
    _meta: Any = field(default=None, repr=False)

    @property
    def metadata(self):
        """DCP metadata: every stored key with its global shape and dtype (no tensor data read)."""
        if self._meta is None:
            self._meta = store.read_metadata(self.path)
        return self._meta

    def _entries(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: m for k, m in self.metadata.state_dict_metadata.items()
                if k.startswith(prefix) and hasattr(m, "size")}

    # ------------------------------------------------------------------ model tensors
    def tensor_info(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """litgpt name -> (shape, dtype) of every stored model tensor, without reading the data."""
        info = {name: (tuple(m.size), m.properties.dtype) for name, m in self._entries("model.").items()}
        if not info:
            raise CheckpointError(f"{self.path}: holds no model tensors (expected keys 'model.*')")
        return info

    def validate(self) -> None:
        """Every tensor name and shape must fit `model_config.yaml`; raises one CheckpointError if not."""
        objects = [k for k, m in self.metadata.state_dict_metadata.items() if not hasattr(m, "size")]
        if objects:
            raise CheckpointError(f"{self.path}: entry {objects[0]!r} is a pickled object, not a tensor (a checkpoint "
                                  f"holds tensors only; refused)")
        stored = self.tensor_info()
        cfg_file = self.path / MODEL_CONFIG_FILE
        blocks = {m.group(1) for n in stored if (m := re.match(r"^transformer\.h\.(\d+)\.", n))}
        if len(blocks) != self.model_config.n_layer:  # before building a model of n_layer blocks (which may be huge)
            raise CheckpointError(f"{self.path}: does not match {cfg_file}: it says n_layer={self.model_config.n_layer}"
                                  f", the checkpoint holds {len(blocks)} transformer blocks")
        try:
            expected = expected_shapes(self.model_config)
        except Exception as e:  # noqa: BLE001 - litgpt cannot build that model: the config is not a valid one
            raise CheckpointError(f"{cfg_file}: not a valid litgpt model config ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]})") from None
        missing = [n for n in expected if n not in stored]
        extra = [n for n in stored if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) that {cfg_file.name} needs are missing "
                             f"(e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} tensor(s) do not belong to that model (e.g. {', '.join(extra[:3])})")
            raise CheckpointError(f"{self.path}: does not match {cfg_file}: " + "; ".join(parts))
        for name, shape in expected.items():
            got = stored[name][0]
            if got != shape:
                c = self.model_config
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has shape {list(got)} but {cfg_file} (n_layer={c.n_layer}, "
                    f"n_embd={c.n_embd}, n_head={c.n_head}, n_query_groups={c.n_query_groups}, "
                    f"padded_vocab_size={c.padded_vocab_size}) expects {list(shape)}")

    def model_groups(self) -> list[list[str]]:
        """Parameter names in state-dict order, grouped per transformer block (the streaming unit)."""
        groups: dict[str, list[str]] = {}
        for name in expected_shapes(self.model_config):
            m = re.match(r"^(transformer\.h\.\d+)\.", name)
            groups.setdefault(m.group(1) if m else name, []).append(name)
        return list(groups.values())

    def iter_model_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(litgpt name, full CPU tensor) in state-dict order, loading one block at a time.

        Call `validate()` first. `dtype` casts floating tensors (None keeps the stored dtype)."""
        info = self.tensor_info()
        for group in self.model_groups():
            loaded = load_keys(self.path, {f"model.{n}": torch.empty(info[n][0], dtype=info[n][1]) for n in group})
            for n in group:
                t = loaded[f"model.{n}"]
                yield n, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    # ------------------------------------------------------------------ optimizer
    def optimizer_kind(self) -> str:
        section = (self.train_config or {}).get("optimizer")
        return str(self.trainer.get("optimizer") or (section.get("name") if isinstance(section, dict) else None)
                   or "unknown")

    def optimizer_state_bytes(self) -> int | None:
        """Bytes of optimizer state tensors (exp_avg, exp_avg_sq, step), without loading them; None if absent."""
        entries = {k: m for k, m in self._entries("optimizer.").items() if not k.startswith("hparams.")}
        return sum(nbytes(m.size, m.properties.dtype) for m in entries.values()) if entries else None

    def load_optimizer_by_name(self) -> dict[str, Any]:
        """Optimizer state keyed by litgpt parameter name, loaded whole.

        Returns {"kind", "param_groups": [hyper-parameters], "state": {name: {"exp_avg": parameter-shaped,
        "exp_avg_sq": parameter-shaped (AdamW) or one entry per block (Adam-mini), "step": scalar}}}."""
        entries = self._entries("optimizer.")
        if not entries:
            raise CheckpointError(f"{self.path}: has no optimizer state (no 'optimizer.*' keys)")
        loaded = load_keys(self.path, {f"optimizer.{k}": torch.empty(tuple(m.size), dtype=m.properties.dtype)
                                       for k, m in entries.items()})
        shapes = expected_shapes(self.model_config)
        state: dict[str, dict[str, torch.Tensor]] = {}
        hparams = {}
        for key, value in loaded.items():
            kind, _, name = key[len("optimizer."):].partition(".")
            if kind == "hparams":
                hparams[name] = value.item()
                continue
            if name in shapes and value.numel() == numel(shapes[name]) and kind in ("exp_avg", "exp_avg_sq"):
                value = value.reshape(shapes[name])
            state.setdefault(name, {})[kind] = value
        return {"kind": self.optimizer_kind(), "param_groups": [hparams], "state": state}

    # ------------------------------------------------------------------ files
    def files(self) -> list[tuple[str, int]]:
        """(relative path, bytes) of every file of the checkpoint, sorted."""
        return [(str(p.relative_to(self.path)), p.stat().st_size) for p in sorted(self.path.rglob("*"))
                if p.is_file()]

    def verify(self) -> str | None:
        """None when every file matches the sha256 recorded at save time, else one line naming the first bad one."""
        return store.verify(self.path)


def resolve_path(path: str | Path) -> Path:
    """A complete `step-XXXXXXXX/` folder: the path itself, or a run folder's newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint folder (step-XXXXXXXX/) or a run "
                              f"folder that holds them")
    if step_of(path) is not None:
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (no trainer.json: the save was interrupted)")
        return path
    if PARTIAL_RE.match(path.name):
        raise CheckpointError(f"{path}: a partial checkpoint left by an interrupted save; use a step-XXXXXXXX folder")
    if (path / TRAINER_FILE).is_file():  # a checkpoint folder by another name (`amp-ckpt import` writes them)
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: not a checkpoint (expected a step-XXXXXXXX folder with trainer.json, or "
                              f"a run folder holding some)")
    return latest


def open_checkpoint(path: str | Path, verify: bool = False) -> Checkpoint:
    """Open a checkpoint (see `resolve_path`); reads only the small JSON/YAML files, and with `verify` first checks
    every file against the sha256 recorded at save time (reads all of it; one CheckpointError naming a bad file)."""
    path = resolve_path(path)
    trainer = store.read_trainer(path)
    if verify:
        problem = store.verify(path)
        if problem:
            raise CheckpointError(problem)
    model_config = load_model_config(path / MODEL_CONFIG_FILE)
    train_config = None
    if (path / CONFIG_FILE).is_file():
        try:
            train_config = yaml_safe.load((path / CONFIG_FILE).read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path / CONFIG_FILE}: invalid YAML ({' '.join(str(e).split())[:300]})") from None
        if train_config is not None and not isinstance(train_config, dict):
            raise CheckpointError(f"{path / CONFIG_FILE}: not a training config (a {type(train_config).__name__}, "
                                  f"expected a mapping)")
    return Checkpoint(path=path, trainer=trainer, model_config=model_config, train_config=train_config)
