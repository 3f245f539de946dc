"""Peak memory of `amp-ckpt import` against the size of the weights it imports.

The claim (checkpoints_util/importer.py, README "Continue pretraining"): tensors are read one at a time, so
the import's peak is about one copy of the weights in the output dtype (plus one tensor, and one layer's
q/k/v while they are fused). This writes a Hugging Face Llama folder (safetensors, 500 MB shards) of a
model of TinyLlama's layout with fewer, smaller layers (random weights), imports it in a child process per
case (fp32 as stored, and --dtype bfloat16), and reports the child's peak RSS above its RSS once the modules
were imported, divided by the bytes of the output weights. Prints a table and, last, one JSON line.

    python -m benchmarks.import_memory [--layers 4] [--hidden 1024]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from data.cli import Parser

CHILD = r"""
import sys, threading, time
from checkpoints_util.importer import import_weights
from amp_common.tensors import DTYPES

def status():  # kB -> bytes of the process's anonymous and file-backed resident memory
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]

peak, done = status(), threading.Event()
base = list(peak)
def sample():
    while not done.is_set():
        peak[:] = [max(a, b) for a, b in zip(peak, status())]
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
import_weights(sys.argv[1], sys.argv[2], dtype=DTYPES[sys.argv[3]])
done.set()
t.join()
print(peak[0] - base[0], peak[1] - base[1])
"""


def write_source(folder: Path, layers: int, hidden: int) -> int:
    """A random LlamaForCausalLM (fp32) saved in 500 MB safetensors shards; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, groups = hidden // 64, max(1, hidden // 512)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=groups,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(p.numel() for p in model.parameters())


def measure(src: Path, out: Path, dtype: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), dtype], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    anon, file = map(int, done.stdout.split()[-2:])
    return anon, file


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.import_memory", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024, help="a multiple of 512")
    a = p.parse_args(argv)
    if a.layers < 1 or a.hidden < 512 or a.hidden % 512:
        p.error("--layers must be >= 1 and --hidden a multiple of 512")
    torch.set_flush_denormal(True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        params = write_source(src, a.layers, a.hidden)
        for dtype, size in (("auto", 4), ("bfloat16", 2)):
            anon, file = measure(src, Path(tmp) / f"imported-{dtype}", dtype)
            weights = params * size
            rows.append({"dtype": "float32 (as stored)" if dtype == "auto" else dtype, "weights_bytes": weights,
                         "peak_anon_bytes": anon, "ratio": round(anon / weights, 3), "peak_file_mapped_bytes": file})
    mib = 2 ** 20
    print(f"import of a {params:,}-parameter Llama (hidden {a.hidden}, {a.layers} layers, vocab 32,000), fp32 "
          f"safetensors in 500 MB shards")
    print(f"{'output dtype':<22}{'weights MiB':>12}{'peak anon MiB':>15}{'ratio':>8}{'file-mapped MiB':>17}")
    for r in rows:
        print(f"{r['dtype']:<22}{r['weights_bytes'] / mib:>12.1f}{r['peak_anon_bytes'] / mib:>15.1f}"
              f"{r['ratio']:>8.2f}{r['peak_file_mapped_bytes'] / mib:>17.1f}")
    print(json.dumps({"benchmark": "import_memory", "params": params, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
