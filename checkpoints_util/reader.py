"""Read a training checkpoint written by `checkpoints_util.save` outside of training, in ONE process.

Why a separate reader: the tools (inspect, consolidate, export) run on a login node or a laptop, with
no process group, no GPU and often less memory than the model. So this module

- accepts a `step-XXXXXXXX/` folder or a run folder (its newest complete checkpoint is used);
- reads both model layouts that `save.py` writes: `model.pt` (single device / DDP, a plain
  `{"model": state_dict}`) and `model/` (FSDP: a torch.distributed.checkpoint folder of
  `{"model": sharded state_dict}`), the latter with `FileSystemReader` metadata and
  `_load_state_dict_from_keys`, which need no process group (checked on torch 2.13);
- never unpickles code: `torch.load(..., weights_only=True)`, `mmap=True` so a 13B `model.pt` is paged in
  tensor by tensor instead of read whole;
- yields tensors in small groups (`iter_model_tensors`) so an export can stream;
- checks every tensor name and shape against the checkpoint's own `model_config.yaml` BEFORE anything
  is written, and reports the first problem as ONE `CheckpointError` naming the path.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from checkpoints_util.save import CheckpointError, is_complete, latest_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "expected_shapes", "strip_wrappers"]

_STEP_RE = re.compile(r"^step-(\d{8})$")
# Prefixes that wrappers (Fabric, DDP, torch.compile, FSDP, activation checkpointing) can leave in names.
_WRAPPER_PARTS = ("_forward_module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def strip_wrappers(name: str) -> str:
    """litgpt's own parameter name, with wrapper prefixes removed (`module.` only at the start)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith("module."):
        name = name[len("module."):]
    return name


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of `litgpt.GPT(config)`, built on the meta device (no memory)."""
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def _load_config(path: Path):
    from litgpt import Config

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (every checkpoint holds the model's litgpt config)")
    try:
        fields = yaml.safe_load(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"expected a mapping of litgpt.Config fields, got {type(fields).__name__}")
        return Config(**fields)
    except Exception as e:  # yaml errors, unknown fields (TypeError), invalid values
        raise CheckpointError(f"{path}: not a valid litgpt model config: {e}") from None


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def _dcp_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint folder (no .metadata file)")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}/.metadata: unreadable ({type(e).__name__}: {e})") from None


def _dcp_load(path: Path, keys: set[str] | None) -> dict[str, Any]:
    """Load `keys` (flattened DCP keys, e.g. `model.lm_head.weight`) of a DCP folder in this process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        # "torch.distributed is disabled/not initialized ... assuming the intent is to load in a single
        # process": exactly our intent.
        warnings.simplefilter("ignore")
        try:
            return _load_state_dict_from_keys(keys, checkpoint_id=str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _nested_get(tree: dict, dotted_prefix: str, key: str) -> Any:
    """DCP returns nested dicts: the value of flattened key `prefix.key` (key may contain dots)."""
    return tree[dotted_prefix][key]


@dataclass
class Checkpoint:
    """One complete `step-XXXXXXXX/` folder, opened for reading (nothing large is loaded yet)."""

    path: Path
    trainer: dict[str, Any]
    model_config: Any                       # litgpt.Config
    train_config: dict[str, Any] | None     # config.yaml (PretrainConfig.to_dict()), None if absent
    sharded: bool                           # model/ is a torch.distributed.checkpoint folder
    model_path: Path
    optimizer_path: Path | None
    _shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict, repr=False)
    _plain: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _dcp_keys: dict[str, str] = field(default_factory=dict, repr=False)   # litgpt name -> DCP key

    # ------------------------------------------------------------------ model tensors
    def tensor_info(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """litgpt name -> (shape, dtype) of every stored model tensor, without reading the data."""
        if self._shapes:
            return self._shapes
        if self.sharded:
            md = _dcp_metadata(self.model_path)
            for key, meta in md.state_dict_metadata.items():
                if not key.startswith("model.") or not hasattr(meta, "size"):
                    continue
                name = strip_wrappers(key[len("model."):])
                self._dcp_keys[name] = key
                self._shapes[name] = (tuple(meta.size), meta.properties.dtype)
            if not self._shapes:
                raise CheckpointError(f"{self.model_path}: holds no model tensors (expected keys 'model.*')")
        else:
            obj = _torch_load(self.model_path, "model weights")
            sd = obj.get("model") if isinstance(obj, dict) else None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{self.model_path}: expected {{'model': state_dict}} of tensors, "
                                      f"got {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}")
            self._plain = {strip_wrappers(k): v for k, v in sd.items()}
            self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in self._plain.items()}
        return self._shapes

    def validate(self) -> None:
        """Every tensor name and shape must fit `model_config.yaml`; raises one CheckpointError if not."""
        stored = self.tensor_info()
        expected = expected_shapes(self.model_config)
        cfg_file = self.path / "model_config.yaml"
        missing = [n for n in expected if n not in stored]
        extra = [n for n in stored if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) that {cfg_file.name} needs are missing "
                             f"(e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} tensor(s) do not belong to that model (e.g. {', '.join(extra[:3])})")
            raise CheckpointError(f"{self.model_path}: does not match {cfg_file}: " + "; ".join(parts))
        for name, shape in expected.items():
            got = stored[name][0]
            if got != shape:
                raise CheckpointError(
                    f"{self.model_path}: tensor {name!r} has shape {list(got)} but {cfg_file} "
                    f"(n_layer={self.model_config.n_layer}, n_embd={self.model_config.n_embd}, "
                    f"n_head={self.model_config.n_head}, n_query_groups={self.model_config.n_query_groups}, "
                    f"padded_vocab_size={self.model_config.padded_vocab_size}) expects {list(shape)}")

    def model_groups(self) -> list[list[str]]:
        """Parameter names in state-dict order, grouped per transformer block (the streaming unit)."""
        groups: dict[str, list[str]] = {}
        for name in expected_shapes(self.model_config):
            m = re.match(r"^(transformer\.h\.\d+)\.", name)
            groups.setdefault(m.group(1) if m else name, []).append(name)
        return list(groups.values())

    def iter_model_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(litgpt name, full CPU tensor) in state-dict order, loading one block at a time.

        Call `validate()` first. `dtype` casts floating tensors (None keeps the stored dtype).
        """
        self.tensor_info()
        for group in self.model_groups():
            if self.sharded:
                keys = {self._dcp_keys[n] for n in group}
                tree = _dcp_load(self.model_path, keys)
                loaded = {n: _nested_get(tree, "model", self._dcp_keys[n][len("model."):]) for n in group}
            else:
                loaded = {n: self._plain[n] for n in group}
            for n in group:
                t = loaded[n]
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield n, t

    def load_model_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full model state dict by litgpt names (validated), in memory."""
        self.validate()
        return {n: t.contiguous() for n, t in self.iter_model_tensors(dtype)}

    # ------------------------------------------------------------------ optimizer
    def optimizer_kind(self) -> str:
        return str(self.trainer.get("optimizer") or (self.train_config or {}).get("optimizer", {}).get("name")
                   or "unknown")

    def optimizer_state_bytes(self) -> int | None:
        """Bytes of optimizer state tensors (all ranks together), without loading them; None if absent."""
        if self.optimizer_path is None or not self.optimizer_path.exists():
            return None
        if self.optimizer_path.is_dir():
            return sum(_numel(meta.size) * _itemsize(meta.properties.dtype)
                       for _, meta in self._optimizer_dcp_items())
        saved = _torch_load(self.optimizer_path, "optimizer state")
        state = saved.get("state_dict", {}).get("state", {}) if isinstance(saved, dict) else {}
        return sum(v.numel() * v.element_size() for s in state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def _optimizer_dcp_items(self) -> list[tuple[str, Any]]:
        """(DCP key, tensor metadata) of the optimizer state tensors in a DCP folder.

        `optimizer/` (Adam-mini, optim/state.py) holds only optimizer keys; FSDP + AdamW checkpoints keep
        the optimizer inside `model/` (Fabric's sharded save of {"model", "optimizer"}), under
        `optimizer.*` keys. Hyper-parameters are not counted as state.
        """
        md = _dcp_metadata(self.optimizer_path)
        shared = self.optimizer_path == self.model_path
        return [(key, meta) for key, meta in md.state_dict_metadata.items()
                if hasattr(meta, "size") and (not shared or key.startswith("optimizer."))
                and ".hparams" not in key and ".param_groups." not in key]

    def load_optimizer_by_name(self) -> dict[str, Any]:
        """Optimizer state keyed by litgpt parameter name.

        Returns {"kind", "param_groups" (hyper-parameters, no indices), "state": {name: {key: tensor}}}.
        Plain checkpoints: `optimizer.pt`'s index-keyed state mapped through its `param_names`; a
        per-element moment stored flat (Adam-mini's `exp_avg`) is reshaped to its parameter's shape,
        per-block vectors (Adam-mini's `exp_avg_sq`) are kept as they are. FSDP checkpoints: the
        name-keyed `optimizer/` folder (optim/state.py), loaded whole, as stored.
        """
        if self.optimizer_path is None or not self.optimizer_path.exists():
            raise CheckpointError(f"{self.path}: has no optimizer state ({self.trainer.get('optimizer_file')!r} missing)")
        kind = self.optimizer_kind()
        if self.optimizer_path.is_dir():
            md = _dcp_metadata(self.optimizer_path)
            if self.optimizer_path == self.model_path:  # FSDP + AdamW: only the optimizer.* keys
                keys = {k for k in md.state_dict_metadata if k.startswith("optimizer.")}
                if not keys:
                    raise CheckpointError(f"{self.optimizer_path}: holds no optimizer state (no 'optimizer.*' keys)")
                tree = _dcp_load(self.optimizer_path, keys)
            else:
                tree = _dcp_load(self.optimizer_path, None)
            named = tree.get("optimizer", tree)
            if isinstance(named, dict) and isinstance(named.get("state"), dict):
                # FSDP.optim_state_dict (AdamW): {"state": {name: {key: tensor}}, "param_groups": [...]}
                by_name = {strip_wrappers(n): dict(v) for n, v in named["state"].items()}
                groups = [{k: v for k, v in g.items() if k != "params"} for g in named.get("param_groups", [])
                          if isinstance(g, dict)]
                return {"kind": kind, "format": "by_name", "param_groups": groups, "state": by_name}
            if isinstance(named, dict) and isinstance(named.get("exp_avg"), dict):
                # optim/state.py: {"exp_avg": {name: 1-D}, "exp_avg_sq": {name: blocks}, "step": {name}, "hparams"}
                shapes = expected_shapes(self.model_config)
                by_name = {}
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    for name, value in (named.get(key) or {}).items():
                        name = strip_wrappers(name)
                        if key == "exp_avg" and name in shapes and value.numel() == _numel(shapes[name]):
                            value = value.reshape(shapes[name])
                        by_name.setdefault(name, {})[key] = value
                hp = named.get("hparams", {})
                if isinstance(hp, torch.Tensor) or not isinstance(hp, dict):
                    hp = {"hparams": hp}
                hp = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in hp.items()}
                return {"kind": kind, "format": "by_name", "param_groups": [hp], "state": by_name}
            return {"kind": kind, "format": "dcp", "state": tree}
        saved = _torch_load(self.optimizer_path, "optimizer state")
        try:
            sd, names = saved["state_dict"], saved["param_names"]
            groups, state = sd["param_groups"], sd["state"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.optimizer_path}: expected {{'state_dict': optimizer.state_dict(), "
                                  f"'param_names': [...]}}") from None
        shapes = expected_shapes(self.model_config)
        by_name: dict[str, dict[str, torch.Tensor]] = {}
        hyper = []
        for g in groups:
            hyper.append({k: v for k, v in g.items() if k != "params"})
            for idx in g["params"]:
                if idx >= len(names):
                    raise CheckpointError(f"{self.optimizer_path}: parameter index {idx} has no name "
                                          f"({len(names)} names stored)")
                name = strip_wrappers(names[idx])
                if name not in shapes:
                    raise CheckpointError(f"{self.optimizer_path}: state for {name!r}, which is not a parameter "
                                          f"of the model in {self.path / 'model_config.yaml'}")
                entry = {}
                for key, value in state.get(idx, state.get(str(idx), {})).items():
                    if isinstance(value, torch.Tensor):
                        value = value.clone()
                        if value.dim() == 1 and value.numel() == _numel(shapes[name]) and len(shapes[name]) > 1:
                            value = value.view(shapes[name])
                    entry[key] = value
                by_name[name] = entry
        return {"kind": kind, "format": "by_name", "param_groups": hyper, "state": by_name}

    # ------------------------------------------------------------------ files
    def files(self) -> list[tuple[str, int]]:
        """(relative path, bytes) of every file of the checkpoint, sorted."""
        out = []
        for p in sorted(self.path.rglob("*")):
            if p.is_file():
                out.append((str(p.relative_to(self.path)), p.stat().st_size))
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def resolve_path(path: str | Path) -> Path:
    """A complete `step-XXXXXXXX/` folder: the path itself, or a run folder's newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint folder (step-XXXXXXXX/) or a run "
                              f"folder that holds them")
    if _STEP_RE.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (no trainer.json: the save was interrupted)")
        return path
    if re.match(r"^\.(tmp|old)-step-\d{8}$", path.name):
        raise CheckpointError(f"{path}: a partial checkpoint left by an interrupted save; use a step-XXXXXXXX folder")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: not a checkpoint (expected a step-XXXXXXXX folder with trainer.json, or "
                              f"a run folder holding some)")
    return latest


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint (see `resolve_path`); reads only the small JSON/YAML files."""
    path = resolve_path(path)
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'trainer.json'}: unreadable ({e})") from None
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{path / 'trainer.json'}: expected a JSON object")
    model_config = _load_config(path / "model_config.yaml")
    train_config = None
    if (path / "config.yaml").is_file():
        try:
            train_config = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path / 'config.yaml'}: invalid YAML ({e})") from None
    model_file = trainer.get("model_file") or ("model" if (path / "model").is_dir() else "model.pt")
    model_path = path / model_file
    if not model_path.exists():
        raise CheckpointError(f"{model_path}: missing (trainer.json names it as the model file)")
    opt_file = trainer.get("optimizer_file")
    return Checkpoint(path=path, trainer=trainer, model_config=model_config, train_config=train_config,
                      sharded=model_path.is_dir(), model_path=model_path,
                      optimizer_path=path / opt_file if opt_file else None)
