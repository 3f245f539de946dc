"""The O(1)-memory epoch permutation: a bijection of range(n) for every n, seeded, and well mixed."""

from __future__ import annotations

import numpy as np
import pytest

from data.permutation import Permutation
from data.windows import Schedule, epoch_order


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 64, 100, 1000, 4097, 65537])
def test_is_a_bijection(n):
    for seed, epoch in ((0, 0), (1, 5)):
        v = Permutation(n, seed, epoch)[0:n]
        assert v.dtype == np.int64 and np.array_equal(np.sort(v), np.arange(n))


def test_indexing_forms_agree_and_range_is_checked():
    p = Permutation(1000, 3, 1)
    full = p[:]
    assert np.array_equal(p[100:200], full[100:200])
    assert p[17] == full[17]
    assert np.array_equal(p.take([5, 999, 0]), full[[5, 999, 0]])
    with pytest.raises(IndexError):
        p.take([1000])


def test_seed_and_epoch_change_the_order():
    orders = {tuple(Permutation(50, s, e)[:].tolist()) for s in range(3) for e in range(3)}
    assert len(orders) == 9
    assert np.array_equal(Permutation(50, 1, 2)[:], Permutation(50, 1, 2)[:])


def test_well_mixed():
    n = 20000
    v = Permutation(n, 0, 0)[:].astype(float)
    assert abs(np.corrcoef(np.arange(n), v)[0, 1]) < 0.03
    assert np.mean(np.abs(np.diff(v))) > n / 4  # neighbours land far apart (uniform: n/3)
    # first element over many seeds is spread evenly over 8 values (chi-square, 7 dof, p ~ 1e-4 at 27)
    firsts = np.bincount([Permutation(8, s, 0)[0] for s in range(1600)], minlength=8)
    assert ((firsts - 200) ** 2 / 200).sum() < 27


def test_huge_n_needs_no_memory_proportional_to_n():
    p = Permutation(10**12, 0, 0)
    v = p[10**11:10**11 + 1000]
    assert len(set(v.tolist())) == 1000 and v.min() >= 0 and v.max() < 10**12


def test_schedule_unshuffled_is_the_identity():
    assert np.array_equal(epoch_order(10, 0, 0, False)[2:5], [2, 3, 4])
    s = Schedule(20, batch_size=2, world_size=3, seed=0, shuffle=False)
    assert s.steps_per_epoch == 3
    assert s.windows(0, 1).tolist() == [2, 3] and s.windows(4, 2).tolist() == [10, 11]


def test_block_schedule_follows_the_documented_rule_across_epochs():
    """rank r at global step g takes positions [(s*W + r)*B, +B) of epoch g // S's permutation."""
    N, W, B, seed = 50, 3, 2, 4
    s = Schedule(N, batch_size=B, world_size=W, seed=seed, shuffle=True)
    S = N // (W * B)
    steps = list(range(3, 3 + 5 * S))  # starts mid-epoch, crosses 4 epoch boundaries
    for r in range(W):
        got = s.windows_for_steps(steps, r)
        for row, g in zip(got, steps):
            e, k = divmod(g, S)
            assert row.tolist() == Permutation(N, seed, e)[(k * W + r) * B:(k * W + r + 1) * B].tolist()
        assert np.array_equal(got[0], s.windows(steps[0], r))
