"""Every command-line entry point over a table of bad inputs, each run as a user would (a subprocess from the
repo root): no traceback, an exit code of `amp_common/exits.py`, one `error:` line on stderr that names the
file or option, and no file created or changed outside the case's own output folder `{out}` (the case's
folder, the shared fixtures and the repo checkout are compared before and after).

The table is the place new cases go: append a `Case(id, argv, expect_rc, expect_in_message, setup)`.
`argv` starts with the module to run (`pretrain`, `data.prepare`, `data.tokenizer`, `checkpoints_util`,
`benchmarks.NAME`); these words in it are replaced (each is a path):

| word | what |
|---|---|
| `{tmp}` | the case's own empty folder (crafted inputs go here; must not change during the run) |
| `{out}` | `{tmp}/out`, not created: the only place the command may write |
| `{data}` | a small prepared data folder shared by the module (must not change) |
| `{ckpt}` | a run folder with one valid `debug` checkpoint, shared (must not change; `copy_ckpt` copies it) |
| `{sample}` | `data/sample` of the repo (tokenizer.model, the sample sources) |

`setup(tmp, fx)` builds crafted files under `tmp` before the run (`fx.data` / `fx.ckpt` are the shared
fixtures). `writes_nothing` says that not even `{out}` may be created. `max_memory_mb` caps the run's address
space (RLIMIT_AS), so that an input that would fill the memory fails the case instead of the machine. Keep
rows fast: argument and config errors fail before any training.
"""
from __future__ import annotations

import gzip
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from amp_common import exits
from helpers.corpus import train_bpe_json, write_parquet
from helpers.data import REPO, SAMPLE

EXIT_CODES = {exits.OK, exits.NON_FINITE, exits.BAD_INPUT, exits.DISK, exits.PEER_LOST, exits.INTERRUPTED,
              exits.SIGTERM}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
# No tool writes source or docs; people edit them while tests run, so changes to these are not counted in the repo.
EDITED_SUFFIXES = (".py", ".md")
TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    expect_rc: int
    expect_in_message: str
    setup: Optional[Callable[[Path, "Fixtures"], None]] = None
    max_memory_mb: Optional[int] = None
    writes_nothing: bool = False  # {out} must not exist afterwards either


class Fixtures:
    """Inputs shared by the module's cases, built on first use."""

    def __init__(self, root: Path, data_dir_factory: Callable[[], Path]):
        self.root = root
        self._data_dir_factory = data_dir_factory
        self._data: Path | None = None
        self._ckpt: Path | None = None

    @property
    def data(self) -> Path:
        if self._data is None:
            self._data = self._data_dir_factory()
        return self._data

    @property
    def ckpt(self) -> Path:
        if self._ckpt is None:
            from helpers.checkpoints import random_model, save_checkpoint_of, trained_optimizer

            model = random_model()
            run = self.root / "ckpt-run"
            save_checkpoint_of(run, 2, model, trained_optimizer(model), tokens_seen=512)
            self._ckpt = run
        return self._ckpt

    def roots(self) -> list[Path]:
        return [p for p in (self._data, self._ckpt) if p is not None]


# ------------------------------------------------------------------------------------------ setups
def write(name: str, content: bytes | str) -> Callable[[Path, Fixtures], None]:
    """A setup writing `tmp/name` (bytes or text)."""
    def setup(tmp: Path, fx: Fixtures) -> None:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def gz(name: str, lines: list[bytes]) -> Callable[[Path, Fixtures], None]:
    """A setup writing `tmp/name` as gzip'd lines."""
    return write(name, gzip.compress(b"\n".join(lines) + b"\n"))


def copy_ckpt(name: str = "run", damage: Callable[[Path], None] | None = None) -> Callable[[Path, Fixtures], None]:
    """A setup copying the shared checkpoint run folder to `tmp/name`, then `damage(copy)` if given."""
    def setup(tmp: Path, fx: Fixtures) -> None:
        shutil.copytree(fx.ckpt, tmp / name)
        if damage is not None:
            damage(tmp / name)
    return setup


