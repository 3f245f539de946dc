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
from pathlib import Path

import pytest
import torch

from checkpoints_util.__main__ import main as ckpt_main
from helpers.checkpoints import code_running_pickle, reseal
from helpers.runs import cli_args, tiny_config
from pretrain.__main__ import main as pretrain_main

STEP = "step-00000002"


# ------------------------------------------------------------------------------------------ payloads
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
        "p4-stack-global-dotted-os.system": code_running_pickle(fs, "os.system", touch),
        "p4-global-dotted-os.system": code_running_pickle(fs, "os.system", touch, opcode="GLOBAL"),
        "p4-metadata-module-os.system": code_running_pickle(md, "os.system", touch),
        "p4-pickle.loads-to-reduce-eval": code_running_pickle(fs, "pickle.loads",
                                                              pickle.dumps(_Reduce(eval, evil_eval), protocol=2)),
        "p2-global-dotted-os.system": code_running_pickle(fs, "os.system", touch, proto=2, opcode="GLOBAL"),
        "p2-stack-global-dotted-os.system": code_running_pickle(fs, "os.system", touch, proto=2),
        "p2-reduce-eval": pickle.dumps(_Reduce(eval, evil_eval), protocol=2),
        "p4-reduce-os.system": pickle.dumps(_Reduce(os.system, touch), protocol=4),
    }


PAYLOAD_IDS = list(payloads(Path("x")))


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


def mistype_entry(folder: Path, key: str, how: str) -> None:
    """Give `key`'s metadata entry a dtype, size or chunk list of the wrong kind (DCP's own classes around it)."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    entry = meta.state_dict_metadata[key]
    if how == "dtype-a-string":
        entry.properties.dtype = "float32"
    elif how == "size-negative":
        entry.size = torch.Size([-4, 3])
    elif how == "chunks-a-string":
        entry.chunks = "x"
    elif how == "chunk-offsets-a-string":
        entry.chunks[0].offsets = "ab"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("how", ["dtype-a-string", "size-negative", "chunks-a-string", "chunk-offsets-a-string"])
@pytest.mark.parametrize("verb", ["inspect", "consolidate"])
def test_a_mistyped_metadata_entry_is_one_line(how, verb, run_dir, tmp_path, capsys):
    """DCP's classes holding values of another kind (a crafted pickle can) are refused, not a traceback."""
    out, ck = crafted(run_dir, tmp_path, lambda f: mistype_entry(f, "model.lm_head.weight", how))
    argv = ["inspect", str(ck)] if verb == "inspect" else ["consolidate", str(ck), "--quiet", "--out",
                                                                         str(tmp_path / "m.pt")]
    code = ckpt_main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and ".metadata" in line and "'model.lm_head.weight'" in line, line
    assert not (tmp_path / "m.pt").exists()


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


# ------------------------------------------------------------------------------------------ trainer.json, YAML
def malform(how: str):
    """A change to trainer.json (a parsed dict, or a replacement document)."""
    def change(trainer: dict):
        files = trainer["files"]
        first = sorted(files)[0]
        if how == "files-list":
            trainer["files"] = sorted(files)
        elif how == "files-string":
            trainer["files"] = "all of them"
        elif how == "files-missing":
            del trainer["files"]
        elif how == "files-empty":
            trainer["files"] = {}
        elif how == "entry-without-sha256":
            del files[first]["sha256"]
        elif how == "entry-without-bytes":
            del files[first]["bytes"]
        elif how == "bytes-a-string":
            files[first]["bytes"] = str(files[first]["bytes"])
        elif how == "bytes-negative":
            files[first]["bytes"] = -1
        elif how == "sha256-a-number":
            files[first]["sha256"] = 12
        elif how == "entry-a-list":
            files[first] = [files[first]["bytes"], files[first]["sha256"]]
        elif how == "name-outside":
            files["../../etc/passwd"] = files.pop(first)
        elif how == "step-a-string":
            trainer["step"] = str(trainer["step"])
        elif how == "step-a-bool":
            trainer["step"] = True
        elif how == "step-huge":
            trainer["step"] = 10**30
        elif how == "not-an-object":
            return [trainer]
        return trainer
    return change


MALFORMED = ["files-list", "files-string", "files-missing", "files-empty", "entry-without-sha256",
             "entry-without-bytes", "bytes-a-string", "bytes-negative", "sha256-a-number", "entry-a-list",
             "name-outside", "step-a-string", "step-a-bool", "step-huge", "not-an-object"]


def rewrite_trainer(folder: Path, how: str) -> None:
    f = folder / "trainer.json"
    f.write_text(json.dumps(malform(how)(json.loads(f.read_text()))))


@pytest.mark.parametrize("how", MALFORMED)
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "plain"])
def test_malformed_trainer_json_is_one_line_in_inspect(how, verify, run_dir, tmp_path, capsys):
    ck = tmp_path / STEP
    shutil.copytree(run_dir / STEP, ck)
    rewrite_trainer(ck, how)
    code = ckpt_main(["inspect", str(ck), *(["--verify"] if verify else [])])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "trainer.json" in line, line


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory) -> Path:
    """A 4-step run of the app with checkpoints at steps 2 and 4."""
    from pretrain.loop import fit

    out = tmp_path_factory.mktemp("sec2") / "run"
    fit(tiny_config(data_dir, out, train__max_steps=4, checkpoint__interval=2, eval__interval=2))
    return out


@pytest.mark.parametrize("how", ["files-list", "entry-without-sha256",  # a trainer start each: the rest extended
                                 pytest.param("files-string", marks=pytest.mark.extended),
                                 pytest.param("step-a-string", marks=pytest.mark.extended),
                                 pytest.param("not-an-object", marks=pytest.mark.extended),
                                 pytest.param("bytes-a-string", marks=pytest.mark.extended),
                                 pytest.param("name-outside", marks=pytest.mark.extended)])
