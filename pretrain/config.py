"""The typed pretraining configuration: dataclasses parsed by jsonargparse, as litgpt's `args.py` does.

Precedence: the defaults below < `--config FILE` (YAML) < `--section.key value` options. Each field's
docstring is its `--help` text. An unknown key, an ill-typed value or a value that cannot work is one
`ConfigError` that names the file (or "command line") and the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from amp_common import yaml_safe

# = models.CONFIG_NAMES (tested)
ModelName = Literal["debug", "tiny", "tinyllama-1.1b", "llama2-7b", "llama2-13b", "llama3.2-1b"]


@dataclass
class ModelConfig:
    name: ModelName = "tiny"
    """named model config (models/configs.py)"""
    overrides: dict = field(default_factory=dict)
    """litgpt.Config fields to override, as a YAML/JSON mapping, e.g. '{n_layer: 4, vocab_size: 8192}'; a shape
    that cannot work (a size < 1, n_query_groups not dividing n_head) is refused naming the field"""


@dataclass
class InitConfig:
    from_: Optional[str] = None
    """start a fresh run from these weights (pretrain/init_from.py): a folder written by `amp-ckpt import`
    (Hugging Face or litgpt weights) or any checkpoint of ours (a step-XXXXXXXX folder, or a run folder: its
    newest), weights only: step 0, fresh optimizer state, data position and schedule. The model config comes
    from it (model.name / model.overrides, if set, must agree). Checkpoints already in out_dir win (resume
    auto). The option is init.from (the field is from_: `from` is a Python keyword); null = random weights"""


@dataclass
class DataConfig:
    dir: str = "out/data/sample"
    """folder of prepared shards (`python -m data.prepare` output)"""
    seq_len: int = 256
    """tokens per training sequence (the model sees seq_len inputs and predicts seq_len targets)"""
    num_workers: int = 0
    """DataLoader worker processes per rank"""


@dataclass
class AdamMiniConfig:
    embedding_blocks: Literal["tokens", "elements"] = "tokens"
    """v blocks of wte and lm_head: one per token (row; the reference's layout) or one per element (plain
    Adam there, costs 2·V·d·4 more bytes)"""
    value_blocks: Literal["rows", "whole"] = "rows"
    """v blocks of the V part of each attn.qkv: one per row (output neuron; the reference's layout) or one
    for the whole V of the layer"""
    momentum_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the first moment m (bfloat16: rounded to nearest even on every write; state 2 bytes per
    parameter instead of 4)"""


@dataclass
class OptimizerConfig:
    name: Literal["adam_mini", "adamw"] = "adam_mini"
    """adam_mini, or adamw (torch's AdamW, the baseline)"""
    lr: float = 4e-4
    """peak learning rate, reached after the warm-up"""
    min_lr: float = 4e-5
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 2000
    """optimizer steps of linear warm-up from 0 to lr"""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas, e.g. '[0.9, 0.95]'"""
    eps: float = 1e-8
    """Adam epsilon"""
    weight_decay: float = 0.1
    """decoupled weight decay (matrices only; norms and biases get none)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value; 0 = no clipping (the norm is still reported)"""
    implementation: Literal["auto", "native", "compiled", "eager"] = "auto"
    """Adam-mini's update path: native (C++ CPU kernel), compiled (torch.compile), eager (PyTorch ops);
    auto = native for whole-block CPU units, compiled for large models elsewhere, else eager. adamw: auto"""
    adam_mini: AdamMiniConfig = field(default_factory=AdamMiniConfig)
    """Adam-mini's block partition and state dtype"""


@dataclass
class TrainConfig:
    global_batch_tokens: int = 2_097_152
    """tokens per optimizer step over all ranks; a multiple of micro_batch_size × data.seq_len × world size"""
    micro_batch_size: int = 8
    """sequences per forward/backward on one rank"""
    max_tokens: Optional[int] = None
    """stop after this many training tokens seen, never more (the last whole step that fits); a resume with
    another global_batch_tokens trains the tokens left in steps of the new batch, and the cosine schedule then
    ends at that step; null = no limit"""
    max_steps: Optional[int] = None
    """stop after this many optimizer steps; null = no limit (set max_tokens or max_steps; the cosine
    schedule ends at the smaller)"""


@dataclass
class EvalConfig:
    interval: int = 1000
    """validate every this many steps (and at the end); 0 = only at the end"""
    batches: int = 100
    """validation batches of micro_batch_size sequences, in all (split over the ranks): the same
    sequences on every world size and at every evaluation"""
    micro_batch_size: Optional[int] = None
    """sequences per validation batch; null = train.micro_batch_size"""


@dataclass
class CheckpointConfig:
    interval: int = 1000
    """save a checkpoint every this many steps (and at the end); 0 = only at the end"""
    keep_last: int = 3
    """keep the newest K checkpoints, delete older ones (never the one the run resumed from); 0 = keep all"""


@dataclass
class LoggingConfig:
    interval: int = 10
    """steps between console/TensorBoard/train_log.jsonl lines"""
    tensorboard: bool = True
    """write TensorBoard events to <out_dir>/tensorboard"""
    peak_flops: Optional[float] = None
    """peak FLOP/s of one device, for MFU; null = look the GPU up by name (bf16 dense); on CPU MFU is
    reported only when this is set"""


@dataclass
class SystemConfig:
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"
    """auto = cuda if available, else cpu"""
    strategy: Literal["auto", "fsdp", "fsdp2", "ddp", "single"] = "auto"
    """fsdp = FSDP1 FlatParameters (use_orig_params=False), one unit per Block; fsdp2 = fully_shard per
    Block; both also run on CPU over gloo, to try or debug a sharded run without a GPU. auto = fsdp on
    GPU; on CPU ddp with several processes, else single (DDP is the faster choice on CPU)"""
    devices: int = 1
    """processes (GPUs) per node"""
    num_nodes: int = 1
    """number of nodes"""
    replicas: Optional[int] = None
    """sharding layout of fsdp/fsdp2: 1 = FULL_SHARD over all ranks (every all-gather and reduce-scatter spans
    all nodes); N > 1 = hybrid sharding (HSDP): N replicas, each sharding the model over world/N ranks; only
    one gradient all-reduce per unit crosses between replicas. Use one replica per node on several nodes
    (shards inside the fast NVLink domain, memory per GPU of a one-node FULL_SHARD run); set 1 when the model
    does not fit one node's GPUs. N must divide devices x num_nodes and leave at least 2 ranks per replica.
    null = num_nodes with fsdp/fsdp2 on several nodes of several GPUs, else 1"""
    precision: Literal["auto", "bf16-mixed", "bf16-true", "32-true"] = "auto"
    """auto = bf16-mixed on GPU, 32-true on CPU. bf16-mixed: fp32 master weights, gradients and optimizer state,
    bf16 compute (fsdp/fsdp2 all-gather bf16 weights; gradients are reduced in bf16 under fsdp, in fp32 under
    fsdp2 and ddp); bf16-true: bf16 weights and gradients (Adam-mini's m and v stay fp32). README: Precision"""
    activation_checkpointing: bool = False
    """recompute each transformer Block in the backward pass (any strategy)"""
    compile: Optional[bool] = None
    """torch.compile each transformer Block; null = true on GPU, false on CPU (where compiling takes
    longer than short runs gain)"""
    collective_timeout_s: float = 1800.0
    """seconds a rank waits in a collective (and the rendezvous) for the others before the run ends with exit 4
    (a stopped or dead peer); torch's default is 1800. Raise it when one rank alone can be busy longer (e.g.
    rank 0 writing a huge checkpoint's metadata)"""
    stop_grace_s: float = 300.0
    """seconds the current step (or start-up) has, after a stop signal, to end so that the save can start; past
    that (e.g. a rank waits for a peer that stopped answering) the process exits 128 + N without saving. Also
    the time Ctrl-C has to finish. 0 = no limit. Raise it when start-up and the first step take longer"""


@dataclass
class PretrainConfig:
    out_dir: str = "out/pretrain"
    """run folder: step-XXXXXXXX/ checkpoints, tensorboard/, train_log.jsonl"""
    resume: str = "auto"
    """auto = continue from the newest checkpoint in out_dir that verifies (start fresh if none); none =
    start fresh; or the path of a step-XXXXXXXX folder (newer checkpoints of out_dir are moved aside)"""
    seed: int = 42
    """random seed, the same on every rank (initial weights, data order)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        d["init"] = {"from": d["init"].pop("from_")}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names where it came from."""


# ------------------------------------------------------------------------------------------ options
def iter_options(cls: type = PretrainConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type hint) of every option, in the order `--help` lists them."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += iter_options(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


_OPTIONS = dict(iter_options())


def build_parser():
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="python -m pretrain", exit_on_error=False, default_env=False,
        description="Pretrain a Llama model with Lightning Fabric (single device, DDP, FSDP or FSDP2; FSDP also "
                    "on CPU) and Adam-mini or AdamW. Values come from the defaults, then --config FILE, then the "
                    "options below. Also runs under `fabric run` and SLURM (srun). SIGUSR1 saves a checkpoint and "
                    "exits 0 (requeue), SIGTERM saves and exits 143. Exit status: see pretrain/__main__.py.")
    parser.add_argument("--config", metavar="FILE", help="YAML file with sections like configs/demo.yaml (YAML "
                                                         "aliases are refused here and in every option value)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    parser.add_class_arguments(PretrainConfig, fail_untyped=True, sub_configs=False)
    init_from = parser._option_string_actions.pop("--init.from_")  # spelled as users write it (see InitConfig)
    init_from.option_strings, init_from.metavar = ["--init.from"], "PATH"
    parser._option_string_actions["--init.from"] = init_from
    return parser


def parse_args(argv: list[str]) -> tuple[PretrainConfig, bool]:
    """Returns (config, print_config_only). Raises ConfigError naming the file or option."""
    argv = list(argv)
    config_file, print_only = _pop(argv, "--config", True), _pop(argv, "--print_config", False) is not None
    values = _keyword_keys(load_yaml(config_file) if config_file else {})
    _check_keys(values, config_file or "")
    _check_yaml_values(argv)
    parser = build_parser()
    ns = _parsed(lambda: parser.parse_object(values), config_file or "config", values, [])
    ns = _parsed(lambda: parser.parse_args(argv, namespace=ns), "command line", {}, argv)
    return _finish(parser, ns), print_only


def from_dict(values: dict[str, Any], source: str = "dict") -> PretrainConfig:
    """A validated config from nested mappings (what a YAML file holds)."""
    values = _keyword_keys(values)
    _check_keys(values, source)
    parser = build_parser()
    ns = _parsed(lambda: parser.parse_object(values), source, values, [])
    return _finish(parser, ns)


def _keyword_keys(values: dict[str, Any]) -> dict[str, Any]:
    """YAML's `init: {from: PATH}` as the dataclass field `init.from_` (`from` is a Python keyword)."""
    init = values.get("init")
    if isinstance(init, dict) and "from" in init:
        values = {**values, "init": {("from_" if k == "from" else k): v for k, v in init.items()}}
    return values


def _finish(parser, ns) -> PretrainConfig:
    """The validated PretrainConfig of a parsed namespace."""
    parsed = parser.instantiate_classes(ns)
    cfg = PretrainConfig(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(PretrainConfig)})
    validate(cfg)
    return cfg


