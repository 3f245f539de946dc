"""Peak memory of `python -m data.prepare` on one very long document (issue #21 item 12).

SentencePiece needs about 45 bytes of working memory per input byte of the text it encodes at once, so one
50 MB document took 2.26 GB. prepare now encodes a document longer than `data.tokenizer.CHUNK_CHARS`
characters in pieces cut at spaces (the same ids; see data/README.md). This makes, in a temporary folder, a
C4 file of one document of `--mb` MB (words of the sample vocabulary, single spaces), and the same bytes as
documents of about 1 kB, and runs prepare on each in a subprocess with the demo tokenizer and one thread:

- `tiny`: a 1 kB file, what the interpreter, numpy and SentencePiece take before any text;
- `short docs`: the `--mb` MB in ~1 kB documents;
- `one doc`: the same text as one document (pieces of CHUNK_CHARS characters, what prepare does);
- `one doc, whole`: the same with CHUNK_CHARS set beyond the document (what prepare did before).

Peak RSS is the child's own `ru_maxrss` (os.wait4); "per input byte" is (peak − tiny's peak) / input bytes.
Prints a table, then one JSON line. Memory, not time: the numbers do not depend on other load.

    python -m benchmarks.prepare_memory            # 50 MB
    python -m benchmarks.prepare_memory --mb 10 --skip-whole
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from data.cli import Parser, int_in

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has who will more if no out so Elizabeth Darcy Bennet "
         "Pemberley letter morning sister fortune 1811 café naïve").split()

# Runs prepare in the child; CHUNK_CHARS is set first (sys.argv[1]: 0 = leave the default).
CHILD = """import sys
import data.tokenizer
if int(sys.argv[1]):
    data.tokenizer.CHUNK_CHARS = int(sys.argv[1])
from data.prepare import main
sys.exit(main(sys.argv[2:]))
"""


def parse_args(argv=None):
    p = Parser(prog="python -m benchmarks.prepare_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int_in(1, 4096), default=50, help="size of the long document in MB (default 50)")
    p.add_argument("--skip-whole", action="store_true", help="leave out the run that encodes the document whole")
    p.add_argument("--write-sources", metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_text(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words, size = [], 0
    while size < n_bytes:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w.encode()) + 1
    return " ".join(words)


def write_source(path: Path, docs: list[str]) -> int:
    raw = b"".join(json.dumps({"text": d, "url": f"bench#{i}"}).encode() + b"\n" for i, d in enumerate(docs))
    path.write_bytes(gzip.compress(raw, compresslevel=1))
    return sum(len(d.encode()) for d in docs)


def peak_rss(src: Path, out: Path, chunk_chars: int) -> tuple[int, int]:
    """(peak RSS in bytes, exit status) of one prepare run in a child process."""
    cmd = [sys.executable, "-c", CHILD, str(chunk_chars), "--out", str(out), "--train", str(src),
           "--workers", "1", "--no-progress", "--shard-tokens", str(1 << 24)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def write_sources(folder: Path, mb: int) -> dict[str, int]:
    """The three C4 files under `folder`; their text bytes by case name."""
    text = make_text(mb * 1_000_000)
    docs = {"tiny": [text[:1000]], "short docs": [], "one doc": [text]}
    start = 0
    while start < len(text):  # ~1 kB documents, cut at spaces
        end = text.find(" ", start + 1000)
        end = len(text) if end == -1 else end
        docs["short docs"].append(text[start:end])
        start = end + 1
    return {name: write_source(folder / f"{name.replace(' ', '_')}.json.gz", d) for name, d in docs.items()}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.write_sources:  # in a child, so that this process stays small: a child's peak RSS counts the parent's
        print(json.dumps(write_sources(Path(a.write_sources), a.mb)))  # pages it was forked with
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = subprocess.run([sys.executable, "-m", "benchmarks.prepare_memory", "--mb", str(a.mb),
                               "--write-sources", str(tmp)], cwd=ROOT, check=True, capture_output=True, text=True)
        sizes = json.loads(made.stdout)
        runs = [("tiny", 0), ("short docs", 0), ("one doc", 0)] + ([] if a.skip_whole else [("one doc", 1 << 40)])
        for i, (name, chunk) in enumerate(runs):
            peak, rc = peak_rss(tmp / f"{name.replace(' ', '_')}.json.gz", tmp / f"out{i}", chunk)
            if rc != 0:
                print(f"error: prepare of {name!r} exited {rc}", file=sys.stderr)
                return 1
            rows.append({"case": name + (", whole" if chunk else ""), "input_bytes": sizes[name], "peak_rss": peak})
    base = rows[0]["peak_rss"]
    print(f"{'case':<16} {'input MB':>9} {'peak RSS MB':>12} {'per input byte':>15}")
    for r in rows:
        r["bytes_per_input_byte"] = round((r["peak_rss"] - base) / r["input_bytes"], 2) if r is not rows[0] else None
        per = "" if r["bytes_per_input_byte"] is None else f"{r['bytes_per_input_byte']:.2f}"
        print(f"{r['case']:<16} {r['input_bytes'] / 1e6:>9.1f} {r['peak_rss'] / 1e6:>12.0f} {per:>15}")
    print(json.dumps({"benchmark": "prepare_memory", "mb": a.mb, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
