"""A resumed or damaged run never loses or silently corrupts work, and every failure is one line:

- resuming from an older checkpoint branches: the newer checkpoints and log lines move aside, keep-last
  spares the checkpoint the run started from, and `--resume auto` then continues the new branch;
- damaged checkpoint bytes are caught by the checksums (auto falls back to the newest checkpoint that
  verifies, saying so), and NaN weights are never written;
- a torn line in train_log.jsonl does not block a resume;
- a second trainer on the same out_dir is refused while the first runs, and not after it died;
- bad data, bad checkpoints, an out_dir that is a file and a full disk: one line, a documented exit code,
  nothing half-written;
- a checkpoint cannot run code: DCP's metadata is unpickled through an allow-list.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch

from checkpoints_util.layout import list_checkpoints
from helpers.checkpoints import assert_same_tensors, checkpoint_tensors
from helpers.runs import cli_args, logged_losses, popen_pretrain, read_until, tiny_config, train_log
from pretrain.__main__ import main
from pretrain.loop import fit

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, cfg) -> tuple[int, str]:
    code = main(cli_args(cfg))
    return code, capsys.readouterr().err.strip()


def steps_in(out_dir: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(out_dir)]


@pytest.fixture(scope="module")
def three_steps(data_dir, tmp_path_factory) -> Path:
    """A finished 3-step run (checkpoint at step 3), trained once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("three_steps") / "run"
    fit(tiny_config(data_dir, out, train__max_steps=3))
    return out


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of a finished run folder (resuming never looks at where a checkpoint was written)."""
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_resuming_an_older_checkpoint_branches_without_losing_the_newer_run(data_dir, tmp_path, faults, capsys):
    out = tmp_path / "br"
    old = fit(tiny_config(data_dir, out, train__max_steps=12, checkpoint__interval=2))
    assert steps_in(out) == [2, 4, 6, 8, 10, 12]
    # a branch from step 6 with other hyper-parameters, stopped after step 10 (as a kill would leave it)
    faults(stop_at=10)
    branch = tiny_config(data_dir, out, resume=str(out / "step-00000006"), train__max_steps=12,
                         checkpoint__interval=2, checkpoint__keep_last=2, optimizer__lr=1e-3, optimizer__min_lr=1e-4)
    fit(branch)
    # keep-last 2 kept the branch's 8 and 10 and the step it started from; nothing of the old run was deleted
    assert steps_in(out) == [6, 8, 10]
    aside = [p for p in out.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and steps_in(aside[0]) == [8, 10, 12]
    assert [r["step"] for r in train_log(aside[0]) if "loss" in r] == [7, 8, 9, 10, 11, 12]
    from checkpoints_util.store import verify

    assert verify(aside[0] / "step-00000012") is None  # the abandoned run's newest checkpoint, intact
    # the same command again (a requeue) continues the branch (its step 10) instead of branching once more,
    # and the log holds each step once
    faults(stop_at=0)
    again = fit(branch)
    assert sorted(again.losses) == [11, 12]
    assert len([p for p in out.iterdir() if p.name.startswith("abandoned-")]) == 1
    steps = [r["step"] for r in train_log(out) if "loss" in r]
    assert steps == list(range(1, 13))
    assert logged_losses(out)[8] != old.losses[8]  # the branch's own values after its first update
    assert capsys.readouterr().out.count("continuing the branch started from") == 1


def test_a_checkpoint_replaced_mid_rename_is_put_back(tmp_path, monkeypatch):
    """Saving a step again (or converting one in place) moves the old folder aside before the new one is renamed
    into place: a crash in between (or a failing rename) must leave one complete checkpoint of that step, never
    none, and no work folder behind."""
    from pathlib import Path as P

    from amp_common.atomic import replace_dir
    from checkpoints_util.layout import remove_partial

    def complete(folder, text):
        folder.mkdir()
        (folder / "trainer.json").write_text(text)

    out = tmp_path
    complete(out / ".old-step-00000004", "old")   # killed after step-4 was moved aside ...
    complete(out / ".tmp-step-00000004", "new")   # ... and before the new one was renamed
    complete(out / ".old-step-00000006", "old6")  # killed before the new step-6 was complete
    (out / ".tmp-step-00000006").mkdir()
    # an in-place `amp-ckpt convert` killed after keeping the original and before renaming the new one ...
    (out / "format1-step-00000008").mkdir()
    (out / ".convert-step-00000008-ab12").mkdir()
    complete(out / ".convert-step-00000008-ab12" / "step-00000008", "converted8")
    complete(out / "step-00000010", "10")  # ... and one killed while still writing (step-10 untouched)
    (out / ".convert-step-00000010-cd34").mkdir()
    (out / ".convert-step-00000010-cd34" / ".tmp-step-00000010").mkdir()
    remove_partial(out)
    assert sorted(p.name for p in out.iterdir()) == ["format1-step-00000008", "step-00000004", "step-00000006",
                                                     "step-00000008", "step-00000010"]
    assert (out / "step-00000004" / "trainer.json").read_text() == "new"
    assert (out / "step-00000006" / "trainer.json").read_text() == "old6"
    assert (out / "step-00000008" / "trainer.json").read_text() == "converted8"
    assert (out / "step-00000010" / "trainer.json").read_text() == "10"

    complete(out / "new", "newer")
    real = P.rename
    monkeypatch.setattr(P, "rename", lambda self, dst: (_ for _ in ()).throw(OSError(28, "No space left"))
                        if self.name == "new" else real(self, dst))
    with pytest.raises(OSError):
        replace_dir(out / "new", out / "step-00000004", out / ".old-step-00000004")
    assert (out / "step-00000004" / "trainer.json").read_text() == "new"  # rolled back


def flip_bytes(path: Path, value: int) -> None:
    """Overwrite bytes in the middle of a file, keeping its size (what a bad disk or a bad copy does)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes([value]) * 64
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_detected_and_auto_falls_back(data_dir, tmp_path, capsys):
    straight = fit(tiny_config(data_dir, tmp_path / "straight", train__max_steps=6))
    out = copy_run(tmp_path / "straight", tmp_path / "run")
    flip_bytes(out / "step-00000006" / "__0_0.distcp", 0xFF)
    # resuming the damaged checkpoint by name: one line, exit 2
    code, err = run_main(capsys, tiny_config(data_dir, out, resume=str(out / "step-00000006"), train__max_steps=9))
    assert code == 2 and err == f"error: {out / 'step-00000006' / '__0_0.distcp'}: sha256 differs from the one " \
                                f"recorded at save time (damaged)", err
    # auto: skips it, says so, resumes step 3 and repeats steps 4-6 exactly
    result = fit(tiny_config(data_dir, out, train__max_steps=6))
    printed = capsys.readouterr().out
    assert "skipping checkpoint step-00000006: " in printed and "sha256 differs" in printed
    assert "resuming from step-00000003, the newest checkpoint that verifies" in printed
    assert sorted(result.losses) == [4, 5, 6] and result.losses == {s: straight.losses[s] for s in (4, 5, 6)}
    assert_same_tensors(checkpoint_tensors(tmp_path / "straight" / "step-00000006"),
                        checkpoint_tensors(out / "step-00000006"))


