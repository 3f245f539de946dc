"""amp-ckpt errors: one line naming the path and the problem, exit status 2, no traceback, and nothing
(not even a temporary) left behind by a failed consolidate/export."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checkpoints_util import hf_llama
from checkpoints_util.__main__ import main
from helpers.checkpoints import random_model, reseal, save_checkpoint_of, trained_optimizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model()
    return save_checkpoint_of(tmp_path_factory.mktemp("err") / "run", 2, model, trained_optimizer(model, 1), 2048)


def copy_ckpt(ckpt: Path, dst: Path) -> Path:
    import shutil

    target = dst / "run" / ckpt.name
    shutil.copytree(ckpt, target)
    return target


def run_main(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err.strip()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_missing_path_cli_one_line_exit_2(tmp_path):
    """Through the real console entry point: exit 2, one line on stderr, no traceback."""
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "checkpoints_util", "inspect", str(missing)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert lines == [f"error: {missing}: no such file or folder"]


@pytest.mark.parametrize("what", ["file", "empty_dir", "partial", "incomplete_step"])
def test_not_a_checkpoint(what, tmp_path, capsys):
    if what == "file":
        target = tmp_path / "weights.bin"
        target.write_bytes(b"\x00" * 16)
        needle = "is a file"
    elif what == "empty_dir":
        target = tmp_path / "somewhere"
        target.mkdir()
        needle = "not a checkpoint"
    elif what == "partial":
        target = tmp_path / ".tmp-step-00000004"
        target.mkdir()
        needle = "partial checkpoint"
    else:
        target = tmp_path / "step-00000004"
        target.mkdir()
        needle = "incomplete checkpoint"
    for cmd in (["inspect", str(target)], ["export", str(target), "--format", "hf", "--out", str(tmp_path / "o")]):
        code, err = run_main(capsys, *cmd)
        assert code == 2 and err.startswith(f"error: {target}") and needle in err, err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_shapes_that_do_not_fit_the_config(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt, tmp_path)
    cfg = yaml.safe_load((bad / "model_config.yaml").read_text())
    cfg["intermediate_size"] = 200  # the stored MLP matrices are 176 wide
    (bad / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    reseal(bad, ["model_config.yaml"])  # past the checksums (consolidate and export verify them first)
    for cmd in (["inspect", str(bad)],
                ["consolidate", str(bad), "--out", str(tmp_path / "out" / "full.pth")],
                ["export", str(bad), "--format", "litgpt", "--out", str(tmp_path / "out" / "lit")],
                ["export", str(bad), "--format", "hf", "--out", str(tmp_path / "out" / "hf")]):
        code, err = run_main(capsys, *cmd)
        assert code == 2, cmd
        assert err == (f"error: {bad}: tensor 'transformer.h.0.mlp.fc_1.weight' has shape [176, 64] "
                       f"but {bad / 'model_config.yaml'} (n_layer=2, n_embd=64, n_head=4, n_query_groups=2, "
                       f"padded_vocab_size=4096) expects [200, 64]"), err
    assert leftovers(tmp_path / "out") == []  # nothing written, no temporaries


def test_missing_and_extra_tensors(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt, tmp_path)
    cfg = yaml.safe_load((bad / "model_config.yaml").read_text())
    cfg["n_layer"] = 3
    (bad / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_main(capsys, "inspect", str(bad))
    assert code == 2 and err == f"error: {bad}: does not match {bad / 'model_config.yaml'}: it says n_layer=3, the " \
                                f"checkpoint holds 2 transformer blocks", err
    cfg["n_layer"] = 2
    cfg["n_embd"], cfg["head_size"] = 32, 8  # n_layer fits; the attention and MLP matrices do not
    (bad / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_main(capsys, "inspect", str(bad))
    assert code == 2 and "has shape [" in err, err


def test_unreadable_files(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt, tmp_path)
    (bad / "__0_0.distcp").write_bytes(b"this is not a tensor file")
    damaged = f"error: {bad / '__0_0.distcp'}: 25 bytes, {(ckpt / '__0_0.distcp').stat().st_size} bytes when " \
              f"saved (truncated or damaged)"
    for cmd in (["inspect", str(bad), "--verify"], ["consolidate", str(bad), "--out", str(tmp_path / "x.pth")]):
        code, err = run_main(capsys, *cmd)
        assert code == 2 and err == damaged, err
    reseal(bad, ["__0_0.distcp"])  # the checksums match: DCP's reading fails
    code, err = run_main(capsys, "consolidate", str(bad), "--out", str(tmp_path / "x.pth"))
    err = err.splitlines()[-1]  # after the progress bar
    assert code == 2 and err.startswith(f"error: {bad}: cannot read the checkpoint (") and len(err) < 500, err
    assert not (tmp_path / "x.pth").exists()

    bad1 = copy_ckpt(ckpt, tmp_path / "a")
    (bad1 / ".metadata").write_bytes(b"\x80\x04junk")
    code, err = run_main(capsys, "inspect", str(bad1))
    assert code == 2 and err.startswith(f"error: {bad1 / '.metadata'}: unreadable"), err

    bad2 = copy_ckpt(ckpt, tmp_path / "b")
    (bad2 / "model_config.yaml").write_text("n_layer: [oops\n")
    code, err = run_main(capsys, "inspect", str(bad2))
    assert code == 2 and err.startswith(f"error: {bad2 / 'model_config.yaml'}: not a valid litgpt model config"), err

    bad3 = copy_ckpt(ckpt, tmp_path / "c")
    (bad3 / "model_config.yaml").write_text("n_layers: 2\n")  # misspelt field
    code, err = run_main(capsys, "inspect", str(bad3))
    assert code == 2 and "n_layers" in err and str(bad3 / "model_config.yaml") in err, err


def test_existing_output_is_refused_before_any_work(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(capsys, "export", str(ckpt), "--format", "hf", "--out", str(out))
    assert code == 2 and err == f"error: {out}: already exists; pass --overwrite to replace it, or choose another --out"
    assert leftovers(out) == ["keep.txt"]
    code, _ = run_main(capsys, "export", str(ckpt), "--format", "hf", "--out", str(out), "--overwrite", "--quiet")
    assert code == 0 and leftovers(out) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == ["hf"]  # the replaced folder is gone too


def test_failure_half_way_leaves_nothing(ckpt, tmp_path, monkeypatch):
    """A crash after some safetensors shards were written: no output folder, no temporaries."""
    real = hf_llama.to_hf

    def failing(name, tensor, config):
        if name.startswith("transformer.h.1."):
            raise RuntimeError("disk full (simulated)")
        return real(name, tensor, config)

    monkeypatch.setattr(hf_llama, "to_hf", failing)
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    with pytest.raises(RuntimeError, match="simulated"):
        main(["export", str(ckpt), "--format", "hf", "--out", str(out_parent / "hf"), "--max-shard-size", "100KB",
              "--quiet"])
    assert leftovers(out_parent) == []


def test_non_llama_config_is_refused_for_hf(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt, tmp_path)
    cfg = yaml.safe_load((bad / "model_config.yaml").read_text())
    cfg["parallel_residual"] = True  # same tensors, different computation
    (bad / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    reseal(bad, ["model_config.yaml"])
    code, err = run_main(capsys, "export", str(bad), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 2 and "not a plain Llama" in err and "parallel residual" in err, err
    assert not (tmp_path / "hf").exists()
    assert os.path.isdir(bad)


def test_a_closed_stdout_pipe_ends_quietly_with_0(monkeypatch, capsys):
    """`amp-ckpt inspect RUN | head`: the BrokenPipeError (an OSError) is not reported as a disk error."""
    import types

    from checkpoints_util import __main__ as cli

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "build_parser", lambda: types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(func=closed_pipe)))
    redirected = []
    monkeypatch.setattr(cli.os, "dup2", lambda fd, fd2: redirected.append(fd2))
    monkeypatch.setattr(cli.sys.stdout, "fileno", lambda: 1, raising=False)
    assert cli.main(["inspect", "run"]) == 0
    assert capsys.readouterr().err == "" and redirected == [1]
