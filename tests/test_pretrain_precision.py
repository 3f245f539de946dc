"""bf16 precisions under every strategy, on CPU (gloo, 2 ranks), asserted from the live objects of the app's run
(tests/helpers/precision_probe.py records them in every rank during the first training step):

- what each strategy keeps in which dtype (master weights, the weights the forward pass uses / all-gathers,
  gradients and the dtype they are reduced in, Adam-mini's m and v) equals `PRECISIONS`, the table README
  ("Precision") and `--help` (system.precision) state;
- `fsdp` / `fsdp2` on 2 ranks equal the same strategy on one device in the same precision: the step-1 gradient
  within the bound derived in `grad_bound` from bf16's unit roundoff (checked against the measured difference);
- SIGUSR1 under `fsdp` in `bf16-mixed` resumes bitwise;
- a checkpoint written in `bf16-mixed` resumes in `32-true` and the reverse, and `bf16-true` ones too: the
  weights and m, v load exactly (widened, or rounded to nearest when the new run keeps bf16 weights).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.checkpoints import assert_same_tensors, checkpoint_tensors
from helpers.faults import PG_LEFT
from helpers.runs import cli_args, logged_losses, run_pretrain, tiny_config

STEPS, ROWS = 8, 12  # 12 sequences of 32 tokens per step: one micro-batch per rank (6 rows on 2 ranks)
OVERRIDES = {"intermediate_size": 20}
U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, rounding to nearest

# What each strategy keeps in which dtype (README "Precision", `--help` of system.precision). "gathered": the
# dtype FSDP all-gathers the weights in; "forward": the weight a Linear multiplies with and its output;
# "reduce": the dtype gradients are summed over ranks in (DDP's buckets, FSDP's reduce-scatter).
F32, BF16 = "float32", "bfloat16"
PRECISIONS = {
    ("single", "bf16-mixed"): dict(master=F32, gathered=None, forward=(F32, BF16), grads=F32, reduce=None),
    ("ddp", "bf16-mixed"): dict(master=F32, gathered=None, forward=(F32, BF16), grads=F32, reduce=F32),
    ("fsdp", "bf16-mixed"): dict(master=F32, gathered=BF16, forward=(BF16, BF16), grads=F32, reduce=BF16),
    ("fsdp2", "bf16-mixed"): dict(master=F32, gathered=BF16, forward=(BF16, BF16), grads=F32, reduce=F32),
    ("single", "bf16-true"): dict(master=BF16, gathered=None, forward=(BF16, BF16), grads=BF16, reduce=None),
    ("ddp", "bf16-true"): dict(master=BF16, gathered=None, forward=(BF16, BF16), grads=BF16, reduce=BF16),
    ("fsdp", "bf16-true"): dict(master=BF16, gathered=BF16, forward=(BF16, BF16), grads=BF16, reduce=BF16),
    ("fsdp2", "bf16-true"): dict(master=BF16, gathered=BF16, forward=(BF16, BF16), grads=BF16, reduce=BF16),
}
ADAM_MINI_STATE = dict(m=F32, v=F32)  # in every precision (momentum_dtype: bfloat16 makes m bf16)


def config(data_dir, out_dir, strategy: str, world: int, precision: str, **extra):
    values = dict(model__overrides=OVERRIDES, train__max_steps=STEPS, train__global_batch_tokens=ROWS * 32,
                  train__micro_batch_size=ROWS // world, checkpoint__interval=4, eval__interval=4, eval__batches=3,
                  optimizer__grad_clip=0.0,  # the probe reads the gradient the optimizer gets: unclipped
                  system__strategy=strategy, system__devices=world, system__precision=precision)
    return tiny_config(data_dir, out_dir, **{**values, **extra})


def launch(cfg, probe=None, faults: str = "") -> str:
    code, out = run_pretrain(cli_args(cfg), faults, probe=probe)
    assert code == 0, out
    assert PG_LEFT not in out, out
    return out


def probed_run(data_dir, root, strategy: str, world: int, precision: str, monkeypatch=None, **extra):
    """Run the app with the dtype probe: in this process for one rank (`monkeypatch` given), else launched.
    Returns (run folder, probe folder)."""
    run, probe = root / f"{strategy}{world}-{precision}", root / f"probe-{strategy}{world}-{precision}"
    probe.mkdir(parents=True)
    cfg = config(data_dir, run, strategy, world, precision, **extra)
    if monkeypatch is None:
        launch(cfg, probe)
    else:
        from helpers import precision_probe
        from pretrain.loop import fit

        with monkeypatch.context() as m:
            for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
                m.setenv(key, "")  # Lightning sets them for its one-process group: unset again afterwards, or a
                m.delenv(key)      # later launch inherits the port
            precision_probe.install(probe, m.setattr)
            fit(cfg)
    return run, probe


def observed(probe, world: int) -> dict:
    """What the probe saw on every rank (the same on all of them), in the shape of `PRECISIONS` + Adam-mini's m, v."""
    seen = []
    for r in range(world):
        rec = json.loads((probe / f"rank{r}.json").read_text())
        ops = rec["collectives"]
        gathered = sorted({c["dtype"] for c in ops if c["op"].startswith("all_gather")})
        reduced = sorted({c["dtype"] for c in ops if c["op"].startswith("reduce_scatter")
                          or c["op"] == "ddp_bucket_all_reduce"})
        forward = sorted({(x["weight"], x["output"]) for x in rec["compute"].values()})
        one = lambda xs: xs[0] if len(xs) == 1 else (xs or None)  # noqa: E731
        seen.append(dict(master=one(rec["master"]), gathered=one(gathered), forward=one(forward),
                         grads=one(rec["grads"]), reduce=one(reduced), m=one(rec["state"]["exp_avg"]),
                         v=one(rec["state"]["exp_avg_sq"])))
    assert all(s == seen[0] for s in seen), seen
    return seen[0]