def test_nan_weights_are_never_saved(data_dir, tmp_path, monkeypatch, capsys):
    from pretrain import loop

    out = tmp_path / "run"
    real = loop._one_step

    def poison(run, thr):  # what a corrupted-but-finite-loss update would leave: NaN weights
        result = real(run, thr)
        if run.state.step == 5:
            with torch.no_grad():
                next(run.model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(loop, "_one_step", poison)
    code, err = run_main(capsys, tiny_config(data_dir, out, train__max_steps=6, checkpoint__interval=5))
    assert code == 1 and "non-finite weights after step 5: not saved" in err, err
    assert "The newest checkpoint is none" in err  # step 5 would have been the first
    assert steps_in(out) == [] and not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_a_torn_log_line_does_not_block_resume(data_dir, tmp_path, faults, capsys):
    out = tmp_path / "run"
    faults(stop_at=3)
    fit(tiny_config(data_dir, out))
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 8.1')  # killed in the middle of a write
    faults(stop_at=0)
    result = fit(tiny_config(data_dir, out))
    assert sorted(result.losses) == [4, 5, 6]
    assert "train_log.jsonl: skipped 1 damaged line(s)" in capsys.readouterr().out
    assert [r["step"] for r in train_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_second_trainer_on_the_same_out_dir_is_refused_until_the_first_dies(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path / "run", train__max_steps=2000, checkpoint__interval=0, eval__interval=0)
    first = popen_pretrain(cli_args(cfg))
    lines: list[str] = []
    try:
        assert read_until(first, "step      2/2000", lines), "".join(lines)
        code, err = run_main(capsys, cfg)
        assert code == 2 and "another training run uses this out_dir (pid " in err, err
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
    # the kernel dropped the dead run's lock: a new run starts (and is stopped right away)
    code, err = run_main(capsys, tiny_config(data_dir, tmp_path / "run", train__max_steps=1))
    assert code == 0, err


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "bytes when saved (truncated or damaged)"),
    ("missing_file", "__0_0.distcp: missing"),
    ("no_metadata", ".metadata: missing"),
    ("junk_trainer", "trainer.json: unreadable"),
    ("empty_trainer", "trainer.json: not a trainer state"),
    ("no_model_config", "model_config.yaml: missing"),
    ("code_in_metadata", "refused to load posix.system from checkpoint metadata"),
])
def test_damaged_checkpoints_are_one_line_exit_2(damage, needle, data_dir, tmp_path, capsys, three_steps):
    out = copy_run(three_steps, tmp_path / "run")
    ck = out / "step-00000003"
    marker = tmp_path / "pwned"
    if damage == "truncate":
        (ck / "__0_0.distcp").write_bytes((ck / "__0_0.distcp").read_bytes()[:1000])
    elif damage == "missing_file":
        (ck / "__0_0.distcp").unlink()
    elif damage == "no_metadata":
        (ck / ".metadata").unlink()
    elif damage == "junk_trainer":
        (ck / "trainer.json").write_text("{not json")
    elif damage == "empty_trainer":
        (ck / "trainer.json").write_text("{}")
    elif damage == "no_model_config":
        (ck / "model_config.yaml").unlink()
    else:  # a crafted .metadata whose unpickling would run a command, with a matching checksum
        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
        from amp_common.checksum import file_sha256

        trainer = json.loads((ck / "trainer.json").read_text())
        trainer["files"][".metadata"] = {"bytes": (ck / ".metadata").stat().st_size,
                                         "sha256": file_sha256(ck / ".metadata")}
        (ck / "trainer.json").write_text(json.dumps(trainer))
    code, err = run_main(capsys, tiny_config(data_dir, out, resume=str(ck), train__max_steps=6))
    assert code == 2 and err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not marker.exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("problem, needle", [
    ("no_manifest", "manifest"),
    ("unfinished_prepare", "manifest"),
    ("truncated_shard", ".bin"),
    ("too_little_data", "too little data"),
])
def test_bad_data_is_one_line_exit_2(problem, needle, data_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    cfg = tiny_config(data, tmp_path / "run", train__max_steps=3)
    if problem == "no_manifest":
        (data / "train" / "manifest.json").unlink()
    elif problem == "unfinished_prepare":
        manifest = json.loads((data / "train" / "manifest.json").read_text())
        (data / "train" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    elif problem == "truncated_shard":
        shard = sorted((data / "train").glob("*.bin"))[0]
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        cfg = tiny_config(data, tmp_path / "run", train__max_steps=3, data__seq_len=100, model__overrides={
            "block_size": 100_000}, train__global_batch_tokens=100 * 2 * 10_000, train__micro_batch_size=2)
    code, err = run_main(capsys, cfg)
    assert code == 2 and err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err


def test_out_dir_that_is_a_file_and_a_full_disk_are_one_line(data_dir, tmp_path, capsys, monkeypatch, three_steps):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run_main(capsys, tiny_config(data_dir, afile, train__max_steps=2))
    assert code == 2 and err == f"error: {afile}: cannot use it as out_dir (is a file, not a folder)", err

    from pretrain import lock

    def refuse(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    with monkeypatch.context() as m:  # root may write anywhere: make the folder refuse the lock file
        m.setattr(lock.os, "open", refuse)
        code, err = run_main(capsys, tiny_config(data_dir, tmp_path / "locked", train__max_steps=2))
    assert code == 2 and err == f"error: {tmp_path / 'locked'}: cannot use it as out_dir (Permission denied)", err

    import torch.distributed.checkpoint.filesystem as fs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = copy_run(three_steps, tmp_path / "run")  # a good checkpoint at 3
    monkeypatch.setattr(fs, "_write_item", full)
    code, err = run_main(capsys, tiny_config(data_dir, out, train__max_steps=6))
    assert code == 3 and err == f"error: {out / 'step-00000006'}: could not write the checkpoint (No space left " \
                                f"on device); nothing was kept", err
    assert steps_in(out) == [3] and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]


def test_every_torch_load_is_weights_only():
    """No file of the app, its tests or benchmarks calls torch.load without weights_only=True."""
    import ast

    offenders = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