def in_step(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """A `copy_ckpt` damage: `change(the copy's step folder)`, then its checksums re-recorded in trainer.json (as a
    crafted checkpoint would carry them), so the change reaches the code past the checksum check."""
    def damage(run: Path) -> None:
        from helpers.checkpoints import reseal

        step = next(run.glob("step-*"))
        change(step)
        reseal(step, sorted(f.name for f in step.iterdir() if f.name != "trainer.json"))
    return damage


def code_in_metadata(step: Path) -> None:
    """A .metadata whose unpickling would create `{tmp}/pwned` (which the table's check of {tmp} would catch)."""
    from helpers.checkpoints import code_running_pickle

    marker = step.parent.parent / "pwned"
    (step / ".metadata").write_bytes(code_running_pickle("torch.distributed.checkpoint.filesystem", "os.system",
                                                         f"touch {marker}"))


def trainer_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """A `copy_ckpt` damage: `change(trainer.json as a dict)` of the copy's step folder."""
    def damage(run: Path) -> None:
        import json

        f = next(run.glob("step-*")) / "trainer.json"
        trainer = json.loads(f.read_text())
        change(trainer)
        f.write_text(json.dumps(trainer))
    return damage


def flip_a_byte(run: Path) -> None:
    f = next(run.glob("step-*")) / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def both(*setups: Callable[[Path, Fixtures], None]) -> Callable[[Path, Fixtures], None]:
    def setup(tmp: Path, fx: Fixtures) -> None:
        for s in setups:
            s(tmp, fx)
    return setup


HF_DEBUG_CONFIG = ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, '
                   '"intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, '
                   '"num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 128}')


def hf_export(name: str, tensor: str, change: Callable) -> Callable[[Path, Fixtures], None]:
    """A setup exporting the shared checkpoint to a Hugging Face folder `tmp/name`, one tensor changed."""
    def setup(tmp: Path, fx: Fixtures) -> None:
        from safetensors.torch import load_file, save_file

        from checkpoints_util.export import export_hf

        export_hf(fx.ckpt, tmp / name)
        sd = load_file(tmp / name / "model.safetensors")
        sd[tensor] = change(sd[tensor]).contiguous()
        save_file(sd, tmp / name / "model.safetensors")
    return setup


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" YAML mapping: `levels` lists of nine aliases to the list before, 9**levels values."""
    items = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        items.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "{" + ", ".join(items) + "}"


# ------------------------------------------------------------------------------------------ the table
PRETRAIN = ["pretrain", "--out_dir", "{out}", "--data.dir", "{data}", "--model.name", "debug",
            "--train.max_steps", "2"]
PREPARE = ["data.prepare", "--out", "{out}", "--no-progress", "--workers", "1"]

