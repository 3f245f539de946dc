"""The loader against an independent tokenisation of the same text: window contents, exactly-once
coverage over ranks x workers, per-epoch reshuffle, exact resume, val determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.loader import build_loader, val_batches
from data.prepare import prepare_split
from data.windows import num_windows
from helpers.corpus import (
    SAMPLE_TOKENIZER,
    c4_lines,
    make_texts,
    reference_stream,
    slimpajama_lines,
    write_gz,
    write_zst,
)

L, B = 16, 3
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two sources (C4 + SlimPajama), many small shards so windows cross shard boundaries."""
    root = tmp_path_factory.mktemp("loader")
    t1, t2, tv = make_texts(40, seed=1), make_texts(30, seed=2), make_texts(12, seed=3)
    src = root / "src"
    src.mkdir()
    write_gz(src / "a.json.gz", c4_lines(t1))
    write_zst(src / "b.jsonl.zst", slimpajama_lines(t2))
    write_gz(root / "val.json.gz", c4_lines(tv))
    out = root / "out"
    prepare_split("train", sorted(src.iterdir()), SAMPLE_TOKENIZER, out, workers=1, shard_tokens=700, progress=False)
    prepare_split("val", [root / "val.json.gz"], SAMPLE_TOKENIZER, out, workers=1, progress=False)
    train = reference_stream(SAMPLE_TOKENIZER, t1 + t2)
    val = reference_stream(SAMPLE_TOKENIZER, tv)
    return out, train, val


def window_index(stream: np.ndarray, seq_len: int) -> dict:
    n = num_windows(len(stream), seq_len)
    idx = {tuple(stream[i * seq_len:i * seq_len + seq_len + 1].tolist()): i for i in range(n)}
    assert len(idx) == n, "test corpus has repeated windows; pick another seed"
    return idx


def rows_to_windows(batches, idx) -> list[int]:
    return [idx[tuple(r.tolist())] for b in batches for r in b]  # KeyError = a row that is no window


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_num_windows_rule_matches_enumeration():
    for T in range(0, 40):
        for Lq in (1, 2, 3, 7):
            brute = sum(1 for i in range(T) if i * Lq + Lq + 1 <= T)
            assert num_windows(T, Lq) == brute, (T, Lq)


def test_shards_are_memory_mapped_and_cross_boundaries(prepared):
    out, train, _ = prepared
    loader = build_loader(out, "train", L, B)
    assert len(loader.manifest["shards"]) > 5
    assert loader.num_tokens == len(train)
    s = loader.stream
    s.read(0, 1)
    assert all(isinstance(m, np.memmap) for m in s._maps)
    for b in s.starts[1:-1]:  # a read spanning every shard boundary equals the reference
        assert np.array_equal(s.read(b - 3, 7), train[b - 3:b + 4])


def test_unshuffled_windows_are_the_stream_in_order(prepared):
    out, train, _ = prepared
    loader = build_loader(out, "train", L, B, shuffle=False)
    batches = take(loader, loader.steps_per_epoch)
    rows = torch.cat(batches).numpy()
    assert rows.shape == (loader.steps_per_epoch * B, L + 1) and rows.dtype == np.int64
    for i, r in enumerate(rows):
        assert np.array_equal(r, train[i * L:i * L + L + 1])
    assert np.array_equal(rows[1:, 0], rows[:-1, -1])  # consecutive windows share exactly one token


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 0), (2, 1), (3, 2), (4, 0), (5, 3)])
def test_epoch_covers_each_window_exactly_once(prepared, world_size, workers):
    out, train, _ = prepared
    idx = window_index(train, L)
    N = len(idx)
    per_rank, per_rank_ref = [], []
    for r in range(world_size):
        loader = build_loader(out, "train", L, B, rank=r, world_size=world_size, num_workers=workers, seed=7)
        S = loader.steps_per_epoch
        assert S == N // (world_size * B) and loader.windows_per_epoch == N
        got = rows_to_windows(take(loader, 2 * S), idx)
        per_rank.append((got[:S * B], got[S * B:]))
        if workers:  # worker count never changes the order
            ref = build_loader(out, "train", L, B, rank=r, world_size=world_size, seed=7)
            per_rank_ref.append(rows_to_windows(take(ref, 2 * S), idx))
            assert got == per_rank_ref[-1]
    for e in (0, 1):
        seen = [w for rank in per_rank for w in rank[e]]
        assert len(seen) == len(set(seen)) == S * world_size * B
        left_out = N - len(seen)
        assert 0 <= left_out < world_size * B
        assert loader.windows_left_out_per_epoch == left_out
    epoch0 = [w for rank in per_rank for w in rank[0]]
    epoch1 = [w for rank in per_rank for w in rank[1]]
    assert epoch0 != epoch1  # reshuffled


def test_seed_changes_order_and_same_seed_repeats(prepared):
    out, train, _ = prepared
    a = take(build_loader(out, "train", L, B, seed=1), 5)
    b = take(build_loader(out, "train", L, B, seed=1), 5)
    c = take(build_loader(out, "train", L, B, seed=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (2, 0), (2, 3)])
