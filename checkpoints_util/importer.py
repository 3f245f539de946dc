"""`amp-ckpt import SRC --out DIR`: Hugging Face Llama or litgpt weights -> a model-only checkpoint folder.

Sources (SRC is a folder):
- Hugging Face: `config.json` (`LlamaForCausalLM`) + `model.safetensors`, or the shards listed in
  `model.safetensors.index.json`, or `pytorch_model.bin` / the shards of `pytorch_model.bin.index.json`;
- litgpt: `lit_model.pth` (a state dict, or `{"model": state dict}`) + `model_config.yaml`.

DIR is a checkpoint folder of the one format (checkpoints_util/store.py) holding only the "model" entry: the
DCP files, `model_config.yaml` (litgpt's config: from `config.json`, or the source's own), an empty
`config.yaml` (no training run wrote it), the source's tokenizer files when it has them (`tokenizer.model`,
`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`) and
`trainer.json` (step 0, the source's path and the sha256 of each of its weight and config files, the sha256
of every file of DIR). `python -m pretrain --init.from DIR` starts a run from it; `amp-ckpt inspect/export`
read it like any checkpoint.

Every source file is untrusted input. Before anything is written: the config is checked (other
architectures, RoPE scaling, biases, tied embeddings: one line), every tensor's name, shape and dtype is
checked against the model that config describes (from the safetensors headers or the memory-mapped `.bin`,
no tensor data read), an index may only name files of SRC itself, tensors are loaded with
`weights_only=True` (no code is unpickled) and must be finite. The q/k/v of Hugging Face are fused into
litgpt's `attn.qkv` by the inverse of the export's mapping (`hf_llama.from_hf_names`).

Memory: tensors are read one at a time (safetensors' `safe_open`; `.bin` files memory-mapped) into the
output, so the peak is about one copy of the weights in `--dtype` (auto: as stored) plus the largest source
tensor (the embedding) while it is cast, plus one layer's q/k/v while they are fused: Llama-2 7B about
13.5 GB in float16/bfloat16 (27 GB in float32), TinyLlama 1.1B 2.2 GB (4.4 GB); the source files are
memory-mapped on top (page cache, given back under memory pressure). `python -m benchmarks.import_memory`
measures it.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from amp_common.atomic import atomic_write_json
from amp_common.checksum import file_sha256
from amp_common.tensors import DTYPES, numel
from checkpoints_util import hf_llama, store
from checkpoints_util.layout import MODEL_CONFIG_FILE, TRAINER_FILE, CheckpointError
from checkpoints_util.output import atomic_dir, check_destination, human_bytes, progress

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
_INDEXES = (("model.safetensors.index.json", "model.safetensors", ".safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin", ".bin"))
_MAX_JSON_BYTES = 64 << 20


@dataclass
class Entry:
    """One tensor of the source: where it is and what its header says (a `.bin` tensor is memory-mapped)."""
    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: Any                              # torch.dtype, or the safetensors dtype name if not a float one
    tensor: torch.Tensor | None = None      # `.bin` / `.pth`: the memory-mapped tensor


@dataclass
class Source:
    kind: str                               # "hf" | "litgpt"
    path: Path
    config: Any                             # litgpt.Config
    config_file: Path
    entries: list[Entry]
    files: list[Path] = field(default_factory=list)   # weight and config files: hashed into trainer.json


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split())[:300]


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, too large for a config or index")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None


# ---------------------------------------------------------------------------------------------- sources
def open_source(src: str | Path) -> Source:
    """The source folder's config and the tensor list of its weight files (headers only); one CheckpointError if
    it is not an importable Llama."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such folder")
    if not src.is_dir():
        raise CheckpointError(f"{src}: is a file; expected a Hugging Face model folder (config.json + weights) or a "
                              f"litgpt checkpoint folder (lit_model.pth + model_config.yaml)")
    hf_weights = any((src / name).is_file() for pair in _INDEXES for name in pair[:2])
    lit = (src / "lit_model.pth").is_file()
    if (src / "config.json").is_file() and (hf_weights or not lit):
        return _hf_source(src)
    if lit:  # litgpt's own folders often keep the Hugging Face config.json beside lit_model.pth
        return _litgpt_source(src)
    raise CheckpointError(f"{src}: holds neither config.json (a Hugging Face model) nor lit_model.pth (litgpt)")