CASES = [
    # --- pretrain: options and config files
    Case("pretrain-max-steps-0", [*PRETRAIN, "--train.max_steps", "0"], 2, "train.max_steps"),
    Case("pretrain-unknown-option", [*PRETRAIN, "--train.nonsense", "1"], 2, "train.nonsense"),
    Case("pretrain-bad-choice", [*PRETRAIN, "--optimizer.name", "sgd"], 2, "optimizer.name"),
    Case("pretrain-not-a-number", [*PRETRAIN, "--optimizer.lr", "fast"], 2, "optimizer.lr"),
    Case("pretrain-lr-nan", [*PRETRAIN, "--optimizer.lr", "nan"], 2, "optimizer.lr"),
    Case("pretrain-config-missing", [*PRETRAIN, "--config", "{tmp}/missing.yaml"], 2, "missing.yaml"),
    Case("pretrain-config-bad-yaml", [*PRETRAIN, "--config", "{tmp}/bad.yaml"], 2, "bad.yaml",
         write("bad.yaml", "train: [unclosed\n")),
    Case("pretrain-config-not-mapping", [*PRETRAIN, "--config", "{tmp}/list.yaml"], 2, "list.yaml",
         write("list.yaml", "- 1\n- 2\n")),
    Case("pretrain-config-unknown-key", [*PRETRAIN, "--config", "{tmp}/c.yaml"], 2, "train.speed",
         write("c.yaml", "train:\n  speed: 3\n")),
    Case("pretrain-config-binary", [*PRETRAIN, "--config", "{tmp}/c.yaml"], 2, "c.yaml",
         write("c.yaml", b"\xff\xfe\x00garbage")),
    Case("pretrain-override-unknown-field", [*PRETRAIN, "--model.overrides", "{n_layers: 2}"], 2, "n_layers"),
    Case("pretrain-override-not-mapping", [*PRETRAIN, "--model.overrides", "[1, 2]"], 2,
         "model.overrides: expected a mapping"),
    Case("pretrain-config-is-folder", [*PRETRAIN, "--config", "{tmp}"], 2, "config file not found"),
    Case("pretrain-override-alias-bomb", [*PRETRAIN, "--model.overrides", alias_bomb()], 2,
         "--model.overrides: YAML aliases", max_memory_mb=1024),
    Case("pretrain-option-alias-bomb", [*PRETRAIN, "--out_dir", alias_bomb()], 2, "--out_dir: YAML aliases",
         max_memory_mb=1024),
    Case("pretrain-config-alias-bomb", [*PRETRAIN, "--config", "{tmp}/bomb.yaml"], 2, "bomb.yaml",
         write("bomb.yaml", f"model:\n  overrides: {alias_bomb()}\n"), max_memory_mb=1024),
    Case("pretrain-override-deep-nesting", [*PRETRAIN, "--model.overrides", "[" * 5000 + "]" * 5000], 2,
         "--model.overrides: YAML nested deeper"),
    Case("pretrain-config-deep-nesting", [*PRETRAIN, "--config", "{tmp}/deep.yaml"], 2, "deep.yaml",
         write("deep.yaml", "model: {overrides: " + "[" * 5000 + "]" * 5000 + "}\n")),
    Case("pretrain-n-layer-negative", [*PRETRAIN, "--model.overrides", "{n_layer: -1}"], 2,
         "model.overrides: n_layer must be an integer >= 1, got -1"),
    Case("pretrain-head-size-0", [*PRETRAIN, "--model.overrides", "{head_size: 0}"], 2,
         "model.overrides: head_size must be an integer >= 1, got 0"),
    Case("pretrain-query-groups-not-dividing", [*PRETRAIN, "--model.overrides", "{n_query_groups: 3}"], 2,
         "model.overrides: n_query_groups (3) must divide n_head (4)"),
    Case("pretrain-mlp-class-unknown", [*PRETRAIN, "--model.overrides", "{mlp_class_name: Foo}"], 2,
         "model.overrides: mlp_class_name must be one of"),  # was an AttributeError traceback, exit 1
    Case("pretrain-resume-not-step", [*PRETRAIN, "--resume", "{tmp}/elsewhere"], 2, "resume"),
    Case("pretrain-collective-timeout-0", [*PRETRAIN, "--system.collective_timeout_s", "0"], 2,
         "system.collective_timeout_s must be a number of seconds > 0"),
    Case("pretrain-stop-grace-negative", [*PRETRAIN, "--system.stop_grace_s", "-1"], 2,
         "system.stop_grace_s must be a number of seconds >= 0"),
    Case("pretrain-stop-grace-nan", [*PRETRAIN, "--system.stop_grace_s", "nan"], 2, "system.stop_grace_s"),
    # a checkpoint whose model does not fit this run (tests/test_pretrain_run_safety.py: nothing in out_dir moves)
    Case("pretrain-resume-model-misfit", [*PRETRAIN, "--resume", "{ckpt}/step-00000002", "--model.overrides",
                                          "{n_layer: 1}", "--data.seq_len", "32", "--train.global_batch_tokens", "256",
                                          "--train.micro_batch_size", "2", "--system.accelerator", "cpu"], 2,
         "n_layer (2 vs 1)"),
    Case("pretrain-data-missing", [*PRETRAIN, "--data.dir", "{tmp}/nodata",
                                   "--train.global_batch_tokens", "256", "--data.seq_len", "32",
                                   "--train.micro_batch_size", "2", "--system.accelerator", "cpu"], 2, "nodata"),
    # --- data.prepare
    Case("prepare-workers-0", [*PREPARE[:4], "--workers", "0"], 2, "--workers"),
    Case("prepare-shard-tokens-0", [*PREPARE, "--shard-tokens", "0"], 2, "--shard-tokens"),
    Case("prepare-train-missing", [*PREPARE, "--train", "{tmp}/nothing.json.gz"], 2, "nothing.json.gz"),
    Case("prepare-unknown-format", [*PREPARE, "--train", "{tmp}/a.txt"], 2, "a.txt", write("a.txt", "hello\n")),
    Case("prepare-not-gzip", [*PREPARE, "--train", "{tmp}/a.json.gz"], 2, "a.json.gz",
         write("a.json.gz", "not gzip at all\n")),
    Case("prepare-line-not-json", [*PREPARE, "--train", "{tmp}/a.json.gz"], 2, "line 2",
         gz("a.json.gz", [b'{"text": "fine"}', b"{oops"])),
    Case("prepare-no-text-field", [*PREPARE, "--train", "{tmp}/a.json.gz"], 2, "'text'",
         gz("a.json.gz", [b'{"body": "x"}'])),
    Case("prepare-tokenizer-missing", [*PREPARE, "--tokenizer", "{tmp}/no.model", "--train", "{tmp}/a.json.gz"],
         2, "no.model", gz("a.json.gz", [b'{"text": "fine"}'])),
    Case("prepare-tokenizer-garbage", [*PREPARE, "--tokenizer", "{tmp}/t.model", "--train", "{tmp}/a.json.gz"],
         2, "t.model", both(gz("a.json.gz", [b'{"text": "fine"}']), write("t.model", b"\x00" * 64))),
    Case("prepare-parquet-damaged", [*PREPARE, "--train", "{tmp}/a.parquet"], 2, "a.parquet: not a readable parquet",
         write("a.parquet", b"PAR1" + b"\x00" * 60 + b"PAR1")),
    Case("prepare-parquet-missing-column", [*PREPARE, "--train", "{tmp}/a.parquet"], 2,
         "a.parquet: no column 'text'", lambda tmp, fx: write_parquet(tmp / "a.parquet", ["x y"], column="body")),
    Case("prepare-parquet-not-strings", [*PREPARE, "--train", "{tmp}/a.parquet", "--text-field", "id"], 2,
         "a.parquet: column 'id' holds int64", lambda tmp, fx: write_parquet(tmp / "a.parquet", ["x y"])),
    Case("prepare-tokenizer-json-no-bos-eos", [*PREPARE, "--tokenizer", "{tmp}/tok.json", "--train",
                                               "{tmp}/a.json.gz"], 2, "tok.json: no BOS or EOS token",
         both(gz("a.json.gz", [b'{"text": "fine"}']),
              lambda tmp, fx: train_bpe_json(tmp / "tok.json", ["a b c"] * 5, vocab_size=270, template=False))),
    Case("prepare-part-out-of-range", [*PREPARE, "--part", "4/3"], 2, "--part"),
    Case("prepare-out-is-file", ["data.prepare", "--out", "{tmp}/f", "--no-progress"], 2, "is a file, not a folder",
         write("f", "x")),
    Case("prepare-empty-gz", [*PREPARE, "--train", "{tmp}/a.json.gz"], 2, "a.json.gz: empty file (0 bytes)",
         write("a.json.gz", b""), writes_nothing=True),
    Case("prepare-empty-zst", [*PREPARE, "--train", "{tmp}/ok.json.gz", "--val", "{tmp}/v.jsonl.zst"], 2,
         "v.jsonl.zst: empty file (0 bytes)", both(gz("ok.json.gz", [b'{"text": "fine"}']), write("v.jsonl.zst", b"")),
         writes_nothing=True),
    Case("prepare-train-is-val", [*PREPARE, "--train", "{tmp}/a.json.gz", "--val", "{tmp}/a.json.gz"], 2,
         "both a --train and a --val source", gz("a.json.gz", [b'{"text": "fine"}']), writes_nothing=True),
    Case("prepare-train-is-val-through-glob-and-link",
         [*PREPARE, "--train", "{tmp}/src/*.json.gz", "--val", "{tmp}/link.json.gz"], 2,
         "both a --train and a --val source",
         both(gz("src/a.json.gz", [b'{"text": "fine"}']), gz("src/b.json.gz", [b'{"text": "also fine"}']),
              lambda tmp, fx: (tmp / "link.json.gz").symlink_to(tmp / "src" / "b.json.gz")), writes_nothing=True),
    Case("prepare-same-file-twice-hard-link", [*PREPARE, "--train", "{tmp}/a.json.gz", "{tmp}/b.json.gz"], 2,
         "given twice in --train",
         both(gz("a.json.gz", [b'{"text": "fine"}']), lambda tmp, fx: os.link(tmp / "a.json.gz", tmp / "b.json.gz")),
         writes_nothing=True),
    # --- data.tokenizer
    Case("tokenizer-vocab-too-small", ["data.tokenizer", "--out", "{out}/t.model", "--vocab-size", "10"],
         2, "--vocab-size"),
    Case("tokenizer-input-missing", ["data.tokenizer", "--out", "{out}/t.model", "--input", "{tmp}/no.json.gz"],
         2, "no.json.gz"),
    Case("tokenizer-threads-0", ["data.tokenizer", "--out", "{out}/t.model", "--num-threads", "0"],
         2, "--num-threads"),
    Case("tokenizer-out-is-folder", ["data.tokenizer", "--out", "{tmp}"], 2, "--out"),  # was exit 3 after training
    # --- amp-ckpt
    Case("ckpt-no-command", ["checkpoints_util"], 2, "COMMAND"),
    Case("ckpt-export-bad-format", ["checkpoints_util", "export", "{tmp}/x", "--format", "xx", "--out", "{out}"], 2,
         "--format"),
    Case("ckpt-inspect-a-file", ["checkpoints_util", "inspect", "{tmp}/f"], 2, "is a file", write("f", "x")),
    Case("ckpt-inspect-missing", ["checkpoints_util", "inspect", "{tmp}/nothing"], 2, "nothing"),
    Case("ckpt-inspect-empty-run", ["checkpoints_util", "inspect", "{tmp}/run"], 2, "run",
         lambda tmp, fx: (tmp / "run").mkdir()),
    Case("ckpt-consolidate-missing", ["checkpoints_util", "consolidate", "{tmp}/nothing", "--out", "{out}/m.pt"],
         2, "nothing"),
    Case("ckpt-export-missing", ["checkpoints_util", "export", "{tmp}/nothing", "--format", "litgpt",
                                 "--out", "{out}"], 2, "nothing"),
    Case("ckpt-convert-missing", ["checkpoints_util", "convert", "{tmp}/nothing", "--out", "{out}"], 2, "nothing"),
    Case("ckpt-inspect-missing-file", ["checkpoints_util", "inspect", "--verify", "{tmp}/run"], 2, "trainer.json",
         copy_ckpt("run", lambda run: next(run.glob("step-*/trainer.json")).unlink())),
    Case("ckpt-inspect-code-in-metadata", ["checkpoints_util", "inspect", "{tmp}/run"], 2,
         "refused to load torch.distributed.checkpoint.filesystem.os.system",
         copy_ckpt("run", in_step(code_in_metadata))),
    Case("ckpt-verify-trainer-files-a-list", ["checkpoints_util", "inspect", "--verify", "{tmp}/run"], 2,
         "trainer.json: 'files' is a list",
         copy_ckpt("run", trainer_json(lambda t: t.update(files=sorted(t["files"]))))),
    Case("ckpt-verify-trainer-entry-without-sha256", ["checkpoints_util", "inspect", "--verify", "{tmp}/run"], 2,
         "trainer.json: 'files' entry",
         copy_ckpt("run", trainer_json(lambda t: t["files"][".metadata"].pop("sha256")))),
    Case("ckpt-consolidate-damaged", ["checkpoints_util", "consolidate", "{tmp}/run", "--out", "{out}/m.pt"], 2,
         "sha256 differs", copy_ckpt("run", flip_a_byte)),
    Case("ckpt-export-damaged", ["checkpoints_util", "export", "{tmp}/run", "--format", "hf", "--out", "{out}/hf"], 2,
         "sha256 differs", copy_ckpt("run", flip_a_byte)),
    Case("ckpt-export-config-alias", ["checkpoints_util", "export", "{tmp}/run", "--format", "litgpt", "--out",
                                      "{out}/lit"], 2, "config.yaml: invalid YAML (YAML aliases",
         copy_ckpt("run", in_step(lambda step: (step / "config.yaml").write_text(alias_bomb())))),
    Case("ckpt-inspect-model-config-python-tag", ["checkpoints_util", "inspect", "{tmp}/run"], 2,
         "model_config.yaml: not a valid litgpt model config", copy_ckpt("run", in_step(
             lambda step: (step / "model_config.yaml").write_text("!!python/object/apply:os.system [ls]\n")))),
    Case("pretrain-resume-code-in-metadata", [*PRETRAIN, "--resume", "{tmp}/run/step-00000002", "--data.seq_len", "32",
                                              "--train.global_batch_tokens", "256", "--train.micro_batch_size", "2",
                                              "--system.accelerator", "cpu"], 2,
         "refused to load torch.distributed.checkpoint.filesystem.os.system",
         copy_ckpt("run", in_step(code_in_metadata))),
    Case("ckpt-import-missing", ["checkpoints_util", "import", "{tmp}/nothing", "--out", "{out}"], 2, "nothing"),
    Case("ckpt-import-not-llama", ["checkpoints_util", "import", "{tmp}/hf", "--out", "{out}"], 2,
         "only LlamaForCausalLM", write("hf/config.json", '{"architectures": ["MistralForCausalLM"], '
                                                          '"model_type": "mistral"}')),
    Case("ckpt-import-index-escapes", ["checkpoints_util", "import", "{tmp}/hf", "--out", "{out}"], 2,
         "'../../etc/passwd' is not the name of a .safetensors file",
         both(write("hf/config.json", HF_DEBUG_CONFIG),
              write("hf/model.safetensors.index.json", '{"weight_map": {"lm_head.weight": "../../etc/passwd"}}'))),
    Case("ckpt-import-shard-missing", ["checkpoints_util", "import", "{tmp}/hf", "--out", "{out}"], 2,
         "lists model-00002-of-00002.safetensors", both(write("hf/config.json", HF_DEBUG_CONFIG), write(
             "hf/model.safetensors.index.json", '{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"'
                                                '}}'))),
    Case("ckpt-import-wrong-shape", ["checkpoints_util", "import", "{tmp}/hf", "--out", "{out}"], 2,
         "has shape [176, 63]", hf_export("hf", "model.layers.0.mlp.up_proj.weight", lambda t: t[:, :-1])),
    Case("pretrain-init-from-missing", [*PRETRAIN, "--init.from", "{tmp}/nothing"], 2, "init.from"),
    Case("pretrain-init-from-disagrees", [*PRETRAIN, "--init.from", "{ckpt}", "--model.overrides",
                                          "{intermediate_size: 20}"], 2, "intermediate_size (176 vs 20)"),
    # --- benchmarks that take input
    Case("bench-data-throughput-workers", ["benchmarks.data_throughput", "--workers", "0"], 2, "--workers"),
    Case("bench-data-throughput-loader-workers", ["benchmarks.data_throughput", "--loader-workers", "x"],
         2, "--loader-workers"),
    Case("bench-cpu-pretrain-runs", ["benchmarks.cpu_pretrain", "--runs", "tpu:2"], 2, "--runs"),
    Case("bench-prepare-memory-mb-0", ["benchmarks.prepare_memory", "--mb", "0"], 2, "--mb"),
    Case("bench-optimizer-comparison-lrs", ["benchmarks.optimizer_comparison", "--lrs", "fast"], 2, "--lrs"),
    *(Case(f"bench-{name}-unknown-option", [f"benchmarks.{name}", "--no-such-option"], 2, "--no-such-option")
      for name in ("fsdp_layout", "gpu_pretrain", "memory_table", "optim_step", "optimizer_comparison",
                   "import_memory", "network_bytes")),
]


