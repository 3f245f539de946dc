"""Write, verify and read training checkpoints: one torch.distributed.checkpoint (DCP) folder per step.

One format for every strategy (single device, DDP, FSDP1, FSDP2) and any world size, torchtitan's way:
everything the run needs to continue is a `Stateful` entry of one DCP save, and DCP reshards on load.

    step-00001000/
      .metadata, __0_0.distcp, __1_0.distcp, ...   the DCP folder: "model" (parameters by original name),
                        "optimizer" (state by original parameter name, optim/state.py), "data" (the global
                        data position), "trainer" (step, tokens seen); tensors only, no pickled objects
      config.yaml         the resolved PretrainConfig of the run that wrote it
      model_config.yaml   the litgpt.Config fields (litgpt's model_config.yaml format)
      trainer.json        written last; its presence marks a complete checkpoint: format, step, tokens,
                          world size, strategy, optimizer, losses, and the sha256 and size of every file

Writing is atomic: everything goes to `.tmp-step-XXXXXXXX/`; the weights are checked to be finite first
(a NaN never reaches a checkpoint); after DCP's save each rank hashes the files it wrote, rank 0 writes
the YAML files and trainer.json, fsyncs, and renames the folder to `step-XXXXXXXX/`. A run killed
mid-save leaves only a `.tmp-*` folder, which nothing reads and the next run removes.

Reading verifies every file against trainer.json (the ranks share the hashing) before anything is
loaded. Every file is untrusted input (a crafted checkpoint carries matching checksums): trainer.json is
checked field by field, DCP's `.metadata` is unpickled admitting exact (module, name) pairs of DCP's own
metadata classes, may name only the folder's own data files, and an entry stored as a pickled object is
never read (`safe_reader`): a checkpoint cannot run code. A full disk is a WriteError ("No space left on
device") also where torch's writer loses the errno. Multi-node runs need out_dir on a filesystem shared by
all nodes.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from amp_common.atomic import (
    WriteError,
    atomic_write_json,
    atomic_write_text,
    fsync_tree,
    out_of_space,
    replace_dir,
)
from amp_common.checksum import file_sha256
from amp_common.dist import distributed, gather_objects, rank, world
from amp_common.quiet import quiet_checkpoint_warnings
from checkpoints_util.layout import (
    CONFIG_FILE,
    FORMAT,
    MODEL_CONFIG_FILE,
    TRAINER_FILE,
    CheckpointError,
    OldFormatError,
    list_checkpoints,
    step_dir_name,
    step_of,
)


def _first_error(errors: list[BaseException | None]) -> BaseException | None:
    return next((e for e in errors if e is not None), None)



def _my_files(folder: Path, rank: int) -> list[Path]:
    """The DCP files `rank` wrote (`__<rank>_<n>.distcp`; rank 0 also `.metadata`)."""
    mine = sorted(folder.glob(f"__{rank}_*.distcp"))
    return mine + [folder / ".metadata"] if rank == 0 else mine


def verify(path: Path) -> str | None:
    """Check every file of a checkpoint against trainer.json (collective: the ranks share the files).

    Returns None when all match, else one line naming the first bad file."""
    files = sorted(read_trainer(path)["files"].items())  # checked to be {name: {"bytes", "sha256"}}
    problem = None
    for i, (name, want) in enumerate(files):
        if i % world() != rank():
            continue
        f = path / name
        if not f.is_file():
            problem = f"{f}: missing"
        elif f.stat().st_size != want["bytes"]:
            problem = f"{f}: {f.stat().st_size} bytes, {want['bytes']} bytes when saved (truncated or damaged)"
        elif file_sha256(f) != want["sha256"]:
            problem = f"{f}: sha256 differs from the one recorded at save time (damaged)"
        if problem:
            break
    return next((p for p in gather_objects(problem) if p), None)


# ------------------------------------------------------------------------------------------------ save
def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `out_dir/step-XXXXXXXX/` atomically (collective: every rank calls it, in the same order).

    state: `Stateful` entries for DCP ("model", "optimizer", "data", "trainer").
    meta: {"trainer": JSON-able dict for trainer.json, "config": dict, "model_config": dict}.
    Raises WriteError (no space, not writable: nothing is left behind) or CheckpointError.
    """
    import torch.distributed.checkpoint as dcp
    import yaml

    out_dir = Path(out_dir)
    final, tmp = out_dir / step_dir_name(step), out_dir / f".tmp-{step_dir_name(step)}"
    error: BaseException | None = None
    try:
        if rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except Exception as e:  # noqa: BLE001 - every rank must learn of it (the others wait in the next gather)
        error = e
    _raise_any(error, tmp)
    try:
        with quiet_checkpoint_warnings():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed())
    except (Exception, CheckpointException) as e:  # DCP reports a failed write on every rank
        if isinstance(root_cause(e), KeyboardInterrupt):
            raise KeyboardInterrupt from None  # Ctrl-C, which DCP wraps: the caller removes the partial folder
        error = e
    _raise_any(error, tmp)
    files = {}
    try:
        files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in _my_files(tmp, rank())}
    except Exception as e:  # noqa: BLE001
        error = e
    everyone = gather_objects((files, error))
    _raise_any(_first_error([e for _, e in everyone]), tmp)
    if rank() == 0:
        try:
            atomic_write_text(tmp / CONFIG_FILE, yaml.safe_dump(meta["config"], sort_keys=False))
            atomic_write_text(tmp / MODEL_CONFIG_FILE, yaml.safe_dump(meta["model_config"], sort_keys=False))
            for name in (CONFIG_FILE, MODEL_CONFIG_FILE):
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
            for f, _ in everyone[1:]:
                files.update(f)
            fsync_tree(tmp)
            atomic_write_json(tmp / TRAINER_FILE, {"format": FORMAT, "step": step, **meta["trainer"],
                                                   "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                   "files": dict(sorted(files.items()))}, indent=2)
            _publish(tmp, final)
        except Exception as e:  # noqa: BLE001
            error = e
    _raise_any(gather_objects(error)[0], tmp)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place (replacing a checkpoint of the same step, which is kept as
    `.old-step-*` until the new one is there: `layout.remove_partial` puts back whichever is complete)."""
    replace_dir(tmp, final, final.with_name(f".old-{final.name}"))


def _raise_any(error: BaseException | None, tmp: Path) -> None:
    """Collective: if any rank failed, every rank raises (rank 0 removes the partial folder first)."""
    errors = gather_objects(None if error is None else _describe(error, tmp))
    message = next((e for e in errors if e), None)
    if message is None:
        return
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    kind, text = message
    raise (WriteError if kind == "disk" else CheckpointError)(text)


def root_cause(error: BaseException) -> BaseException:
    """The exception a rank raised: DCP wraps it in a CheckpointException({rank: (exception, trace)})."""
    failures = getattr(error, "failures", None)
    return next(iter(failures.values()))[0] if failures else error


def _describe(error: BaseException, tmp: Path) -> tuple[str, str]:
    """("disk" | "other", one line naming the checkpoint) for an exception raised while saving."""
    import errno

    cause = root_cause(error)
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if not isinstance(cause, CheckpointError) and out_of_space(cause, tmp):  # torch's writer loses the errno
        return "disk", f"{final}: could not write the checkpoint ({os.strerror(errno.ENOSPC)}); nothing was kept"
    if isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "disk", f"{final}: could not write the checkpoint ({os.strerror(cause.errno)}); nothing was kept"
    return "other", f"{final}: could not write the checkpoint ({' '.join(str(cause).split())})"


def prune(out_dir: Path, keep_last: int, protect: set[Path]) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, never one in `protect` (call on rank 0)."""
    if keep_last <= 0:
        return []
    protected = {q.resolve() for q in protect}
    stale = [p for p in list_checkpoints(out_dir)[:-keep_last] if p.resolve() not in protected]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ------------------------------------------------------------------------------------------------ load
def read_trainer(path: Path) -> dict[str, Any]:
    """trainer.json of a checkpoint, checked to be a format this code reads."""
    path = Path(path)
    f = path / TRAINER_FILE
    try:
        trainer = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_FILE})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(trainer, dict) or not _is_count(trainer.get("step")):
        raise CheckpointError(f"{f}: not a trainer state (expected a JSON object with an integer 'step' >= 0)")
    if trainer.get("format") == 1:
        raise OldFormatError(f"{path}: written in checkpoint format 1 (model.pt / model/ + optimizer); convert it "
                              f"with `amp-ckpt convert {path}`")
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{f}: checkpoint format {trainer.get('format')!r}, this code reads {FORMAT}")
    if step_of(path) is not None and step_of(path) != trainer["step"]:
        raise CheckpointError(f"{f}: says step {trainer['step']}, the folder is {path.name}")
    problem = _files_problem(trainer.get("files"))
    if problem:
        raise CheckpointError(f"{f}: 'files' {problem} (damaged or not written by this code)")
    return trainer


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _files_problem(files) -> str | None:
    """What is wrong with trainer.json's "files" ({file name: {"bytes": int, "sha256": hex}}), or None."""
    if files is None:
        return "is missing"
    if not isinstance(files, dict):
        return f"is a {type(files).__name__}, not a mapping of file names"
    if not files:
        return "lists no files to verify"
    for name, want in files.items():
        if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            return f"names {name!r}, not a file of the checkpoint folder"
        if not isinstance(want, dict) or not _is_count(want.get("bytes")) \
                or not isinstance(want.get("sha256"), str) or not _SHA256_RE.match(want["sha256"]):
            return f"entry {name!r} is not {{\"bytes\": size, \"sha256\": 64 hex digits}}"
    return None