def test_resume_equals_uninterrupted(prepared, workers_before, workers_after):
    out, _, _ = prepared
    full = build_loader(out, "train", L, B, rank=1, world_size=2, seed=3)
    S = full.steps_per_epoch
    stop = S - 2  # resume 2 batches before an epoch boundary, run past it
    n_after = 6
    ref = take(full, stop + n_after)

    first = build_loader(out, "train", L, B, rank=1, world_size=2, num_workers=workers_before, seed=3)
    it = iter(first)
    got = [next(it) for _ in range(stop)]  # workers have prefetched beyond this point
    sd = first.state_dict()
    del it
    assert (sd["epoch"], sd["position"]) == (0, stop * 2 * B)  # global: windows of all ranks

    second = build_loader(out, "train", L, B, rank=1, world_size=2, num_workers=workers_after, seed=3)
    second.load_state_dict(sd)
    assert second.epoch == 0
    got += take(second, n_after)
    assert second.epoch == 1 and second.batches_consumed == stop + n_after
    assert all(torch.equal(x, y) for x, y in zip(got, ref)) and len(got) == len(ref)


def test_resume_reads_nothing_already_consumed(prepared, monkeypatch):
    out, _, _ = prepared
    loader = build_loader(out, "train", L, B, seed=0)
    loader.load_state_dict({**loader.state_dict(), "position": 50 * B})
    reads = []
    orig = type(loader.stream).read
    monkeypatch.setattr(type(loader.stream), "read", lambda self, s, n: reads.append(s) or orig(self, s, n))
    take(loader, 1)
    assert len(reads) == B


def test_resume_with_other_world_size_same_global_batch(prepared):
    out, train, _ = prepared
    idx = window_index(train, L)
    one = build_loader(out, "train", L, 2 * B, seed=5)
    ref = rows_to_windows(take(one, 4), idx)
    for r in (0, 1):  # 2 ranks x B = 1 rank x 2B: same windows per step
        two = build_loader(out, "train", L, B, rank=r, world_size=2, seed=5)
        two.load_state_dict({**one.state_dict(), "position": 2 * 2 * B})
        got = rows_to_windows(take(two, 2), idx)
        for step in range(2):
            assert got[step * B:(step + 1) * B] == ref[(2 + step) * 2 * B + r * B:(2 + step) * 2 * B + (r + 1) * B]


def test_resume_state_mismatch_is_refused(prepared):
    out, _, _ = prepared
    sd = build_loader(out, "train", L, B, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        build_loader(out, "train", L + 1, B, seed=0).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        build_loader(out, "train", L, B, seed=1).load_state_dict(sd)
    one_batch_in = {**sd, "position": B}  # a position inside a global batch of the new run
    with pytest.raises(ValueError, match="global batch"):
        build_loader(out, "train", L, B, world_size=2).load_state_dict(one_batch_in)


@pytest.mark.parametrize("workers", [0, 2])
def test_world_size_change_repeats_and_skips_no_window(prepared, workers):
    """2 ranks x 3 micro-steps of 2 windows, then 3 ranks x 2 micro-steps (the same global batch of 12 windows,
    across an epoch boundary): every optimizer step holds the windows a single device takes, none twice."""
    out, train, _ = prepared
    idx = window_index(train, L)
    G = 12
    single = build_loader(out, "train", L, G, seed=9, global_batch=G)
    steps_before, steps_after = single.steps_per_epoch - 3, 6  # the resumed part crosses an epoch boundary
    reference = [sorted(rows_to_windows([b], idx)) for b in take(single, steps_before + steps_after)]

    def run(world, micro, n_steps, state=None):
        loaders = [build_loader(out, "train", L, 2, rank=r, world_size=world, seed=9, global_batch=G,
                                num_workers=workers) for r in range(world)]
        for ld in loaders:
            if state is not None:
                ld.load_state_dict(state)
        its = [iter(ld) for ld in loaders]
        got = [sorted(w for it in its for _ in range(micro) for w in rows_to_windows([next(it)], idx))
               for _ in range(n_steps)]
        return got, loaders[0].state_dict()

    before, state = run(2, 3, steps_before)
    after, _ = run(3, 2, steps_after, state)
    assert before + after == reference


def test_val_is_deterministic_and_fixed(prepared):
    out, _, val = prepared
    a = val_batches(out, L, B, 4)
    b = val_batches(out, L, B, 4)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    rows = torch.cat(a).numpy()
    for i, r in enumerate(rows):
        assert np.array_equal(r, val[i * L:i * L + L + 1])
    loader = build_loader(out, "val", L, B, seed=123, shuffle=True)  # val ignores shuffle
    assert all(torch.equal(x, y) for x, y in zip(take(loader, 4), a))
    everything = val_batches(out, L, B)
    assert len(everything) == num_windows(len(val), L) // B
    with pytest.raises(DataError, match="val batches"):
        val_batches(out, L, B, len(everything) + 1)


def test_too_little_data_is_a_clear_error(prepared):
    out, _, val = prepared
    with pytest.raises(DataError, match="too little data"):
        build_loader(out, "val", len(val), 1)
    with pytest.raises(ValueError, match="split"):
        build_loader(out, "test", L, B)
