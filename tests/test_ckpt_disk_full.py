"""A full disk while writing a checkpoint, a consolidated file or an export: one line naming what was being
written, "No space left on device", exit 3, and nothing half-written left behind.

torch's writer (torch.save, DCP's data files) reports a full disk as `RuntimeError: [enforce fail at
inline_container.cc:672] . unexpected pos ...` and safetensors as a `SafetensorError`, neither with an errno:
the app then checks the free space left on the target filesystem (amp_common.atomic.out_of_space). Tested
twice: with the writers made to raise exactly those errors while statvfs reports no free space, and on a real
1 MiB tmpfs (skipped where mounting is not permitted).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from checkpoints_util.__main__ import main as ckpt_main
from helpers.runs import cli_args, tiny_config
from pretrain.__main__ import main as pretrain_main

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
NO_SPACE = os.strerror(28)


class _Full:
    f_bavail, f_frsize = 0, 4096


def disk_reports_full(monkeypatch) -> None:
    monkeypatch.setattr(os, "statvfs", lambda path: _Full())


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from helpers.checkpoints import random_model, save_checkpoint_of, trained_optimizer

    model = random_model()
    return save_checkpoint_of(tmp_path_factory.mktemp("full") / "run", 2, model, trained_optimizer(model, 1), 256)


VERBS = {"consolidate": ["consolidate", "--out", "{out}"],
         "export-litgpt": ["export", "--format", "litgpt", "--out", "{out}"],
         "export-hf": ["export", "--format", "hf", "--out", "{out}"]}


def run_verb(verb: str, ckpt: Path, out: Path, capsys) -> tuple[int, str]:
    code = ckpt_main([VERBS[verb][0], str(ckpt), *[a.replace("{out}", str(out)) for a in VERBS[verb][1:]], "--quiet"])
    return code, capsys.readouterr().err


def assert_save_fails_for_space(data_dir, out, capsys) -> None:
    """A 2-step run that saves at step 2 on a full disk: exit 3, one line naming the checkpoint, nothing kept."""
    code = pretrain_main(cli_args(tiny_config(data_dir, out, train__max_steps=2, checkpoint__interval=2,
                                              eval__interval=2)))
    line = one_error_line(capsys.readouterr().err)
    assert code == 3 and line == f"error: {out / 'step-00000002'}: could not write the checkpoint ({NO_SPACE}); " \
                                 f"nothing was kept", line
    assert not list(out.glob("*step-*"))


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_writer_error_on_a_full_disk_is_exit_3(verb, ckpt, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    import torch

    def torch_full(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 100)  # what it wrote before the disk filled
        raise RuntimeError(TORCH_FULL)

    def safetensors_full(*a, **k):
        from safetensors import SafetensorError

        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    disk_reports_full(monkeypatch)
    target = tmp_path / "out" / "result"
    code, err = run_verb(verb, ckpt, target, capsys)
    line = one_error_line(err)
    assert code == 3 and line == f"error: {target}: could not write it ({NO_SPACE}); nothing was left behind", line
    assert list((tmp_path / "out").iterdir()) == []


def test_a_writer_error_with_free_space_is_not_called_a_full_disk(ckpt, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        ckpt_main(["consolidate", str(ckpt), "--out", str(tmp_path / "x.pth"), "--quiet"])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_save_on_a_full_disk_is_exit_3(data_dir, tmp_path, monkeypatch, capsys):
    import torch.distributed.checkpoint.filesystem as fs

    def full(*args, **kwargs):
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(fs, "_write_item", full)
    disk_reports_full(monkeypatch)
    out = tmp_path / "run"
    assert_save_fails_for_space(data_dir, out, capsys)


# ------------------------------------------------------------------------------------------ a real full disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only: skipped where mounting is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode(errors='replace').strip()})")
    try:
        yield mnt
    finally:  # lazily if a failed test's traceback still holds a file of it open
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.parametrize("verb", list(VERBS))
def test_consolidate_and_export_on_a_real_full_disk(verb, ckpt, tiny_disk, capsys):
    target = tiny_disk / "result"
    code, err = run_verb(verb, ckpt, target, capsys)
    line = one_error_line(err)
    assert code == 3 and line.startswith(f"error: {target}: could not write it (") and NO_SPACE in line, line
    assert list(tiny_disk.iterdir()) == []


def test_a_checkpoint_save_on_a_real_full_disk(data_dir, tiny_disk, capsys):
    out = tiny_disk / "run"
    assert_save_fails_for_space(data_dir, out, capsys)
    shutil.rmtree(out)