# ------------------------------------------------------------------------------------------ the check
def snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (kind, size, mtime_ns) of everything under `root` (caches and .git left out)."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        base = Path(dirpath)
        for d in dirnames:
            out[str((base / d).relative_to(root)) + "/"] = ("dir",)
        for f in filenames:
            p = base / f
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


def memory_limit(mb: int | None) -> Callable[[], None] | None:
    if mb is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))


def substitute(arg: str, words: dict[str, str]) -> str:
    for word, value in words.items():
        arg = arg.replace("{" + word + "}", value)
    return arg


@pytest.fixture(scope="module")
def fx(tmp_path_factory, request):
    return Fixtures(tmp_path_factory.mktemp("cli_fixtures"), lambda: request.getfixturevalue("data_dir"))


def run_case(case: Case, tmp: Path, fx: Fixtures) -> tuple[int, str, str]:
    if case.setup is not None:
        case.setup(tmp, fx)
    words = {"tmp": str(tmp), "out": str(tmp / "out"), "sample": str(SAMPLE)}
    if any("{data}" in a for a in case.argv):
        words["data"] = str(fx.data)
    if any("{ckpt}" in a for a in case.argv):
        words["ckpt"] = str(fx.ckpt)
    argv = [substitute(a, words) for a in case.argv]
    sys_tmp = tmp / "systmp"  # the tools' temporary files: must be gone when they exit
    sys_tmp.mkdir()
    roots = {"tmp": tmp, "repo": REPO, **{f"fixture{i}": r for i, r in enumerate(fx.roots())}}
    before = {name: snapshot(root) for name, root in roots.items()}
    env = {**os.environ, "TMPDIR": str(sys_tmp), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, preexec_fn=memory_limit(case.max_memory_mb))
    changed = []
    for name, root in roots.items():
        diff = changes(before[name], snapshot(root))
        if name == "tmp":
            diff = [k for k in diff if k.split("/")[0] not in ("out", "systmp")]
        if name == "repo":
            diff = [k for k in diff if not k.endswith(EDITED_SUFFIXES)]
        changed += [f"{name}: {k}" for k in diff]
    assert not changed, f"files created or changed outside {{out}}: {changed}"
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, fx: Fixtures):
    assert case.expect_rc in EXIT_CODES, f"{case.id}: {case.expect_rc} is not an exit code of amp_common/exits.py"
    rc, out, err = run_case(case, tmp_path, fx)
    shown = f"rc={rc}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert "Traceback" not in out + err, shown
    assert rc == case.expect_rc, shown
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one 'error:' line on stderr\n{shown}"
    assert case.expect_in_message in lines[0], f"{case.expect_in_message!r} not in the message\n{shown}"
    if case.writes_nothing:
        assert not (tmp_path / "out").exists(), f"{case.id}: wrote into {{out}} before refusing"