def _hf_source(src: Path) -> Source:
    config_file = src / "config.json"
    config = hf_llama.litgpt_config(_read_json(config_file), str(config_file))
    files, claims = [config_file], {}
    for index_name, single, suffix in _INDEXES:
        index = src / index_name
        if index.is_file():
            claims = _index_claims(index, suffix)
            weights = [src / f for f in dict.fromkeys(claims.values())]
            files.append(index)
            break
        if (src / single).is_file():
            weights = [src / single]
            break
    else:
        raise CheckpointError(f"{src}: holds config.json but no weights (model.safetensors, "
                              f"model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")
    entries = [e for f in weights for e in _file_entries(f)]
    held = {(e.file.name, e.name) for e in entries}
    for tensor, fname in claims.items():
        if (fname, tensor) not in held:
            raise CheckpointError(f"{index}: says tensor {tensor!r} is in {fname}, but that file does not hold it")
    return Source("hf", src, config, config_file, entries, files + weights)


def _index_claims(index: Path, suffix: str) -> dict[str, str]:
    """The index's weight_map {tensor: file}; every file must be a plain file name of the index's own folder."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map (expected {{\"weight_map\": {{tensor: file}}}})")
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or Path(fname).name != fname or fname.startswith(".") \
                or not fname.endswith(suffix):
            raise CheckpointError(f"{index}: weight_map[{tensor!r}] = {fname!r} is not the name of a {suffix} file "
                                  f"in {index.parent}")
        if not (index.parent / fname).is_file():
            raise CheckpointError(f"{index}: lists {fname} (for tensor {tensor!r}), which is missing from "
                                  f"{index.parent}")
    return weight_map


def _litgpt_source(src: Path) -> Source:
    from checkpoints_util.reader import load_model_config

    config_file = src / MODEL_CONFIG_FILE
    config = load_model_config(config_file)
    problems = hf_llama.unsupported(config)
    if problems:
        raise CheckpointError(f"{config_file}: not a plain Llama, cannot be trained here: " + "; ".join(problems))
    weights = src / "lit_model.pth"
    return Source("litgpt", src, config, config_file, _file_entries(weights), [config_file, weights])


def _file_entries(path: Path) -> list[Entry]:
    if path.suffix == ".safetensors":
        return _safetensors_entries(path)
    sd = _torch_load(path)
    if path.name == "lit_model.pth" and isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # litgpt's training checkpoints wrap the state dict
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of tensor names to tensors)")
    return [Entry(path, k, tuple(v.shape), v.dtype, v) for k, v in sd.items()]


def _safetensors_entries(path: Path) -> list[Entry]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            entries = []
            for name in f.keys():
                s = f.get_slice(name)
                dtype = s.get_dtype()
                entries.append(Entry(path, name, tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype)))
            return entries
    except OSError:
        raise
    except Exception as e:  # SafetensorError: a bad header, a truncated file
        raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`, memory-mapped where the file's format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, it holds more than tensors ({_one_line(e)})") from None
    except OSError:
        raise
    except Exception as e:  # a damaged zip, a truncated file
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {_one_line(e)})") from None


# ---------------------------------------------------------------------------------------------- the plan
def plan(source: Source) -> dict[str, tuple[str, int, int]]:
    """Source tensor name -> (litgpt name, part, parts), after checking that the source holds exactly the
    tensors of its config's model, with the right shapes and float dtypes (one CheckpointError otherwise)."""
    from checkpoints_util.reader import expected_shapes

    c = source.config
    if source.kind == "hf":
        mapping = hf_llama.from_hf_names(c)
    else:
        mapping = {n: (n, 0, 1, shape) for n, shape in expected_shapes(c).items()}
    seen: dict[str, Entry] = {}
    for e in source.entries:
        if source.kind == "hf" and hf_llama.IGNORED_HF_TENSORS.match(e.name):
            continue
        if e.name in seen:
            raise CheckpointError(f"{e.file}: tensor {e.name!r} is also in {seen[e.name].file.name}")
        seen[e.name] = e
        if e.name not in mapping:
            raise CheckpointError(f"{e.file}: tensor {e.name!r} does not belong to the Llama of {source.config_file}")
        want = mapping[e.name][3]
        if e.shape != want:
            raise CheckpointError(
                f"{e.file}: tensor {e.name!r} has shape {list(e.shape)} but {source.config_file} (n_layer={c.n_layer}, "
                f"n_embd={c.n_embd}, n_head={c.n_head}, n_query_groups={c.n_query_groups}, vocab_size="
                f"{c.padded_vocab_size}) expects {list(want)}")
        if e.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{e.file}: tensor {e.name!r} has dtype {e.dtype}; weights must be float16, "
                                  f"bfloat16, float32 or float64")
    missing = [n for n in mapping if n not in seen]
    if missing:
        raise CheckpointError(f"{source.path}: {len(missing)} tensor(s) that {source.config_file.name} needs are "
                              f"missing (e.g. {', '.join(missing[:3])})")
    return {name: m[:3] for name, m in mapping.items()}


