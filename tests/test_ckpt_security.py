"""A crafted checkpoint cannot run code, and every file of one is untrusted input.

- `.metadata` (DCP's pickle): payloads of protocol 2 and 4, `GLOBAL` and `STACK_GLOBAL` opcodes, dotted names
  that walk from an allowed module to `os.system` or `pickle.loads`, and `__reduce__` to `eval` / `os.system`
  are each refused with one line and never run, through `amp-ckpt inspect [--verify]`, `python -m pretrain
  --resume auto|PATH` and `optim.state.load_optimizer`. The crafted checkpoints carry matching checksums in
  their own trainer.json (as an attacker's would), so the checksum check cannot be what stops them.
- a metadata entry that declares a pickled object (DCP's `BytesStorageMetadata`, which DCP reads with
  `torch.load(weights_only=False)`) or a storage file outside the checkpoint folder is refused the same way.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from amp_common.checksum import file_sha256
from checkpoints_util.__main__ import main as ckpt_main
from helpers.runs import cli_args, tiny_config
from pretrain.__main__ import main as pretrain_main

STEP = "step-00000002"


# ------------------------------------------------------------------------------------------ payloads
def _str(op4: bool, s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b if op4 else b"X" + struct.pack("<I", len(b)) + b  # SHORT_BINUNICODE


def _call(proto: int, opcode: str, module: str, name: str, arg: bytes | str) -> bytes:
    """A pickle that resolves (module, name) with GLOBAL or STACK_GLOBAL and calls it with one argument."""
    op4 = proto >= 4
    head = b"\x80" + bytes([proto])
    if opcode == "GLOBAL":
        ref = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    else:
        ref = _str(op4, module) + _str(op4, name) + b"\x93"
    if isinstance(arg, bytes):
        a = b"B" + struct.pack("<I", len(arg)) + arg  # BINBYTES
    else:
        a = _str(op4, arg)
    return head + ref + a + b"\x85R."  # TUPLE1 REDUCE STOP


class _Reduce:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    evil_eval = f"__import__('os').system({touch!r})"
    fs, md = "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.metadata"
    return {
        "p4-stack-global-dotted-os.system": _call(4, "STACK_GLOBAL", fs, "os.system", touch),
        "p4-global-dotted-os.system": _call(4, "GLOBAL", fs, "os.system", touch),
        "p4-metadata-module-os.system": _call(4, "STACK_GLOBAL", md, "os.system", touch),
        "p4-pickle.loads-to-reduce-eval": _call(4, "STACK_GLOBAL", fs, "pickle.loads",
                                                pickle.dumps(_Reduce(eval, evil_eval), protocol=2)),
        "p2-global-dotted-os.system": _call(2, "GLOBAL", fs, "os.system", touch),
        "p2-stack-global-dotted-os.system": _call(2, "STACK_GLOBAL", fs, "os.system", touch),
        "p2-reduce-eval": pickle.dumps(_Reduce(eval, evil_eval), protocol=2),
        "p4-reduce-os.system": pickle.dumps(_Reduce(os.system, touch), protocol=4),
    }


PAYLOAD_IDS = list(payloads(Path("x")))


def reseal(folder: Path, names: list[str]) -> None:
    """Record the current sha256 and size of `names` in trainer.json, as a crafted checkpoint would."""
    trainer = json.loads((folder / "trainer.json").read_text())
    for name in names:
        trainer["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    (folder / "trainer.json").write_text(json.dumps(trainer))


def plant_pickled_object(folder: Path, key: str, marker: Path) -> None:
    """Declare `key` a pickled object (BytesStorageMetadata) stored in a new file holding a torch.save payload."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    blob = folder / "__0_9.distcp"
    torch.save(_Reduce(os.system, f"touch {marker}"), blob)
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
    meta.state_dict_metadata[key] = BytesStorageMetadata()
    meta.storage_data = {i: s for i, s in meta.storage_data.items() if i.fqn != key}
    meta.storage_data[MetadataIndex(key)] = _StorageInfo(relative_path=blob.name, offset=0,
                                                         length=blob.stat().st_size)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def point_outside(folder: Path, key: str) -> None:
    """Make `key`'s storage a file outside the checkpoint folder."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    for index, info in meta.storage_data.items():
        if index.fqn == key:
            info.relative_path = f"../../{info.relative_path}"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with one checkpoint of the `debug` model at step 2, written by the app's writer (the crafted
    files are refused before its data position would be checked against the data)."""
    from helpers.checkpoints import random_model, save_checkpoint_of, trained_optimizer

    model = random_model()
    out = tmp_path_factory.mktemp("sec") / "run"
    save_checkpoint_of(out, 2, model, trained_optimizer(model, 1), tokens_seen=256)
    return out