def assert_precision(probe, strategy: str, world: int, precision: str) -> None:
    got = observed(probe, world)
    want = {**PRECISIONS[(strategy, precision)], **ADAM_MINI_STATE}
    want["forward"] = tuple(want["forward"])
    got["forward"] = tuple(got["forward"])
    if world == 1:  # nothing to gather or reduce (FSDP1 falls back to NO_SHARD; FSDP2 may still call them)
        for key in ("gathered", "reduce"):
            got.pop(key)
            want.pop(key)
    assert got == want, f"{strategy} x {world} {precision}: {got} != {want}"


# ------------------------------------------------------------------------- one device vs two ranks, derived
def full_grads(probe, world: int) -> dict[str, torch.Tensor]:
    """The step-1 gradients the optimizer read, by parameter name (float64, flattened), put together from every
    rank's pieces."""
    import models

    shapes = {n: p.numel() for n, p in models.build_model(models.get_config("debug", **OVERRIDES),
                                                          device="meta").named_parameters()}
    full = {n: torch.full((k,), math.nan, dtype=torch.float64) for n, k in shapes.items()}
    for r in range(world):
        for name, pieces in torch.load(probe / f"rank{r}.pt", weights_only=True).items():
            for start, end, values in pieces:
                full[name][start:end] = values.double()
    assert all(not t.isnan().any() for t in full.values()), "a gradient element no rank holds"
    return full


def sent_norms(probe, world: int) -> list[float]:
    """‖a_r‖ per rank: the 2-norm of what rank r contributed to the gradient reduction, scaled so that the
    contributions add up to the gradient (an AVG reduce-scatter receives each rank's mean gradient G_r and the
    gradient is ΣG_r/W; FSDP1's SUM receives G_r already divided by its pre-divide factor W = 2)."""
    norms = []
    for r in range(world):
        ops = [c for c in json.loads((probe / f"rank{r}.json").read_text())["collectives"]
               if c["op"].startswith("reduce_scatter")]
        assert ops, "no reduce-scatter recorded"
        scale = [1 / world if "AVG" in c["reduce_op"] else 1.0 for c in ops]
        norms.append(math.sqrt(sum((s * c["norm"]) ** 2 for s, c in zip(scale, ops))))
    return norms