def iter_tensors(source: Source, names: dict[str, tuple[str, int, int]], dtype: torch.dtype | None
                 ) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(litgpt name, tensor in `dtype` (None: as stored), source bytes read) one at a time, file by file; q/k/v
    are yielded fused once the last of the three is read."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    by_file: dict[Path, list[Entry]] = {}
    for e in source.entries:
        if e.name in names:
            by_file.setdefault(e.file, []).append(e)
    for path, entries in by_file.items():
        for e, t in _read(path, entries):
            target = dtype or t.dtype
            t = t.to(target, copy=e.tensor is not None)  # a memory-mapped tensor is copied into memory
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: tensor {e.name!r} holds NaN or infinite values")
            name, part, parts = names[e.name]
            nbytes = t.numel() * e.dtype.itemsize
            if parts == 1:
                yield name, t, nbytes
                continue
            pending.setdefault(name, {})[part] = t
            if len(pending[name]) == parts:
                pieces = pending.pop(name)
                yield name, torch.cat([pieces[i] for i in range(parts)]), nbytes
            else:
                yield name, None, nbytes


def _read(path: Path, entries: list[Entry]) -> Iterator[tuple[Entry, torch.Tensor]]:
    if path.suffix != ".safetensors":
        for e in entries:
            yield e, e.tensor
        return
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - replaced or damaged since the header was read
        raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
    with f:
        for e in entries:
            try:
                t = f.get_tensor(e.name)
            except Exception as err:  # noqa: BLE001 - a truncated data section
                raise CheckpointError(f"{path}: cannot read tensor {e.name!r} ({_one_line(err)})") from None
            yield e, t


# ---------------------------------------------------------------------------------------------- import
def import_weights(src: str | Path, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
                   quiet: bool = True) -> Path:
    """Import the weights of `src` into the model-only checkpoint folder `out` (written atomically)."""
    check_destination(out, overwrite)
    source = open_source(src)
    names = plan(source)
    total = sum(e.dtype.itemsize * numel(e.shape) for e in source.entries if e.name in names)
    sd: dict[str, torch.Tensor] = {}
    with progress(total, f"import {source.path.name}", quiet) as bar:
        for name, t, nbytes in iter_tensors(source, names, dtype):
            if t is not None:
                sd[name] = t
            bar.update(nbytes)
    record = {"format": source.kind, "path": str(source.path.resolve()),
              "files": {str(f.relative_to(source.path)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
                        for f in source.files}}
    meta = {"trainer": {"tokens_seen": 0, "world_size": 1, "strategy": "import", "optimizer": None,
                        "precision": "as stored" if dtype is None else str(dtype).removeprefix("torch."),
                        "model_name": source.config.name, "loss": None, "val_loss": None, "reason": "import",
                        "source": record},
            "config": {}, "model_config": dataclasses.asdict(source.config)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        step = store.save_checkpoint(tmp, 0, {"model": sd}, meta)
        for f in step.iterdir():
            f.rename(tmp / f.name)
        step.rmdir()
        _copy_tokenizer_files(source.path, tmp)
    if not quiet:
        size = sum(p.stat().st_size for p in Path(out).iterdir())
        print(f"imported {source.path} ({source.kind}, model {source.config.name}, "
              f"{sum(t.numel() for t in sd.values()):,} parameters) -> {out} ({human_bytes(size)})", file=sys.stderr)
    return Path(out)


def _copy_tokenizer_files(src: Path, tmp: Path) -> None:
    """The source's tokenizer files, added to trainer.json's checksummed file list."""
    trainer = json.loads((tmp / TRAINER_FILE).read_text())
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
            trainer["files"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
    trainer["files"] = dict(sorted(trainer["files"].items()))
    atomic_write_json(tmp / TRAINER_FILE, trainer, indent=2)


def run(args) -> int:
    import_weights(args.source, args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite, quiet=args.quiet)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="Hugging Face Llama or litgpt weights -> a checkpoint folder for "
                                      "`python -m pretrain --init.from`", description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="SRC", help="a Hugging Face model folder (config.json + *.safetensors or "
                                                  "pytorch_model*.bin) or a litgpt one (lit_model.pth + "
                                                  "model_config.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to create")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="cast the weights (auto = as stored); training loads them into its own precision")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
