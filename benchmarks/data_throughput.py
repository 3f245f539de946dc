"""Data pipeline throughput: each tokenizer alone against the whole prepare, then the loader.

Runs on the shared development corpus (``shared/corpus/c4`` beside the checkout, C4 format) with the
Mistral-v0.1 SentencePiece model (Llama layout, 32,000 pieces); skips with a message when they are absent.
The Hugging Face ``tokenizers`` side uses ``--hf-tokenizer PATH`` (a tokenizer.json), or by default a
32,000-piece byte-level BPE trained on the same corpus before anything is timed (Llama 3 / GPT-2 style;
the training is not timed). Both kinds are timed in the same run, on the same documents.

- tokenizer alone: the same documents, read and parsed beforehand (not timed), encoded by SentencePiece's
  batch call ``encode(texts, add_bos=True, add_eos=True, num_threads=W)`` (Python lists out, as most
  callers use it), and the same call with ``out_type="numpy"`` (int32 buffers, what prepare uses);
- prepare: ``prepare_split`` of the same files with W threads, from the compressed files to fsync'd shards;
- the same two for the tokenizer.json: ``encode_batch_fast(texts, add_special_tokens=False)`` on a Rayon pool
  of W threads (``RAYON_NUM_THREADS``, set here), and prepare with ``--tokenizer tokenizer.json``;
- loader: windows/s for each dataloader worker count.

With ``--repeats N`` the tokenizer and prepare timings are taken N times, interleaved, and the fastest of
each is kept: other users' load only ever slows a run down. Prints a table, then, last, one JSON line
with both figures and their ratio (``prepare_vs_tokenizer``; ``prepare_vs_tokenizer_numpy`` against the
faster numpy call; ``hf_*`` the same for the tokenizer.json).

    python -m benchmarks.data_throughput                 # 2 threads, seq_len 2048, batch 8
    python -m benchmarks.data_throughput --repeats 3 --loader-workers ''
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

from data.cli import MAX_THREADS, Parser, int_in

SHARED = Path(__file__).resolve().parents[2] / "shared"


def parse_args(argv=None):
    p = Parser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(SHARED / "corpus" / "c4"))
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "mistral-v1" / "tokenizer.model"))
    p.add_argument("--hf-tokenizer", default="", metavar="PATH",
                   help="a tokenizer.json to time beside SentencePiece ('' = train a 32,000-piece BPE on the corpus)")
    p.add_argument("--workers", type=int_in(1, MAX_THREADS), default=2, help="tokenising threads")
    p.add_argument("--repeats", type=int_in(1), default=1, help="timings of each kind; the fastest is kept")
    p.add_argument("--seq-len", type=int_in(1), default=2048)
    p.add_argument("--batch-size", type=int_in(1), default=8)
    p.add_argument("--batches", type=int_in(1), default=300, help="batches timed per loader configuration")
    p.add_argument("--loader-workers", default="0,2", help="dataloader worker counts to time ('' = none)")
    a = p.parse_args(argv)
    try:
        a.loader_workers = [int_in(0)(x) for x in a.loader_workers.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"argument --loader-workers: {e}")
    return a


def time_tokenizer(sp, texts, workers: int, numpy: bool) -> tuple[float, int]:
    """Seconds for one batch encoding of `texts`, and the tokens it made."""
    kw = {"out_type": "numpy"} if numpy else {}
    t0 = time.perf_counter()
    ids = sp.encode(texts, add_bos=True, add_eos=True, num_threads=workers, **kw)
    dt = time.perf_counter() - t0
    return dt, sum(map(len, ids))


def time_hf_tokenizer(tok, texts) -> tuple[float, int]:
    """Seconds for one batch encoding of `texts` by `tokenizers` (BOS/EOS counted, as prepare adds them)."""
    t0 = time.perf_counter()
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    dt = time.perf_counter() - t0
    return dt, sum(len(e.ids) + 2 for e in encodings)


def train_hf_tokenizer(texts, out: Path, vocab_size: int = 32000) -> Path:
    """A byte-level BPE tokenizer.json with ``<s> $A </s>`` as its template (not timed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                              ("</s>", 1)])
    tok.save(str(out))
    return out


def time_prepare(train, tok, workers: int, out: Path) -> tuple[float, dict]:
    from data.prepare import prepare_split

    t0 = time.perf_counter()
    m = prepare_split("train", train, tok, out, workers=workers, overwrite=True, progress=False)
    return time.perf_counter() - t0, m


def time_loader(out: Path, a, k: int) -> float:
    from data.loader import build_loader

    loader = build_loader(out, "train", a.seq_len, a.batch_size, num_workers=k, seed=0)
    n = min(a.batches, loader.steps_per_epoch)
    it = iter(loader)
    next(it)  # start workers, open shards
    t0 = time.perf_counter()
    for _ in itertools.islice(it, n):
        pass
    return n * a.batch_size / (time.perf_counter() - t0)