def _pop(argv: list[str], flag: str, takes_value: bool) -> str | None:
    """Remove `flag` (and its value) from argv; returns the value ("" for a bare flag), None if absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            if not takes_value:
                del argv[i]
                return ""
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: {flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if takes_value and arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml_safe.load(path.read_text())  # aliases refused: a few lines could expand to gigabytes
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _check_yaml_values(argv: list[str]) -> None:
    """jsonargparse reads every command-line value as YAML (a str option's too): refuse aliases and deep nesting
    before it does, naming the option (a `--model.overrides` "billion laughs" would fill the memory)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            option, value = arg.split("=", 1)
        else:
            option, value = (argv[i - 1] if i and argv[i - 1].startswith("--") else arg), arg
        try:
            yaml_safe.check(value)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"command line: {option}: {getattr(e, 'problem', None) or e}{where}") from None


def _check_keys(values: dict[str, Any], source: str, prefix: str = "") -> None:
    """Unknown keys and sections that are not mappings, named with their dotted key."""
    sections = {key.rsplit(".", 1)[0] + "." for key in _OPTIONS if "." in key}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted + "." in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {dotted!r} must be a mapping of options, got {value!r}")
            _check_keys(value, source, dotted + ".")
        elif dotted not in _OPTIONS:
            near = [k for k in _OPTIONS if k.startswith(prefix) and "." not in k[len(prefix):]]
            raise ConfigError(f"{source}: unknown option {dotted!r}; options here: {', '.join(near)}")


