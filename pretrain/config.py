"""The typed pretraining configuration: dataclasses, YAML files and `--section.key value` overrides.

Precedence: the defaults below < `--config FILE` (YAML) < command-line options. Every field is an
option named `--<section>.<field>` (top-level fields: `--<field>`), documented by its `help` metadata;
`python -m pretrain --help` prints them all. Unknown keys and ill-typed values are errors that name
the file (or the option) and the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _opt("tiny", "model config name: debug, tiny, tinyllama-1.1b, llama2-7b, llama2-13b")
    overrides: dict = _opt({}, "litgpt.Config fields to override, as a YAML/JSON mapping, e.g. "
                               "'{n_layer: 4, vocab_size: 8192}'")


@dataclass
class DataConfig:
    dir: str = _opt("out/data/sample", "folder of prepared shards (`python -m data.prepare` output)")
    seq_len: int = _opt(256, "tokens per training sequence (the model sees seq_len inputs, predicts seq_len targets)")
    num_workers: int = _opt(0, "DataLoader worker processes per rank")


@dataclass
class OptimizerConfig:
    name: Literal["adam_mini", "adamw"] = _opt("adam_mini", "adam_mini or adamw (torch AdamW, the baseline)")
    lr: float = _opt(4e-4, "peak learning rate, reached after the warm-up")
    min_lr: float = _opt(4e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(2000, "optimizer steps of linear warm-up from 0 to lr")
    betas: tuple[float, float] = _opt((0.9, 0.95), "Adam betas, e.g. '[0.9, 0.95]'")
    eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.1, "decoupled weight decay (matrices only; norms and biases get none)")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this value; 0 = no clipping (the norm "
                                 "is still computed and reported)")


@dataclass
class TrainConfig:
    global_batch_tokens: int = _opt(2_097_152, "tokens per optimizer step over all ranks; must be a multiple "
                                              "of micro_batch_size * data.seq_len * world size")
    micro_batch_size: int = _opt(8, "sequences per forward/backward on one rank")
    max_tokens: int | None = _opt(None, "stop after this many training tokens (rounded down to whole steps); "
                                        "null = no limit")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps; null = no limit (at least one of "
                                       "max_tokens/max_steps must be set; the cosine schedule ends at the "
                                       "smaller)")


@dataclass
class EvalConfig:
    interval: int = _opt(1000, "run validation every this many steps (and at the end); 0 = only at the end")
    batches: int = _opt(100, "validation batches per rank, the same ones every time")
    micro_batch_size: int | None = _opt(None, "sequences per validation batch; null = train.micro_batch_size")


@dataclass
class CheckpointConfig:
    interval: int = _opt(1000, "save a checkpoint every this many steps (and at the end); 0 = only at the end")
    keep_last: int = _opt(3, "keep the newest K checkpoints, delete older ones; 0 = keep all")


@dataclass
class LoggingConfig:
    interval: int = _opt(10, "steps between console/TensorBoard lines")
    tensorboard: bool = _opt(True, "write TensorBoard events to <out_dir>/tensorboard")
    peak_flops: float | None = _opt(None, "peak FLOP/s of one device for MFU; null = look up the GPU by name "
                                          "(bf16 dense); on CPU MFU is only reported when this is set")


@dataclass
class SystemConfig:
    accelerator: Literal["auto", "cuda", "cpu"] = _opt("auto", "auto = cuda if available, else cpu")
    strategy: Literal["auto", "fsdp", "ddp", "single"] = _opt(
        "auto", "auto = fsdp on GPU; ddp (gloo) on CPU with several processes, else single")
    devices: int = _opt(1, "processes (GPUs) per node")
    num_nodes: int = _opt(1, "number of nodes")
    precision: Literal["auto", "bf16-mixed", "bf16-true", "32-true"] = _opt(
        "auto", "auto = bf16-mixed on GPU, 32-true on CPU")
    activation_checkpointing: bool = _opt(False, "recompute each transformer Block in the backward pass "
                                                 "(FSDP only)")


@dataclass
class DebugConfig:
    nan_at_step: int = _opt(0, "testing aid: make the loss NaN at this step (0 = off); the run must stop "
                               "without saving")
    stop_at_step: int = _opt(0, "testing aid: act as if SIGUSR1 arrived during this step (save, exit 0); 0 = off")


@dataclass
class PretrainConfig:
    out_dir: str = _opt("out/pretrain", "run folder: step-XXXXXXXX/ checkpoints, tensorboard/, train_log.jsonl")
    resume: str = _opt("auto", "auto = continue from the newest complete checkpoint in out_dir (start fresh "
                               "if none); none = start fresh; or the path of a step-XXXXXXXX folder")
    seed: int = _opt(42, "random seed, the same on every rank (weights init, data order)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names where it came from."""


_HINTS = typing.get_type_hints(PretrainConfig)
SECTIONS: dict[str, type] = {name: hint for name, hint in _HINTS.items() if dataclasses.is_dataclass(hint)}