def grad_bound(g1_norm: float, partial_norms: list[float], reduce_dtype: str) -> float:
    """How far the 2-rank gradient may lie from the one-device one (2-norm over all parameters).

    Same weights, same 12 sequences; one micro-batch per rank, and every forward/backward op works per sequence,
    except the reductions over tokens that make each weight gradient (a matmul over the batch's tokens, or a
    sum for the norms' weights), accumulated in fp32 and rounded once to the bf16 gradient. One device rounds
    the whole sum once: g1 = fl(ĝ), |g1 − ĝ| ≤ u|ĝ|. Two ranks round each half, a_r = fl(â_r) with
    |a_r − â_r| ≤ u|â_r|, then reduce them: in bf16 (FSDP1) one more rounding, ≤ u|a_0 + a_1| ≤ u(1+u)Σ|â_r|;
    in fp32 (FSDP2's reduce_dtype) ≤ 2^-24·Σ|a_r| per addition. By the triangle inequality over all elements:

        ‖g2 − g1‖ ≤ u·‖g1‖·(1 + u) + (1 + k)·u·Σ_r‖a_r‖·(1 + u)     k = 1 (bf16 reduction) or 2^-16 (fp32)

    plus the fp32 accumulation orders of the two runs, at most 2·K·2^-24 ≤ 5e-5 relative for K = 384 tokens:
    the factor 1.01 covers it.
    """
    k = 1.0 if reduce_dtype == BF16 else 2.0 ** -16
    return 1.01 * (U * g1_norm + (1 + k) * U * sum(partial_norms)) * (1 + U)


def assert_matches_one_device(probe2, probe1, run2, run1, reduce_dtype: str) -> dict:
    g2, g1 = full_grads(probe2, 2), full_grads(probe1, 1)
    diff = math.sqrt(sum(((g2[n] - g1[n]) ** 2).sum().item() for n in g1))
    g1_norm = math.sqrt(sum((t ** 2).sum().item() for t in g1.values()))
    partial = sent_norms(probe2, 2)
    bound = grad_bound(g1_norm, partial, reduce_dtype)
    where = f"‖g2 − g1‖ = {diff:.3e}, bound {bound:.3e} (‖g1‖ = {g1_norm:.3e}, ‖a_r‖ = {partial})"
    print(where)
    assert diff <= bound, where
    assert diff > 0, "bitwise equal: the reduction was not in a lower precision after all?"
    # step 1 runs on the same weights: its loss differs only by the fp32/fp64 summation order of the mean
    l2, l1 = logged_losses(run2), logged_losses(run1)
    assert abs(l2[1] - l1[1]) <= 1e-6 * abs(l1[1]), (l2[1], l1[1])
    return {"diff": diff, "bound": bound}