def main(argv=None) -> int:
    a = parse_args(argv)
    corpus, tok = Path(a.corpus), Path(a.tokenizer)
    train = sorted(corpus.glob("c4-train.*.json.gz")) if corpus.is_dir() else []
    if not train or not tok.is_file():
        print(f"SKIP: needs C4 train files in {corpus} and a tokenizer at {tok} (the shared development "
              "corpus is not part of the project)")
        print(json.dumps({"benchmark": "data_throughput", "skipped": True}))
        return 0

    os.environ["RAYON_NUM_THREADS"] = str(a.workers)  # tokenizers' pool size, read once, before its first use
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from data.readers import iter_texts

    texts = [t for f in train for t in iter_texts(f)]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    best = {"lists": float("inf"), "numpy": float("inf"), "prepare": float("inf"), "hf": float("inf"),
            "hf_prepare": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        out, hf_out = Path(tmp) / "sp", Path(tmp) / "hf"
        hf_path = Path(a.hf_tokenizer) if a.hf_tokenizer else train_hf_tokenizer(texts, Path(tmp) / "tokenizer.json")
        hf = Tokenizer.from_file(str(hf_path))
        for _ in range(a.repeats):
            for kind in ("lists", "numpy"):
                dt, n_tok = time_tokenizer(sp, texts, a.workers, kind == "numpy")
                best[kind] = min(best[kind], dt)
            dt, m = time_prepare(train, tok, a.workers, out)
            best["prepare"] = min(best["prepare"], dt)
            dt, n_hf = time_hf_tokenizer(hf, texts)
            best["hf"] = min(best["hf"], dt)
            dt, m_hf = time_prepare(train, hf_path, a.workers, hf_out)
            best["hf_prepare"] = min(best["hf_prepare"], dt)
        assert m["num_tokens"] == n_tok and m["num_documents"] == len(texts), "prepare and tokenizer disagree"
        assert m_hf["num_tokens"] == n_hf, "prepare and the tokenizer.json disagree"
        rate = {k: (n_hf if k.startswith("hf") else n_tok) / v for k, v in best.items()}
        w = f"{a.workers} threads"
        rows = [("tokenizer alone", w, f"{n_tok:,} tokens", f"{best['lists']:.1f} s",
                 f"{rate['lists']:,.0f} tokens/s (Python lists)"),
                ("tokenizer alone", w, f"{n_tok:,} tokens", f"{best['numpy']:.1f} s",
                 f"{rate['numpy']:,.0f} tokens/s (numpy buffers)"),
                ("prepare", w, f"{n_tok:,} tokens", f"{best['prepare']:.1f} s",
                 f"{rate['prepare']:,.0f} tokens/s = {rate['prepare'] / rate['lists']:.0%} of the tokenizer alone"),
                ("tokenizer.json alone", w, f"{n_hf:,} tokens", f"{best['hf']:.1f} s",
                 f"{rate['hf']:,.0f} tokens/s (encode_batch_fast, {hf.get_vocab_size():,} ids)"),
                ("prepare, tokenizer.json", w, f"{n_hf:,} tokens", f"{best['hf_prepare']:.1f} s",
                 f"{rate['hf_prepare']:,.0f} tokens/s = {rate['hf_prepare'] / rate['hf']:.0%} of the tokenizer alone")]
        result = {"benchmark": "data_throughput", "host": platform.node(), "cpus": os.cpu_count(),
                  "load_avg_1min": round(os.getloadavg()[0], 2), "workers": a.workers, "repeats": a.repeats,
                  "documents": len(texts), "tokens": n_tok, "tokenizer_tokens_per_s": round(rate["lists"]),
                  "tokenizer_numpy_tokens_per_s": round(rate["numpy"]), "prepare_tokens_per_s": round(rate["prepare"]),
                  "prepare_vs_tokenizer": round(rate["prepare"] / rate["lists"], 3),
                  "prepare_vs_tokenizer_numpy": round(rate["prepare"] / rate["numpy"], 3),
                  "hf_tokenizer": str(hf_path) if a.hf_tokenizer else "bpe-32000 trained on the corpus",
                  "hf_tokens": n_hf, "hf_tokenizer_tokens_per_s": round(rate["hf"]),
                  "hf_prepare_tokens_per_s": round(rate["hf_prepare"]),
                  "hf_prepare_vs_tokenizer": round(rate["hf_prepare"] / rate["hf"], 3)}
        for k in a.loader_workers:
            wps = time_loader(out, a, k)
            rows.append(("loader", f"{k} workers", f"[{a.batch_size}, {a.seq_len + 1}] batches", "",
                         f"{wps:,.0f} windows/s = {wps * a.seq_len:,.0f} tokens/s"))
            result[f"loader_w{k}_windows_per_s"] = round(wps, 1)
        if a.loader_workers:
            result.update(seq_len=a.seq_len, batch_size=a.batch_size)

    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