def _parsed(parse, source: str, values: dict, argv: list[str]):
    """Run a jsonargparse parse; turn its (multi-line) errors into one ConfigError naming source and key."""
    try:
        return parse()
    except (argparse.ArgumentError, SystemExit, ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {_explain(str(e), values, argv)}") from None


def _explain(message: str, values: dict, argv: list[str]) -> str:
    unknown = re.search(r"Unrecognized arguments: (\S+)", message)
    if unknown:
        return f"unknown option {unknown.group(1).lstrip('-')!r}; see --help"
    m = re.search(r'Parser key "([^"]+)"', message)
    if m is None or m.group(1) not in _OPTIONS:
        return " ".join(message.split())
    key = m.group(1)
    hint, given = _OPTIONS[key], _given(key, values, argv)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    if typing.get_origin(kind) is Literal:
        return f"{key}: {given!r} is not one of {', '.join(map(str, typing.get_args(kind)))}"
    if typing.get_origin(kind) is tuple:
        return f"{key}: expected a list of {len(typing.get_args(kind))} values, got {given!r}"
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return f"{key}: expected {expected.get(kind, kind)}, got {given!r}"


def _given(key: str, values: dict, argv: list[str]) -> Any:
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    node: Any = values
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# ----------------------------------------------------------------------------------------- checks
def validate(cfg: PretrainConfig) -> None:
    """Every value that cannot work, named. World-size-dependent checks happen in pretrain.loop."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    t, o, e = cfg.train, cfg.optimizer, cfg.eval
    need(t.max_steps is not None or t.max_tokens is not None,
         "train.max_steps and train.max_tokens are both null: set at least one")
    need(t.max_steps is None or t.max_steps > 0, f"train.max_steps must be > 0, got {t.max_steps}")
    need(t.global_batch_tokens > 0, f"train.global_batch_tokens must be > 0, got {t.global_batch_tokens}")
    need(t.max_tokens is None or t.max_tokens >= t.global_batch_tokens,
         f"train.max_tokens ({t.max_tokens}) is smaller than one step (train.global_batch_tokens = "
         f"{t.global_batch_tokens})")
    for key, value in (("train.micro_batch_size", t.micro_batch_size), ("data.seq_len", cfg.data.seq_len),
                       ("logging.interval", cfg.logging.interval), ("system.devices", cfg.system.devices),
                       ("system.num_nodes", cfg.system.num_nodes), ("eval.batches", e.batches)):
        need(value > 0, f"{key} must be > 0, got {value}")
    need(cfg.system.replicas is None or cfg.system.replicas > 0,
         f"system.replicas must be > 0 or null, got {cfg.system.replicas}")
    need(math.isfinite(cfg.system.collective_timeout_s) and cfg.system.collective_timeout_s > 0,
         f"system.collective_timeout_s must be a number of seconds > 0, got {cfg.system.collective_timeout_s}")
    need(math.isfinite(cfg.system.stop_grace_s) and cfg.system.stop_grace_s >= 0,
         f"system.stop_grace_s must be a number of seconds >= 0 (0: no limit), got {cfg.system.stop_grace_s}")
    need(e.micro_batch_size is None or e.micro_batch_size > 0,
         f"eval.micro_batch_size must be > 0 or null, got {e.micro_batch_size}")
    for key, value in (("eval.interval", e.interval), ("checkpoint.interval", cfg.checkpoint.interval),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("data.num_workers", cfg.data.num_workers),
                       ("optimizer.warmup_steps", o.warmup_steps)):
        need(value >= 0, f"{key} must be >= 0, got {value}")
    for key, value in (("optimizer.lr", o.lr), ("optimizer.eps", o.eps)):
        need(math.isfinite(value) and value > 0, f"{key} must be a finite number > 0, got {value}")
    for key, value in (("optimizer.min_lr", o.min_lr), ("optimizer.weight_decay", o.weight_decay),
                       ("optimizer.grad_clip", o.grad_clip)):
        need(math.isfinite(value) and value >= 0, f"{key} must be a finite number >= 0, got {value}")
    need(o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) is larger than optimizer.lr ({o.lr})")
    need(all(0 <= b < 1 for b in o.betas), f"optimizer.betas must lie in [0, 1), got {list(o.betas)}")
    need(o.name == "adam_mini" or o.implementation == "auto",
         f"optimizer.implementation={o.implementation} applies to adam_mini only; use auto with adamw")
    need(cfg.logging.peak_flops is None or (math.isfinite(cfg.logging.peak_flops) and cfg.logging.peak_flops > 0),
         f"logging.peak_flops must be > 0 or null, got {cfg.logging.peak_flops}")
    need(cfg.init.from_ is None or cfg.init.from_.strip() != "", "init.from must name a folder, got ''")
    need(cfg.resume in ("auto", "none") or Path(cfg.resume).name.startswith("step-"),
         f"resume must be auto, none or a step-XXXXXXXX folder, got {cfg.resume!r}")
    model_config(cfg)


def model_config(cfg: PretrainConfig):
    """The run's litgpt.Config; a ConfigError names a bad `model.overrides` field."""
    import litgpt

    import models

    fields = {f.name for f in dataclasses.fields(litgpt.Config)}
    unknown = sorted(set(cfg.model.overrides) - fields)
    if unknown:
        raise ConfigError(f"model.overrides: {', '.join(map(repr, unknown))} is not a litgpt.Config field")
    try:
        return models.get_config(cfg.model.name, **cfg.model.overrides)
    except (TypeError, ValueError, AssertionError, ArithmeticError) as err:  # litgpt's __post_init__ checks
        raise ConfigError(f"model.overrides: {' '.join(str(err).split())}") from None