# -------------------------------------------------------------------------------------------------- tests
def readme_precisions() -> dict:
    """README's precision table as `PRECISIONS` + Adam-mini's m, v: a "(`ddp`)" note limits a cell to those
    strategies, "—" is None, "any" every strategy, " shards" and "(autocast)" are words for people."""
    import re

    from helpers.data import REPO

    text = (REPO / "README.md").read_text()
    header = "| strategy | precision | master | all-gathered | forward | gradients | reduction | Adam-mini m / v |"
    assert header in text
    lines = text.split(header, 1)[1].strip().splitlines()[1:]
    dtype = {"fp32": F32, "bf16": BF16, "—": None}
    table = {}
    for line in lines[:next(i for i, ln in enumerate(lines) if not ln.startswith("|"))]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        strategies = re.findall(r"`(\w+)`", cells[0]) or ["single", "ddp", "fsdp", "fsdp2"]

        def value(cell, strategy):
            note = re.match(r"^(.*?)\s*\((.*)\)$", cell)
            if note:
                cell, only = note.group(1), re.findall(r"`(\w+)`", note.group(2))
                if only and strategy not in only:
                    return None
            return dtype[cell.replace(" shards", "")]

        for s in strategies:
            m, v = cells[7].split(" / ")
            table[(s, cells[1].strip("`"))] = dict(
                master=value(cells[2], s), gathered=value(cells[3], s),
                forward=[value(x, s) for x in cells[4].split(" → ")], grads=value(cells[5], s),
                reduce=value(cells[6], s), m=value(m, s), v=value(v, s))
    return table


def test_precision_table_is_what_readme_and_help_say():
    want = {k: {**v, "forward": list(v["forward"]), **ADAM_MINI_STATE} for k, v in PRECISIONS.items()}
    assert readme_precisions() == want
    from pretrain.config import build_parser

    help_text = " ".join(build_parser().format_help().split())
    by_reduce = {d: [s for (s, p), v in PRECISIONS.items() if p == "bf16-mixed" and v["reduce"] == d]
                 for d in (BF16, F32)}
    assert (f"gradients are reduced in bf16 under {' and '.join(by_reduce[BF16])}, in fp32 under "
            f"{' and '.join(sorted(by_reduce[F32], reverse=True))}") in help_text
    assert all(v["master"] == F32 and v["grads"] == F32 for (s, p), v in PRECISIONS.items() if p == "bf16-mixed")
    assert "bf16-mixed: fp32 master weights, gradients and optimizer state" in help_text
    assert all(v["master"] == BF16 == v["grads"] for (s, p), v in PRECISIONS.items() if p == "bf16-true")
    assert "bf16-true: bf16 weights and gradients (Adam-mini's m and v stay fp32)" in help_text


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_precision_single_device(precision, data_dir, tmp_path, monkeypatch):
    _, probe = probed_run(data_dir, tmp_path, "single", 1, precision, monkeypatch, train__max_steps=1)
    assert_precision(probe, "single", 1, precision)


@pytest.fixture(scope="module")
def fsdp_bf16_mixed(data_dir, tmp_path_factory):
    """fsdp x 2, bf16-mixed, 8 steps, with the probe: the run the other tests compare with."""
    return probed_run(data_dir, tmp_path_factory.mktemp("precision"), "fsdp", 2, "bf16-mixed")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_precision_bf16_mixed_fsdp_dtypes_and_one_device(strategy, data_dir, tmp_path, monkeypatch, fsdp_bf16_mixed):
    run2, probe2 = (fsdp_bf16_mixed if strategy == "fsdp"
                    else probed_run(data_dir, tmp_path, strategy, 2, "bf16-mixed", train__max_steps=1))
    assert_precision(probe2, strategy, 2, "bf16-mixed")
    run1, probe1 = probed_run(data_dir, tmp_path, strategy, 1, "bf16-mixed", monkeypatch, train__max_steps=1)
    assert_precision(probe1, strategy, 1, "bf16-mixed")
    assert_matches_one_device(probe2, probe1, run2, run1, PRECISIONS[(strategy, "bf16-mixed")]["reduce"])


@pytest.mark.slow
def test_precision_bf16_mixed_fsdp_sigusr1_resumes_bitwise(data_dir, tmp_path, fsdp_bf16_mixed):
    straight = fsdp_bf16_mixed[0]
    stopped = tmp_path / "stopped"
    out = launch(config(data_dir, stopped, "fsdp", 2, "bf16-mixed"), faults="stop_at=4")
    assert "stopped by SIGUSR1 after step 4" in out
    out = launch(config(data_dir, stopped, "fsdp", 2, "bf16-mixed"))
    assert "resumed from" in out
    final = f"step-{STEPS:08d}"
    assert_same_tensors(checkpoint_tensors(straight / final), checkpoint_tensors(stopped / final), "checkpoint")
    assert logged_losses(stopped) == logged_losses(straight)


