"""`amp-ckpt convert CKPT`: a checkpoint of format 1 (before the one-DCP-folder format) -> format 2.

Format 1 had three layouts: `model.pt` + `optimizer.pt` (single device, DDP; the optimizer state keyed by
index with a list of parameter names), `model/` + `optimizer/` (FSDP + Adam-mini: DCP folders) and
`model/` alone (FSDP + AdamW: FSDP's optimizer state inside the model's DCP folder), plus one
`rank-XXXXX.pt` per rank with the loader position and RNG state. This module is the only code that still
knows them: it reads one in this process (tensors only, `weights_only=True`, DCP metadata through the
allow-list unpickler) and writes the same state as a format-2 checkpoint (checkpoints_util/store.py).

The data position becomes global (epoch, windows of its order consumed): exact, except that a run whose
old position lies past the end of an epoch in the new scheme (which counts whole optimizer steps per
epoch) continues at the next epoch. The RNG state is dropped (training draws no random numbers).

By default a `step-XXXXXXXX` folder is converted in place: the old folder is kept as
`format1-step-XXXXXXXX/` beside it (delete it once the new one resumed). `--out RUN_DIR` writes the
converted checkpoint into another run folder instead and leaves the old one as it is.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from checkpoints_util import store
from checkpoints_util.layout import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    TRAINER_FILE,
    CheckpointError,
    list_checkpoints,
    step_dir_name,
    step_of,
)
from checkpoints_util.reader import expected_shapes, load_keys, load_model_config

_WRAPPERS = ("_forward_module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _name(key: str) -> str:
    for part in _WRAPPERS:
        key = key.replace(part, "")
    return key.removeprefix("module.")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, refused pickle, ...
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _dcp_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` of a DCP folder, loaded whole (bytes entries are never read)."""
    meta = store.read_metadata(folder).state_dict_metadata
    keys = {k: m for k, m in meta.items() if k.startswith(prefix) and hasattr(m, "size")}
    return load_keys(folder, {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in keys.items()})


