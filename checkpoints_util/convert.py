"""`amp-ckpt convert CKPT`: a checkpoint of format 1 (before the one-DCP-folder format) -> format 2.

Format 1 had three layouts: `model.pt` + `optimizer.pt` (single device, DDP; the optimizer state keyed by
index with a list of parameter names), `model/` + `optimizer/` (FSDP + Adam-mini: DCP folders) and
`model/` alone (FSDP + AdamW: FSDP's optimizer state inside the model's DCP folder), plus one
`rank-XXXXX.pt` per rank with the loader position and RNG state. This module is the only code that still
knows them: it reads one in this process (tensors only, `weights_only=True`, DCP metadata through the
allow-list unpickler) and writes the same state as a format-2 checkpoint (checkpoints_util/store.py).

The data position becomes global (epoch, windows of its order consumed). Format 1 cut epochs into
micro-batches of world size x batch size windows, the current format into whole optimizer steps of
`train.global_batch_tokens / data.seq_len` windows: a position inside an optimizer step (only possible when
a format-1 epoch ended in the middle of one) is rounded up to the next whole step, and a position past the
last whole step of its epoch continues at the next epoch; the converter says how many windows that skips.
The RNG state is dropped (training draws no random numbers).

By default a `step-XXXXXXXX` folder is converted in place: the old folder is kept as
`format1-step-XXXXXXXX/` beside it (delete it once the new one resumed). `--out RUN_DIR` writes the
converted checkpoint into another run folder instead and leaves the old one as it is.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from amp_common import yaml_safe
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


def _name(key: str) -> str:
    from optim.units import canonical_name

    return canonical_name(key)


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
    """(state for the new DCP save, its metadata: trainer.json fields, run config, model config) of a format-1
    checkpoint; each file is read once."""
    trainer = json.loads((path / TRAINER_FILE).read_text())
    config = (yaml_safe.load((path / CONFIG_FILE).read_text()) or {}) if (path / CONFIG_FILE).is_file() else {}
    model_config = load_model_config(path / MODEL_CONFIG_FILE)
    shapes = expected_shapes(model_config)
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
    data, skipped = _data_position(_torch_load(path / "rank-00000.pt")["loader"], config)
    state = {"model": model, "optimizer": optimizer, "data": data,
             "trainer": {"step": torch.tensor(trainer["step"]), "tokens_seen": torch.tensor(trainer["tokens_seen"])}}
    keep = ("tokens_seen", "world_size", "strategy", "precision", "optimizer", "model_name", "loss", "val_loss",
            "reason")
    fields = {k: trainer.get(k) for k in keep} | {"converted_from_format": 1, "windows_skipped": skipped}
    return state, {"trainer": fields, "config": config, "model_config": dataclasses.asdict(model_config)}


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


def _data_position(loader: dict, config: dict) -> tuple[dict[str, torch.Tensor], int]:
    """Format 1 counted each rank's micro-batches of world_size x batch_size windows; format 2 keeps the epoch
    and the windows of its order consumed, in whole optimizer steps (see the module docstring). Returns the
    state and how many windows the rounding skips."""
    seq_len = int(loader["seq_len"])
    windows = (int(loader["num_tokens"]) - 1) // seq_len
    per_batch = int(loader["world_size"]) * int(loader["batch_size"])
    epoch, batches = divmod(int(loader["batches_consumed"]), windows // per_batch)
    position = batches * per_batch
    train = config.get("train") or {}
    step = int(train.get("global_batch_tokens", per_batch * seq_len)) // seq_len  # windows per optimizer step
    rounded = -(-position // step) * step
    if rounded > (windows // step) * step:  # past the epoch's last whole step: the next epoch
        epoch, rounded, skipped = epoch + 1, 0, windows - position
    else:
        skipped = rounded - position
    values = dict(version=2, epoch=epoch, position=rounded,
                  windows_consumed=int(loader["batches_consumed"]) * per_batch + skipped,
                  seed=loader["seed"], shuffle=int(bool(loader["shuffle"])), seq_len=seq_len,
                  num_tokens=loader["num_tokens"])
    return {k: torch.tensor(int(v), dtype=torch.int64) for k, v in values.items()}, skipped


def _format(path: Path) -> int | None:
    try:
        trainer = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({' '.join(str(e).split())})") from None
    return trainer.get("format") if isinstance(trainer, dict) else None


def convert(path: Path, out_run: Path | None, quiet: bool = False) -> Path:
    """Convert one format-1 checkpoint; returns the new checkpoint's folder. Nothing is left behind on errors."""
    fmt = _format(path)
    if fmt != 1:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r}; only format 1 needs converting")
    kept = path.with_name(f"format1-{path.name}")
    if out_run is None and kept.exists():
        raise CheckpointError(f"{kept}: already exists (an earlier conversion?); move it away first")
    try:
        state, meta = read_format1(path)
    except (OSError, KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not a readable format-1 checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
    step = int(state["trainer"]["step"])
    if out_run is not None:
        out_run.mkdir(parents=True, exist_ok=True)
        result = store.save_checkpoint(out_run, step, state, meta)
    else:  # in place: build beside it, keep the old folder as format1-step-XXXXXXXX
        work = Path(tempfile.mkdtemp(prefix=f".convert-{path.name}-", dir=path.parent))
        try:
            new = store.save_checkpoint(work, step, state, meta)
            path.rename(kept)
            new.rename(path.parent / step_dir_name(step))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result = path.parent / step_dir_name(step)
    if not quiet:
        skipped = meta["trainer"]["windows_skipped"]
        print(f"converted {path} (format 1) -> {result}" + (f"; the data position moved {skipped} windows on to a "
                                                           f"whole optimizer step" if skipped else ""), file=sys.stderr)
    return result


def run(args) -> int:
    path = Path(args.checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    todo = [path] if step_of(path) is not None else [p for p in list_checkpoints(path) if _format(p) == 1]
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

