"""`--init.from PATH`: a fresh run that starts from the weights of an imported folder or of any checkpoint.

- PATH: a folder written by `amp-ckpt import` (Hugging Face or litgpt weights), a `step-XXXXXXXX/`
  checkpoint, or a run folder (its newest checkpoint). Its files are verified (sha256) before loading.
- The model config is PATH's `model_config.yaml`. `model.name` / `model.overrides`, when set (other than
  their defaults), must describe the same model: one line naming the fields that differ.
- Only the weights are loaded (the checkpoint's "model" entry, through the allow-list metadata reader; DCP
  reshards them straight into the FSDP/FSDP2 shards, no rank holds the whole model); the run starts at
  step 0 with a fresh optimizer state (zero moments: keep a warm-up), data position and schedule.
- When out_dir already holds checkpoints, the resume wins (`--resume auto`) and a line says so: a requeued
  run continues, it never restarts from PATH (which may even be gone by then).
- The data must be tokenised for this model: as for every run its vocabulary must fit the embedding
  (pretrain/batches.py), and when PATH comes with tokenizer files (`tokenizer.model`, `tokenizer.json`)
  the data's manifest must record one of them (sha256).
- The start-up line and trainer.json of every checkpoint of the run (`init_from`) record PATH and the sha256
  of its trainer.json, which lists the sha256 of every file of PATH (and, for an import, of its sources).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from amp_common.checksum import file_sha256
from checkpoints_util import store
from checkpoints_util.layout import MODEL_CONFIG_FILE, TRAINER_FILE, CheckpointError, list_checkpoints
from pretrain import config
from pretrain.config import ConfigError, PretrainConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def path_of(cfg: PretrainConfig) -> Path | None:
    return None if cfg.init.from_ is None else Path(cfg.init.from_)


def resolve(path: Path) -> Path:
    """The checkpoint folder PATH names (a run folder: its newest checkpoint)."""
    from checkpoints_util.reader import resolve_path

    try:
        return resolve_path(path)
    except CheckpointError as e:
        raise CheckpointError(f"init.from: {e}") from None


def model_config(cfg: PretrainConfig):
    """The run's litgpt.Config: PATH's with init.from, else the named config with its overrides."""
    from checkpoints_util.reader import load_model_config

    path = path_of(cfg)
    if path is None:
        return config.model_config(cfg)
    try:
        folder = resolve(path)
    except CheckpointError:
        existing = list_checkpoints(Path(cfg.out_dir)) if cfg.resume != "none" else []
        if not existing:
            raise
        folder = existing[-1]  # PATH is gone, but the run has checkpoints and will resume: their model
    loaded = load_model_config(folder / MODEL_CONFIG_FILE)
    _check_model_section(cfg, loaded, folder)
    return loaded


def _check_model_section(cfg: PretrainConfig, loaded, folder: Path) -> None:
    default = config.ModelConfig()
    if cfg.model.name == default.name and not cfg.model.overrides:
        return
    named = dataclasses.asdict(config.model_config(cfg))
    theirs = dataclasses.asdict(loaded)
    diff = [k for k in named if k != "name" and named[k] != theirs.get(k)]
    if diff:
        raise ConfigError(
            f"init.from={folder}: its model ({folder / MODEL_CONFIG_FILE}) differs from model.name={cfg.model.name} "
            f"with model.overrides {cfg.model.overrides or '{}'} in "
            + ", ".join(f"{k} ({theirs.get(k)!r} vs {named[k]!r})" for k in diff[:5])
            + "; leave model.name and model.overrides unset: the model comes from init.from")


def start(cfg: PretrainConfig, fabric, model, resumed_from: Path | None) -> dict | None:
    """Load PATH's weights into the (sharded) model of a fresh run (collective). Returns what trainer.json
    records as `init_from`; a resumed run keeps the record of the checkpoint it resumed from."""
    path = path_of(cfg)
    if resumed_from is not None:
        if path is not None:
            fabric.print(f"init.from={path} not used: {cfg.out_dir} holds checkpoints and the run resumed from "
                         f"{resumed_from.name} (init.from only starts a fresh run; use another out_dir to start over)")
        return store.read_trainer(resumed_from).get("init_from")
    if path is None:
        return None
    from pretrain.checkpoint import ModelState
    from pretrain.strategy import state_dict_module

    folder = resolve(path)
    _check_tokenizer(cfg, folder)
    problem = store.verify(folder)
    if problem:
        raise CheckpointError(f"init.from: {problem}")
    trainer = store.load_checkpoint(folder, {"model": ModelState(state_dict_module(model))})
    record = {"path": str(folder.resolve()), "sha256": file_sha256(folder / TRAINER_FILE), "step": trainer["step"]}
    origin = f"step {trainer['step']} of a training run"
    source = trainer.get("source")
    if isinstance(source, dict) and source.get("path"):
        record["source"] = source["path"]
        origin = f"imported from {source.get('format')} weights {source['path']}"
    fabric.print(f"initial weights from {folder} ({origin}; trainer.json sha256 {record['sha256']}): step 0, fresh "
                 f"optimizer state, data position and schedule")
    return record


def _check_tokenizer(cfg: PretrainConfig, folder: Path) -> None:
    """The data's tokenizer (its manifest's sha256) must be one that comes with the weights, if any do."""
    manifest = Path(cfg.data.dir) / "train" / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text())["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the data's own checks name a missing or bad manifest
    theirs = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if theirs and recorded not in {file_sha256(f) for f in theirs}:
        raise ConfigError(f"data.dir={cfg.data.dir} was tokenised with another tokenizer (sha256 {recorded[:12]}... in "
                          f"{manifest}) than the one that comes with init.from ({', '.join(map(str, theirs))}): "
                          f"prepare the data with it")