# DCP's `.metadata` is a pickle. Unpickle exactly these (module, name) pairs: the classes DCP pickles for this
# app's checkpoints in torch 2.11-2.13 (`pickletools.dis` of a real `.metadata`), never a callable of the
# checkpoint's choosing. The pairs are matched whole, so a dotted name that walks from an allowed module to
# another object (`("torch.distributed.checkpoint.filesystem", "os.system")`) is refused like any other.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    (_DCP_METADATA, "BytesStorageMetadata"),  # unpickled to be refused by name (_check_metadata)
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((module, cls) for module in ("pathlib", "pathlib._local")  # pathlib._local: Python 3.13's module name
      for cls in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
})
_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64",
                     "complex128", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"})
# the files DCP's FileSystemWriter writes (`__<rank>_<n>.distcp`), the only ones a checkpoint's metadata may name
_DATA_FILE_RE = re.compile(r"^__\d+_\d+\.distcp$")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and name in _DTYPES and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                pass  # a pair of another Python or torch version
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from checkpoint metadata")


def _check_metadata(metadata, path: Path) -> None:
    """The unpickled `.metadata` must be DCP's, its entries tensors (or pickled objects, which format 1 holds and
    `SafeReader.read_data` never reads), stored in the checkpoint's own data files."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    where = path / ".metadata"
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: unreadable (not DCP metadata but a {type(metadata).__name__})")
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{where}: unreadable (its tensor and storage tables are not mappings)")
    for key, entry in entries.items():
        if not isinstance(entry, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CheckpointError(f"{where}: unreadable (entry {key!r} is a {type(entry).__name__})")
        problem = _tensor_entry_problem(entry) if isinstance(entry, TensorStorageMetadata) else None
        if problem:
            raise CheckpointError(f"{where}: unreadable (entry {key!r}: {problem})")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{where}: unreadable (a storage entry is not DCP's)")
        name = info.relative_path
        if not isinstance(name, str) or not _DATA_FILE_RE.match(name):
            raise CheckpointError(f"{where}: entry {index.fqn!r} is stored in {name!r}, not a file of the "
                                  f"checkpoint (__<rank>_<n>.distcp); refused")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise CheckpointError(f"{where}: entry {index.fqn!r} has a bad offset or length; refused")


def _is_shape(value, rank: int | None = None) -> bool:
    """A torch.Size (or a tuple or list) of ints >= 0, of `rank` dimensions if given."""
    return isinstance(value, (tuple, list)) and all(_is_count(v) for v in value) \
        and (rank is None or len(value) == rank)


def _tensor_entry_problem(entry) -> str | None:
    """What is wrong with the fields of a TensorStorageMetadata (DCP's classes can be unpickled holding values of
    any kind), or None."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties

    if not isinstance(entry.properties, TensorProperties) or not isinstance(entry.properties.dtype, torch.dtype):
        return "its dtype is not a torch dtype"
    if not _is_shape(entry.size):
        return "its size is not a shape of sizes >= 0"
    if not isinstance(entry.chunks, list) or not all(
            isinstance(c, ChunkStorageMetadata) and _is_shape(c.offsets, len(entry.size))
            and _is_shape(c.sizes, len(entry.size)) for c in entry.chunks):
        return "its chunks are not offsets and sizes of its shape"
    return None