def read_format1(path: Path) -> tuple[dict, dict]:
    """(state for the new DCP save, trainer.json fields) of a format-1 checkpoint."""
    trainer = json.loads((path / TRAINER_FILE).read_text())
    config = yaml.safe_load((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    shapes = expected_shapes(load_model_config(path / MODEL_CONFIG_FILE))
    model_file, opt_file = path / trainer["model_file"], path / trainer["optimizer_file"]
    if model_file.is_dir():
        model = {_name(k[len("model."):]): v for k, v in _dcp_tensors(model_file, "model.").items()}
    else:
        model = {_name(k): v for k, v in _torch_load(model_file)["model"].items()}
    if opt_file.is_dir() and opt_file.name == "optimizer":      # FSDP + Adam-mini: already keyed by name
        flat = _dcp_tensors(opt_file, "optimizer.")
        optimizer = {}
        for key, value in flat.items():
            kind, _, name = key[len("optimizer."):].partition(".")
            optimizer.setdefault(kind, {})[name if kind == "hparams" else _name(name)] = value
    elif opt_file.is_dir():                                     # FSDP + AdamW: FSDP.optim_state_dict in model/
        optimizer = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        for key, value in _dcp_tensors(opt_file, "optimizer.state.").items():
            name, _, kind = key[len("optimizer.state."):].rpartition(".")
            optimizer[kind][_name(name)] = value.reshape(-1) if kind != "step" else value.reshape(())
    else:
        optimizer = _optimizer_pt(_torch_load(opt_file), opt_file)
    optimizer["hparams"] = _hparams(optimizer.get("hparams"), config)
    missing = [n for n in shapes if n not in model or n not in optimizer["exp_avg"]]
    if missing:
        raise CheckpointError(f"{path}: holds no model or optimizer state for {missing[:3]}")
    data = _data_position(_torch_load(path / "rank-00000.pt")["loader"])
    state = {"model": model, "optimizer": optimizer, "data": data,
             "trainer": {"step": torch.tensor(trainer["step"]), "tokens_seen": torch.tensor(trainer["tokens_seen"])}}
    keep = ("tokens_seen", "world_size", "strategy", "precision", "optimizer", "model_name", "loss", "val_loss",
            "reason")
    return state, {k: trainer.get(k) for k in keep} | {"converted_from_format": 1}


def _optimizer_pt(saved: dict, where: Path) -> dict:
    """optimizer.pt (index-keyed torch state dict + parameter names) -> name-keyed 1-D state."""
    try:
        sd, names = saved["state_dict"], saved["param_names"]
        out = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        for group in sd["param_groups"]:
            for idx in group["params"]:
                for kind, value in sd["state"][idx].items():
                    out[kind][_name(names[idx])] = value.reshape(()) if kind == "step" else value.reshape(-1)
        return out
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{where}: not a format-1 optimizer file ({type(e).__name__}: {e})") from None


def _hparams(stored: dict | None, config: dict) -> dict[str, torch.Tensor]:
    if stored:
        return stored
    o = config.get("optimizer", {})
    betas = o.get("betas", [0.9, 0.95])
    values = dict(lr=o.get("lr", 0.0), beta1=betas[0], beta2=betas[1], eps=o.get("eps", 1e-8),
                  weight_decay=o.get("weight_decay", 0.0))
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


def _data_position(loader: dict) -> dict[str, torch.Tensor]:
    """Format 1 counted each rank's micro-batches of world_size x batch_size windows; format 2 keeps the
    epoch and the windows of its order consumed, whatever the world size."""
    windows = (int(loader["num_tokens"]) - 1) // int(loader["seq_len"])
    per_batch = int(loader["world_size"]) * int(loader["batch_size"])
    epoch, batches = divmod(int(loader["batches_consumed"]), windows // per_batch)
    values = dict(epoch=epoch, position=batches * per_batch,
                  windows_consumed=int(loader["batches_consumed"]) * per_batch,
                  seed=loader["seed"], shuffle=int(bool(loader["shuffle"])), seq_len=loader["seq_len"],
                  num_tokens=loader["num_tokens"])
    return {k: torch.tensor(int(v), dtype=torch.int64) for k, v in values.items()}


def convert(path: Path, out_run: Path | None, quiet: bool = False) -> Path:
    """Convert one format-1 checkpoint; returns the new checkpoint's folder."""
    try:
        trainer = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({e})") from None
    if trainer.get("format") != 1:
        raise CheckpointError(f"{path}: checkpoint format {trainer.get('format')!r}; only format 1 needs converting")
    state, fields = read_format1(path)
    meta = {"trainer": fields, "config": yaml.safe_load((path / CONFIG_FILE).read_text() or "{}")
            if (path / CONFIG_FILE).is_file() else {},
            "model_config": yaml.safe_load((path / MODEL_CONFIG_FILE).read_text())}
    step = trainer["step"]
    if out_run is not None:
        out_run.mkdir(parents=True, exist_ok=True)
        result = store.save_checkpoint(out_run, step, state, meta)
    else:  # in place: build beside it, keep the old folder as format1-step-XXXXXXXX
        work = path.parent / f".convert-{path.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        new = store.save_checkpoint(work, step, state, meta)
        kept = path.with_name(f"format1-{path.name}")
        path.rename(kept)
        new.rename(path.parent / step_dir_name(step))
        shutil.rmtree(work)
        result = path.parent / step_dir_name(step)
    if not quiet:
        print(f"converted {path} (format 1) -> {result}", file=sys.stderr)
    return result


def run(args) -> int:
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    todo = [path] if step_of(path) is not None else [p for p in list_checkpoints(path)
                                                     if json.loads((p / TRAINER_FILE).read_text()).get("format") == 1]
    if not todo:
        raise CheckpointError(f"{path}: holds no checkpoint of format 1")
    for p in todo:
        convert(p, Path(args.out) if args.out else None, quiet=args.quiet)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints of format 1 (model.pt / model/ + optimizer) to the "
                                       "current format", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CKPT", help="a step-XXXXXXXX folder, or a run folder (all its format-1 "
                                                      "checkpoints)")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="write the converted checkpoints into this run folder (default: in place, keeping the old "
                        "folder as format1-step-XXXXXXXX)")
    p.add_argument("--quiet", action="store_true", help="no output")
    p.set_defaults(func=run)