@pytest.mark.parametrize("first,then", [("bf16-mixed", "32-true"), ("32-true", "bf16-mixed"),
                                        ("bf16-true", "32-true"), ("32-true", "bf16-true")])
def test_precision_checkpoint_resumes_in_another_precision(first, then, data_dir, tmp_path, monkeypatch):
    """What changes: a checkpoint holds the weights in the dtype the run keeps them (fp32 under bf16-mixed and
    32-true, bf16 under bf16-true) and Adam-mini's m, v in fp32 always. Resumed in another precision, the weights
    are loaded as the new run keeps them: bit for bit between bf16-mixed and 32-true (only the compute precision
    of later steps changes), widened exactly from bf16-true to 32-true, rounded to nearest from fp32 to bf16-true;
    m and v load bit for bit in every case."""
    from pretrain import loop

    run = tmp_path / "run"
    loop.fit(config(data_dir, run, "single", 1, first, train__max_steps=2, checkpoint__interval=2, eval__interval=0))
    saved = checkpoint_tensors(run / "step-00000002")
    weight_dtype = {"bf16-true": torch.bfloat16}.get(first, torch.float32)
    assert {v.dtype for k, v in saved.items() if k.startswith("model.")} == {weight_dtype}
    assert {v.dtype for k, v in saved.items() if k.startswith("optimizer.exp_avg")} == {torch.float32}

    loaded = {}
    real_load = loop._load

    def load(path, model, optimizer, data, state, model_config):
        real_load(path, model, optimizer, data, state, model_config)
        from optim.state import sharded_state_dict

        loaded.update({f"model.{n}": p.detach().clone() for n, p in model.module.named_parameters()})
        sd = sharded_state_dict(optimizer.optimizer)
        loaded.update({f"optimizer.{k}.{n}": t.clone() for k in ("exp_avg", "exp_avg_sq") for n, t in sd[k].items()})

    monkeypatch.setattr(loop, "_load", load)
    result = loop.fit(config(data_dir, run, "single", 1, then, train__max_steps=3, checkpoint__interval=3,
                             eval__interval=0))
    assert result.step == 3 and math.isfinite(result.losses[3])
    new_dtype = {"bf16-true": torch.bfloat16}.get(then, torch.float32)
    for key, value in loaded.items():
        if key.startswith("model."):
            assert value.dtype == new_dtype, key
            assert_same_tensors(saved[key].to(new_dtype), value, key)  # exact widening, or rounding to nearest
        else:
            assert_same_tensors(saved[key], value, key)
    assert {v.dtype for k, v in checkpoint_tensors(run / "step-00000003").items() if k.startswith("model.")} \
        == {new_dtype}


# ------------------------------------------------------------------------------ extended (not in the default run)
@pytest.mark.extended
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_precision_ddp(precision, data_dir, tmp_path):
    _, probe = probed_run(data_dir, tmp_path, "ddp", 2, precision, train__max_steps=1)
    assert_precision(probe, "ddp", 2, precision)


@pytest.mark.extended
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_precision_bf16_true_fsdp_dtypes_and_one_device(strategy, data_dir, tmp_path, monkeypatch):
    run2, probe2 = probed_run(data_dir, tmp_path, strategy, 2, "bf16-true", train__max_steps=1)
    assert_precision(probe2, strategy, 2, "bf16-true")
    run1, probe1 = probed_run(data_dir, tmp_path, strategy, 1, "bf16-true", monkeypatch, train__max_steps=1)
    assert_precision(probe1, strategy, 1, "bf16-true")
    assert_matches_one_device(probe2, probe1, run2, run1, PRECISIONS[(strategy, "bf16-true")]["reduce"])
