"""Data pipeline throughput: prepare (tokens/s with N tokenising processes) and loader (windows/s).

Runs on the shared development corpus (../shared/corpus/c4, C4 format) with the Mistral-v0.1
SentencePiece model (Llama layout, 32,000 pieces); skips with a message when they are absent.
Prints a table, then one JSON line with the numbers.

    python benchmarks/data_throughput.py                 # 2 processes, seq_len 2048, batch 8
    python benchmarks/data_throughput.py --workers 4 --seq-len 4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED / "corpus" / "c4"))
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "mistral-v1" / "tokenizer.model"))
    p.add_argument("--workers", type=int, default=2, help="tokenising processes for prepare")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=300, help="batches timed per loader configuration")
    p.add_argument("--loader-workers", default="0,2", help="dataloader worker counts to time")
    p.add_argument("--out", default=None, help="where to write shards (default: a temporary folder)")
    a = p.parse_args()

    corpus, tok = Path(a.corpus), Path(a.tokenizer)
    train = sorted(corpus.glob("c4-train.*.json.gz")) if corpus.is_dir() else []
    if not train or not tok.is_file():
        print(f"SKIP: needs C4 train files in {corpus} and a tokenizer at {tok} (the shared development "
              "corpus is not part of the project)")
        print(json.dumps({"benchmark": "data_throughput", "skipped": True}))
        return 0

    from data.loader import build_loader
    from data.prepare import prepare_split

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp)
        t0 = time.perf_counter()
        m = prepare_split("train", train, tok, out, workers=a.workers, overwrite=True, progress=False)
        prep_s = time.perf_counter() - t0
        chars_mb = sum(s["size"] for s in m["sources"]) / 1e6
        rows = [("prepare", f"{a.workers} processes", f"{m['num_tokens']:,} tokens", f"{prep_s:.1f} s",
                 f"{m['num_tokens'] / prep_s:,.0f} tokens/s")]
        result = {"benchmark": "data_throughput", "host": platform.node(), "cpus": os.cpu_count(),
                  "prepare_workers": a.workers, "prepare_tokens": m["num_tokens"],
                  "prepare_documents": m["num_documents"], "prepare_compressed_mb": round(chars_mb, 2),
                  "prepare_s": round(prep_s, 2), "prepare_tokens_per_s": round(m["num_tokens"] / prep_s)}

        for k in [int(x) for x in a.loader_workers.split(",")]:
            loader = build_loader(out, "train", a.seq_len, a.batch_size, num_workers=k, seed=0)
            n = min(a.batches, loader.steps_per_epoch)
            it = iter(loader)
            next(it)  # start workers, open shards
            t0 = time.perf_counter()
            for _ in itertools.islice(it, n):
                pass
            dt = time.perf_counter() - t0
            wps = n * a.batch_size / dt
            rows.append(("loader", f"{k} workers", f"{n} x [{a.batch_size}, {a.seq_len + 1}]", f"{dt:.2f} s",
                         f"{wps:,.0f} windows/s = {wps * a.seq_len:,.0f} tokens/s"))
            result[f"loader_w{k}_windows_per_s"] = round(wps, 1)
            result[f"loader_w{k}_tokens_per_s"] = round(wps * a.seq_len)
            del it
        result.update(seq_len=a.seq_len, batch_size=a.batch_size)

    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