def test_malformed_trainer_json_is_damaged_and_auto_falls_back(how, two_checkpoints, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    rewrite_trainer(out / "step-00000004", how)
    code = pretrain_main(cli_args(tiny_config(data_dir, out, train__max_steps=4, checkpoint__interval=2,
                                              eval__interval=2)))
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err, captured.err
    assert "skipping checkpoint step-00000004: " in captured.out and "trainer.json" in captured.out
    assert "resuming from step-00000002, the newest checkpoint that verifies" in captured.out
    assert [p.name for p in out.glob("damaged-*/*")] == ["step-00000004"]


MARKER_TAG = "!!python/object/apply:os.system [\"touch {marker}\"]"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"


@pytest.mark.parametrize("name, text, needle", [
    ("model_config.yaml", MARKER_TAG, "not a valid litgpt model config"),
    ("model_config.yaml", "name: debug\nn_layer: &n 2\nn_head: *n\n", "aliases"),
    ("model_config.yaml", "- 1\n- 2\n", "expected a mapping"),
    ("model_config.yaml", "{MODEL}n_embd: abc\n", "not a valid litgpt model config"),
    ("model_config.yaml", "{MODEL}n_layer: 1000000000\n", "n_layer=1000000000"),
    ("model_config.yaml", "{MODEL}n_head: 0\n", "not a valid litgpt model config"),
    ("model_config.yaml", "{MODEL}vocab_size: true\n", "vocab_size must be an integer >= 1, got True"),
    ("model_config.yaml", "{MODEL}n_query_groups: 3\n", "n_query_groups (3) must divide n_head (4)"),  # was no reason
    ("model_config.yaml", "{MODEL}mlp_class_name: Foo\n", "mlp_class_name must be one of"),
    ("config.yaml", MARKER_TAG, "config.yaml: invalid YAML"),
    ("config.yaml", BOMB, "aliases"),
    ("config.yaml", "[1, 2]\n", "not a training config"),
], ids=["mc-python-tag", "mc-alias", "mc-list", "mc-n_embd-str", "mc-n_layer-huge", "mc-n_head-0", "mc-vocab-bool",
        "mc-query-groups-3", "mc-mlp-class", "cfg-python-tag", "cfg-alias-bomb", "cfg-list"])
def test_crafted_yaml_files_are_one_line(name, text, needle, run_dir, tmp_path, capsys):
    import yaml

    marker = tmp_path / "pwned"
    ck = tmp_path / STEP
    shutil.copytree(run_dir / STEP, ck)
    changed = {ln.split(":")[0] for ln in text.replace("{MODEL}", "").splitlines()}
    model = {k: v for k, v in yaml.safe_load((ck / "model_config.yaml").read_text()).items() if k not in changed}
    (ck / name).write_text(text.replace("{marker}", str(marker)).replace("{MODEL}", yaml.safe_dump(model)))
    reseal(ck, [name])
    for args in (["inspect", str(ck)], ["inspect", "--json", "--verify", str(ck)]):
        code = ckpt_main(args)
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and name in line and needle in line, line
    assert not marker.exists()


def test_crafted_model_config_is_one_line_on_resume(run_dir, data_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out, ck = crafted(run_dir, tmp_path, lambda f: (f / "model_config.yaml").write_text(
        MARKER_TAG.replace("{marker}", str(marker))))
    code, err = entry_point("resume-path", out, ck, data_dir, capsys)
    line = one_error_line(err)
    assert code == 2 and "model_config.yaml" in line and not marker.exists(), line


@pytest.mark.parametrize("field, value", [("mlp_class_name", "Foo"), ("rope_adjustments", 5)])
def test_crafted_model_config_is_one_line_through_init_from(field, value, run_dir, data_dir, tmp_path, capsys):
    """--init.from builds the model of PATH's model_config.yaml: names litgpt looks up were a traceback, exit 1."""
    import yaml

    def change(folder: Path) -> None:
        f = folder / "model_config.yaml"
        f.write_text(yaml.safe_dump({**yaml.safe_load(f.read_text()), field: value}))

    _, ck = crafted(run_dir, tmp_path, change)
    args = cli_args(tiny_config(data_dir, tmp_path / "fresh", init__from=str(ck), train__max_steps=1))
    i = args.index("--model.name")
    del args[i:i + 4]  # --model.name debug --model.overrides {}: unset, the model comes from init.from
    assert not any(a.startswith("--model.") for a in args)
    code = pretrain_main(args)
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "model_config.yaml" in line and field in line, line


# ------------------------------------------------------------------------------------------ damaged -> no export
@pytest.mark.parametrize("verb", [["consolidate", "--out", "{out}/model.pth"],
                                  ["consolidate", "--with-optimizer", "--out", "{out}/model.pth"],
                                  ["export", "--format", "litgpt", "--out", "{out}/lit"],
                                  ["export", "--format", "hf", "--out", "{out}/hf"]],
                         ids=["consolidate", "consolidate-optimizer", "export-litgpt", "export-hf"])
def test_a_damaged_checkpoint_is_not_exported(verb, run_dir, tmp_path, capsys):
    """A flipped byte in a .distcp file would be NaN (or 3e38) in the output: verify first, as resume does."""
    ck = tmp_path / STEP
    shutil.copytree(run_dir / STEP, ck)
    data = bytearray((ck / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / "__0_0.distcp").write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    code = ckpt_main([verb[0], str(ck), *[a.replace("{out}", str(out)) for a in verb[1:]], "--quiet"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line == f"error: {ck / '__0_0.distcp'}: sha256 differs from the one recorded at save " \
                                 f"time (damaged)", line
    assert list(out.iterdir()) == []
