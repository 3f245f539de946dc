"""Sharded Adam-mini under FSDP1 (FlatParameter) and FSDP2 (DTensor) equals the single-process one.

CPU, gloo, torch FSDP1 (`device_id=cpu`, `use_orig_params=False`, one unit per litgpt `Block` + root)
and FSDP2 (`fully_shard` per Block + root on `init_device_mesh("cpu", (W,))`), on the `debug` model
with a small MLP (see tests/helpers/fsdp_worker.py) so that W=3 cuts a K group, W=4 a Q head, every W a row.
One spawn per world size (W = 2, 3, 4) runs all variants; the results are asserted here:

- real data: the sharded run on W ranks (each rank its rows of every global batch) vs the single
  process on the same data, 10 steps, with and without weight decay: parameters <= 1e-6 relative;
- synthetic gradients (identical full gradients placed into the local shards): parameters and the
  consolidated state (`optim.state.full_state_dict`: exp_avg, per-block exp_avg_sq, step) <= 1e-6;
- negative control: the same FSDP1 run without the all-reduce of block sums is far off (> 1e-3),
  so the comparison can fail;
- DDP through `build_optimizer` is the single-device optimizer (same units, same result);
- checkpoints (`optim.state.save_optimizer`/`load_optimizer`, DCP) written on 2 ranks (FSDP1, FSDP2,
  DDP) and on 1 process load on 1, 3 and 4 ranks, into FSDP1, FSDP2, DDP or a plain model; 5 more
  steps equal the uninterrupted run <= 1e-6;
- the options: a bf16 first moment and the non-default partition (`elements` embeddings, `whole` V
  blocks), together and apart, in equivalence and checkpoint (2 -> 1, 3, 4 ranks, FSDP1 -> plain, FSDP2,
  FSDP1) runs; on synthetic gradients every exp_avg equals the unsharded one exactly. On real data the
  two runs' gradients differ in rounding; a bf16 m turns that into rare one-ulp differences of m, and
  `elements` embeddings (per-element Adam: an entry that is rounding noise after cancellation gets a
  full-size step) into large ones, so those two are compared on synthetic gradients (the same bits
  on both sides) and real data covers the `whole` V blocks;
- the geometry the tests rely on really occurs (Q head, K group and row cut mid-block, a padded last
  rank, a rank holding part of one parameter only), and the pure replica of FSDP1's split
  (`optim.flat.flat_shard_segments`, used by the benchmark) matches FSDP's fields.
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import fsdp_worker as worker
from helpers.dist import spawn

pytestmark = pytest.mark.slow
TOL = 1e-6


def _spawn(world: int, tasks: list[dict], out_dir: str) -> dict:
    spawn(worker.run, world, out_dir, tasks)
    return torch.load(os.path.join(out_dir, f"result_w{world}.pt"), weights_only=True)


BF16 = dict(momentum_dtype="bfloat16")
PART = dict(embedding_blocks="elements", value_blocks="whole")
PART_BF16 = dict(PART, **BF16)
V_WHOLE = dict(value_blocks="whole")


def _eq(name, kind, wd, *flags, options=None):
    return dict(op="eq", name=name, kind=kind, wd=wd, flags=tuple(flags), options=options or {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    ck = {k: str(root / k) for k in ("fsdp1_w2", "fsdp2_w2", "ddp_w2", "plain_w1", "fsdp1_w2_alt")}
    for path in ck.values():
        os.makedirs(path)
    results = {}
    results[2] = _spawn(2, [
        _eq("fsdp1", "fsdp1", 0.0), _eq("fsdp1_wd", "fsdp1", 0.1), _eq("fsdp1_syn", "fsdp1", 0.1, "synthetic"),
        _eq("fsdp1_nogroup", "fsdp1", 0.1, "nogroup"),
        _eq("fsdp2_wd", "fsdp2", 0.1), _eq("fsdp2_syn", "fsdp2", 0.1, "synthetic"),
        _eq("ddp_wd", "ddp", 0.1),
        _eq("fsdp1_syn_part_bf16", "fsdp1", 0.1, "synthetic", options=PART_BF16),
        _eq("fsdp2_syn_bf16", "fsdp2", 0.1, "synthetic", options=BF16),
        dict(op="save", name="save_fsdp1", kind="fsdp1", wd=0.1, path=ck["fsdp1_w2"]),
        dict(op="save", name="save_fsdp1_alt", kind="fsdp1", wd=0.1, path=ck["fsdp1_w2_alt"], flags=("synthetic",),
             options=PART_BF16),
        dict(op="save", name="save_fsdp2", kind="fsdp2", wd=0.1, path=ck["fsdp2_w2"]),
        dict(op="save", name="save_ddp", kind="ddp", wd=0.1, path=ck["ddp_w2"]),
    ], str(root))
    # one process, no torch.distributed: load the 2-rank FSDP1 checkpoint; write an unsharded one
    torch.set_flush_denormal(True)
    with worker.one_thread():
        results[1] = worker.run_tasks([
            dict(op="load", name="load_fsdp1_w2", kind="plain", path=ck["fsdp1_w2"]),
            dict(op="load", name="load_fsdp2_w2", kind="plain", path=ck["fsdp2_w2"]),
            dict(op="load", name="load_fsdp1_w2_alt", kind="plain", path=ck["fsdp1_w2_alt"]),
            dict(op="save", name="save_plain", kind="plain", wd=0.1, path=ck["plain_w1"]),
        ], 0, 1)
    results[3] = _spawn(3, [
        _eq("fsdp1_wd", "fsdp1", 0.1), _eq("fsdp1_syn", "fsdp1", 0.1, "synthetic"),
        _eq("fsdp2", "fsdp2", 0.0), _eq("fsdp2_syn", "fsdp2", 0.1, "synthetic"),
        _eq("fsdp1_v_whole", "fsdp1", 0.1, options=V_WHOLE),
        _eq("fsdp2_syn_part_bf16", "fsdp2", 0.1, "synthetic", options=PART_BF16),
        dict(op="load", name="load_fsdp1_w2", kind="fsdp1", path=ck["fsdp1_w2"]),
        dict(op="load", name="load_fsdp1_w2_alt", kind="fsdp2", path=ck["fsdp1_w2_alt"]),
        dict(op="load", name="load_fsdp2_w2", kind="fsdp1", path=ck["fsdp2_w2"]),
        dict(op="load", name="load_ddp_w2", kind="fsdp1", path=ck["ddp_w2"]),
        dict(op="load", name="load_plain_w1", kind="fsdp2", path=ck["plain_w1"]),
    ], str(root))
    results[4] = _spawn(4, [
        _eq("fsdp1_wd", "fsdp1", 0.1), _eq("fsdp1_syn", "fsdp1", 0.1, "synthetic"),
        _eq("fsdp2_wd", "fsdp2", 0.1), _eq("fsdp2_syn", "fsdp2", 0.1, "synthetic"),
        _eq("fsdp1_syn_bf16", "fsdp1", 0.1, "synthetic", options=BF16),
        _eq("fsdp2_v_whole", "fsdp2", 0.1, options=V_WHOLE),
        dict(op="load", name="load_fsdp1_w2", kind="fsdp1", path=ck["fsdp1_w2"]),
        dict(op="load", name="load_fsdp1_w2_alt", kind="fsdp1", path=ck["fsdp1_w2_alt"]),
        dict(op="load", name="load_fsdp1_w2_fsdp2", kind="fsdp2", path=ck["fsdp1_w2"]),
        dict(op="load", name="load_fsdp1_w2_ddp", kind="ddp", path=ck["fsdp1_w2"]),
    ], str(root))
    _print_summary(results)
    return results


def _print_summary(results) -> None:
    """The measured errors (shown with `pytest -s`)."""
    print("\nW  task                  max param rel.err  (worst parameter)   state exp_avg / exp_avg_sq")
    for world in sorted(results):
        for name, res in results[world].items():
            if isinstance(res, dict) and "err" in res:
                rel, worst = _worst(res)
                st = res.get("state_err")
                st = f"{st['exp_avg']:.1e} / {st['exp_avg_sq']:.1e}" if st else ""
                print(f"{world}  {name:20s}  {rel:.2e}          {worst:34s}  {st}")


def _worst(res: dict) -> tuple[float, str]:
    name, (rel, _) = max(res["err"].items(), key=lambda kv: kv[1][0])
    return rel, name


def _eq_names(results):
    return [(w, name) for w, r in results.items() for name, res in r.items()
            if isinstance(res, dict) and "geometry" in res and not name.endswith("nogroup")]


def test_sharded_equals_single_process(runs):
    n_params = len(_layouts())
    checked = set()
    for world, name in _eq_names(runs):
        res = runs[world][name]
        assert len(res["err"]) == n_params  # every parameter compared
        rel, worst = _worst(res)
        assert rel <= TOL, f"W={world} {name}: {worst} differs by {rel:.2e} (relative)"
        checked.add((world, name))
    for world in (2, 3, 4):  # real data with and without weight decay, both FSDP versions, every W
        assert {(world, "fsdp1_wd"), (world, "fsdp1_syn"), (world, "fsdp2_syn")} <= checked
    assert {(2, "fsdp1"), (3, "fsdp2"), (2, "fsdp2_wd"), (4, "fsdp2_wd"), (2, "ddp_wd")} <= checked
    # the options: bf16 m, the non-default partition, and both
    assert {(2, "fsdp1_syn_part_bf16"), (2, "fsdp2_syn_bf16"), (3, "fsdp1_v_whole"), (3, "fsdp2_syn_part_bf16"),
            (4, "fsdp1_syn_bf16"), (4, "fsdp2_v_whole")} <= checked


def test_synthetic_gradients_state_matches(runs):
    """Same gradient bits on both sides: v to rounding, the first moment exactly, in its configured dtype."""
    seen = set()
    for world, name in _eq_names(runs):
        if "_syn" not in name:
            continue
        err = runs[world][name]["state_err"]
        assert err["step"] == 1.0 and err["dtype"] == 1.0, f"W={world} {name}: state {err}"
        assert err["exp_avg"] == 0.0 and err["exp_avg_sq"] <= TOL, f"W={world} {name}: state {err}"
        seen.add((world, name.split("_syn")[0], runs[world][name]["options"].get("momentum_dtype", "float32")))
    assert {(w, k, "float32") for w in (2, 3, 4) for k in ("fsdp1", "fsdp2")} <= seen
    assert {(2, "fsdp1", "bfloat16"), (2, "fsdp2", "bfloat16"), (3, "fsdp2", "bfloat16"), (4, "fsdp1", "bfloat16")} \
        <= seen


def test_negative_control_without_allreduce_fails(runs):
    rel, name = _worst(runs[2]["fsdp1_nogroup"])
    assert rel > 1e-3, f"dropping the block-sum all-reduce changed nothing ({rel:.2e}): the test cannot fail"


def test_ddp_is_the_single_device_optimizer(runs):
    geo = runs[2]["ddp_wd"]["geometry"]
    for rank_units in geo:
        assert all(u["padding"] == 0 and not u["partial_only"] and len(u["segments"]) == 1 for u in rank_units)
        assert [u["names"] for u in rank_units] == [(n,) for n in runs[2]["ddp_wd"]["err"]]


def _all_geometry(results, kind):
    for world in (2, 3, 4):
        for name, res in results[world].items():
            if isinstance(res, dict) and "geometry" in res and name.startswith(kind):
                yield world, name, res["geometry"]


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_segments_cover_every_parameter_once(runs, kind):
    layouts = _layouts()
    for world, name, geo in _all_geometry(runs, kind):
        pieces: dict[str, list] = {}
        for rank_units in geo:
            for u in rank_units:
                for n, a, b, off in u["segments"]:
                    assert 0 <= off and off + (b - a) <= u["local_numel"]
                    pieces.setdefault(n, []).append((a, b))
        assert set(pieces) == set(layouts)
        for n, spans in pieces.items():
            spans.sort()
            assert spans[0][0] == 0 and spans[-1][1] == layouts[n].numel, (world, name, n)
            assert all(b0 == a1 for (_, a1), (b0, _) in zip(spans, spans[1:])), (world, name, n, spans)


def test_fsdp1_geometry_cuts_heads_rows_and_pads(runs):
    cuts: dict[int, set] = {}
    padded, partial_only = set(), set()
    for world, name, geo in _all_geometry(runs, "fsdp1"):
        for rank, rank_units in enumerate(geo):
            for u in rank_units:
                assert u["replica_ok"], f"flat_shard_segments disagrees with FSDP's fields: W={world} {u['label']}"
                cuts.setdefault(world, set()).update(kind for _, _, kind in u["cuts"])
                if u["padding"]:
                    assert rank == world - 1, "only the last rank may be padded"
                    padded.add(world)
                if u["partial_only"]:
                    partial_only.add(world)
    # every W cuts some block mid-way (W=2: a token row of wte); together they cut a Q head, a K group
    # and a matrix row (measured: {2: {token_row}, 3: {k_group, row}, 4: {q_head, row, token_row}})
    assert all(cuts.get(w) for w in (2, 3, 4)), cuts
    assert {"q_head", "k_group", "row"} <= set().union(*cuts.values()), cuts
    assert padded, "no padded last rank in any run"
    assert partial_only >= {3, 4}, partial_only


def test_fsdp2_geometry_cuts_heads(runs):
    cuts, uneven = set(), set()
    for world, name, geo in _all_geometry(runs, "fsdp2"):
        for rank_units in geo:
            for u in rank_units:
                assert u["padding"] == 0  # the DTensor local tensor is the unpadded row range
                cuts.update(kind for _, _, kind in u["cuts"])
        for per_rank in zip(*geo):  # the same parameter on every rank
            if len({u["local_numel"] for u in per_rank}) > 1:
                uneven.add(per_rank[0]["label"])
    assert {"q_head", "k_group", "whole"} <= cuts, cuts
    assert any("attn.qkv" in label for label in uneven), uneven  # uneven torch.chunk row shards occur


def test_checkpoint_reshards_across_world_sizes_and_wrappers(runs):
    expected = {1: {"load_fsdp1_w2", "load_fsdp2_w2", "load_fsdp1_w2_alt"},
                3: {"load_fsdp1_w2", "load_fsdp2_w2", "load_ddp_w2", "load_plain_w1", "load_fsdp1_w2_alt"},
                4: {"load_fsdp1_w2", "load_fsdp1_w2_fsdp2", "load_fsdp1_w2_ddp", "load_fsdp1_w2_alt"}}
    for world, names in expected.items():
        for name in names:
            res = runs[world][name]
            rel, worst = _worst(res)
            assert rel <= TOL, f"resumed on W={world} ({name}): {worst} differs by {rel:.2e}"
    assert all(runs[w]["load_fsdp1_w2_alt"]["options"] == PART_BF16 for w in (1, 3, 4))


def _layouts():
    from optim.layout import model_layout
    return model_layout(worker.config(), [(n, tuple(p.shape)) for n, p in worker.new_model().named_parameters()])