def iter_options() -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type hint, field) for every option, in the order `--help` lists them."""
    out = []
    for f in dataclasses.fields(PretrainConfig):
        hint = _HINTS[f.name]
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            for sub in dataclasses.fields(hint):
                out.append((f"{f.name}.{sub.name}", hints[sub.name], sub))
        else:
            out.append((f.name, hint, f))
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one value against a type hint; raise ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: not a YAML/JSON mapping: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint!r} for {where}")


def apply(cfg: PretrainConfig, values: dict[str, Any], source: str) -> PretrainConfig:
    """Set dotted keys (`train.max_steps`) or nested mappings on `cfg` in place; `source` names the origin."""
    known = {key: (hint, f) for key, hint, f in iter_options()}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        elif key in SECTIONS:
            raise ConfigError(f"{source}: section {key!r} must be a mapping of options, got {value!r}")
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in known:
            section = key.split(".")[0]
            near = [k for k in known if k.startswith(section + ".")] or [k for k in known if "." not in k]
            raise ConfigError(f"{source}: unknown option {key!r}; options here: {', '.join(near)}")
        hint, _ = known[key]
        coerced = _coerce(value, hint, f"{source}: {key}")
        obj = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, coerced)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no hardware. World-size-dependent checks happen in pretrain.loop."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    t, o = cfg.train, cfg.optimizer
    need(t.max_steps is not None or t.max_tokens is not None,
         "train.max_steps and train.max_tokens are both null: set at least one")
    need(t.max_steps is None or t.max_steps > 0, f"train.max_steps must be > 0, got {t.max_steps}")
    need(t.max_tokens is None or t.max_tokens >= t.global_batch_tokens,
         f"train.max_tokens ({t.max_tokens}) is smaller than one step (train.global_batch_tokens = "
         f"{t.global_batch_tokens})")
    need(t.micro_batch_size > 0, "train.micro_batch_size must be > 0")
    need(t.global_batch_tokens > 0, "train.global_batch_tokens must be > 0")
    need(cfg.data.seq_len > 0, "data.seq_len must be > 0")
    need(o.lr > 0 and o.min_lr >= 0, "optimizer.lr must be > 0 and optimizer.min_lr >= 0")
    need(o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) is larger than optimizer.lr ({o.lr})")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
    need(o.grad_clip >= 0, "optimizer.grad_clip must be >= 0 (0 = no clipping)")
    need(all(0 <= b < 1 for b in o.betas), f"optimizer.betas must lie in [0, 1), got {o.betas}")
    for key in ("eval.interval", "checkpoint.interval", "checkpoint.keep_last", "eval.batches"):
        sec, name = key.split(".")
        need(getattr(getattr(cfg, sec), name) >= 0, f"{key} must be >= 0")
    need(cfg.logging.interval > 0, "logging.interval must be > 0")
    need(cfg.system.devices > 0 and cfg.system.num_nodes > 0, "system.devices and system.num_nodes must be > 0")
    need(cfg.resume in ("auto", "none") or Path(cfg.resume).name.startswith("step-"),
         f"resume must be auto, none or a step-XXXXXXXX folder, got {cfg.resume!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain a Llama model with Lightning Fabric (FSDP on GPUs, DDP/single device on CPU) and "
                    "Adam-mini or AdamW. Values come from the defaults, then --config FILE, then the options "
                    "below. Also runs under `fabric run` and SLURM (srun); SIGUSR1 saves a checkpoint and exits 0 "
                    "(requeue), SIGTERM saves and exits 143.",
        formatter_class=argparse.HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with sections like configs/demo.yaml")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    defaults = PretrainConfig()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, hint, f in iter_options():
        section = key.split(".")[0] if "." in key else "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        obj = defaults
        for p in key.split("."):
            obj = getattr(obj, p)
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"config option {key} has no help text")
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
        default = yaml.safe_dump(list(obj) if isinstance(obj, tuple) else obj, default_flow_style=True)
        default = default.strip().removesuffix("...").strip()
        groups[section].add_argument(
            f"--{key}", dest=key, metavar=_metavar(hint), choices=choices,
            help=f"{help_text} (default: {default})".replace("%", "%%"))
    return parser


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return None  # argparse shows the choices
    names = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL", dict: "MAPPING"}
    if hint in names:
        return names[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return "[A, B]"
    return names.get(args[0], "VALUE") if args else "VALUE"


def parse_args(argv: list[str] | None = None) -> tuple[PretrainConfig, bool]:
    """Returns (config, print_config_only)."""
    parser = build_parser()
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    cfg = PretrainConfig()
    config_file = ns.pop("config", None)
    print_only = bool(ns.pop("print_config", False))
    if config_file:
        apply(cfg, load_yaml(config_file), str(config_file))
    apply(cfg, ns, "command line")
    validate(cfg)
    return cfg, print_only


def from_dict(values: dict[str, Any], source: str = "dict") -> PretrainConfig:
    cfg = apply(PretrainConfig(), values, source)
    validate(cfg)
    return cfg