def crafted(run_dir: Path, tmp_path: Path, craft) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint `craft(folder)` changed, re-sealed; returns (run copy, checkpoint)."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    ck = out / STEP
    craft(ck)
    reseal(ck, sorted(p.name for p in ck.iterdir() if p.name != "trainer.json"))
    return out, ck


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def entry_point(how: str, out: Path, ck: Path, data_dir: Path, capsys) -> tuple[int, str]:
    if how.startswith("inspect"):
        code = ckpt_main(["inspect", str(ck), *(["--verify"] if how == "inspect-verify" else [])])
    else:
        resume = "auto" if how == "resume-auto" else str(ck)
        code = pretrain_main(cli_args(tiny_config(data_dir, out, resume=resume, train__max_steps=4,
                                                  checkpoint__interval=2, eval__interval=2)))
    return code, capsys.readouterr().err


ENTRY_POINTS = ["inspect", "inspect-verify", "resume-auto", "resume-path"]
# every payload through the cheap entry points; through a trainer start (about 1.5 s each) two of them by
# default, all of them in the extended run
IN_DEFAULT_RUN = {"p4-stack-global-dotted-os.system", "p4-pickle.loads-to-reduce-eval"}
PAYLOAD_CASES = [pytest.param(p, how, id=f"{p}-{how}", marks=() if how.startswith("inspect") or p in IN_DEFAULT_RUN
                              else pytest.mark.extended) for p in PAYLOAD_IDS for how in ENTRY_POINTS]


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("payload, how", PAYLOAD_CASES)
def test_crafted_metadata_is_refused_and_never_runs(payload, how, run_dir, data_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out, ck = crafted(run_dir, tmp_path, lambda f: (f / ".metadata").write_bytes(payloads(marker)[payload]))
    code, err = entry_point(how, out, ck, data_dir, capsys)
    assert not marker.exists(), f"the payload ran through {how}"
    line = one_error_line(err)
    assert code == 2 and ".metadata" in line and ("refused to load" in line or "unreadable" in line), line
    assert (ck / ".metadata").is_file()  # left where it was: a refused resume moves nothing


@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_a_pickled_object_entry_is_refused_and_never_runs(how, run_dir, data_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out, ck = crafted(run_dir, tmp_path, lambda f: plant_pickled_object(f, "trainer.step", marker))
    code, err = entry_point(how, out, ck, data_dir, capsys)
    assert not marker.exists(), f"the payload ran through {how}"
    line = one_error_line(err)
    assert code == 2 and "'trainer.step'" in line and "tensors only" in line, line


def test_a_storage_file_outside_the_checkpoint_is_refused(run_dir, data_dir, tmp_path, capsys):
    out, ck = crafted(run_dir, tmp_path, lambda f: point_outside(f, "model.lm_head.weight"))
    code, err = entry_point("resume-path", out, ck, data_dir, capsys)
    line = one_error_line(err)
    assert code == 2 and "../../" in line and "not a file of the checkpoint" in line, line


@pytest.mark.parametrize("payload", ["p4-stack-global-dotted-os.system", "p4-pickle.loads-to-reduce-eval",
                                     "pickled-object"])
def test_load_optimizer_reads_through_the_safe_reader(payload, tmp_path):
    from checkpoints_util.layout import CheckpointError
    from helpers.checkpoints import random_model, trained_optimizer
    from optim.state import load_optimizer, save_optimizer

    model = random_model()
    opt = trained_optimizer(model, 1)
    folder = tmp_path / "opt"
    save_optimizer(opt, folder)
    marker = tmp_path / "pwned"
    if payload == "pickled-object":
        key = next(k for k in pickle.loads((folder / ".metadata").read_bytes()).state_dict_metadata
                   if k.startswith("optimizer."))
        plant_pickled_object(folder, key, marker)
    else:
        (folder / ".metadata").write_bytes(payloads(marker)[payload])
    with pytest.raises(CheckpointError, match="refused to load|tensors only"):
        load_optimizer(opt, folder)
    assert not marker.exists()


def test_real_metadata_still_loads(run_dir, capsys):
    """The allow-list admits every class DCP pickles for this app's checkpoints (fp32 and bf16 tensors)."""
    from checkpoints_util.store import read_metadata

    meta = read_metadata(run_dir / STEP)
    assert "model.lm_head.weight" in meta.state_dict_metadata
    assert ckpt_main(["inspect", str(run_dir), "--verify"]) == 0, capsys.readouterr().err