def safe_reader(path: Path):
    """A DCP `FileSystemReader` whose `.metadata` is unpickled with the allow-list above and checked to name only
    the checkpoint's own files, and that never reads an entry stored as a pickled object (DCP would unpickle it
    with `torch.load(weights_only=False)`): use it for every DCP read (`dcp.load(..., storage_reader=...)`).
    Raises CheckpointError naming the problem (DCP wraps it: `root_cause` unwraps it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType

    class SafeReader(FileSystemReader):
        def read_data(self, plan, planner):
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    raise CheckpointError(f"{Path(self.path)}: entry {item.storage_index.fqn!r} is a pickled object, "
                                          f"not a tensor (a checkpoint holds tensors only; refused)")
            return super().read_data(plan, planner)

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            raw = (Path(self.path) / ".metadata").read_bytes()
            try:
                metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
            except Exception as e:  # noqa: BLE001 - whatever a crafted or damaged pickle makes the unpickler raise
                raise CheckpointError(f"{Path(self.path) / '.metadata'}: unreadable "
                                      f"({' '.join(str(e).split())[:300]})") from None
            _check_metadata(metadata, Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def read_metadata(path: Path):
    """DCP metadata of a checkpoint folder (tensor names, shapes, dtypes), safely."""
    try:
        return safe_reader(path).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: holds no DCP metadata (.metadata missing)") from None


def load_checkpoint(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load `path` into the `Stateful` entries of `state` (collective). Returns trainer.json. The files are not
    hashed again here: the caller verifies first (`verify`; the trainer's resume does, for every candidate)."""
    import torch.distributed.checkpoint as dcp

    trainer = read_trainer(path)
    read_metadata(path)  # a clear error for a damaged .metadata before DCP's own
    try:
        with quiet_checkpoint_warnings():
            dcp.load(state, storage_reader=safe_reader(path), no_dist=not distributed())
    except (Exception, CheckpointException) as e:  # DCP raises many kinds
        cause = root_cause(e)
        if isinstance(cause, CheckpointError):
            raise cause from None
        text = " ".join(str(cause).split())
        raise CheckpointError(f"{path}: does not fit this run ({type(cause).__name__}: {text[:400]})") from None
    return trainer
