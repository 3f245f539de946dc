"""benchmarks/optimizer_comparison.py bookkeeping: identical-batch check, best-lr choice, gaps and the verdict."""
import pytest

import benchmarks.optimizer_comparison as oc


def _run(variant, lr, seed, final, batches="b"):
    return {"spec": {"variant": variant, "lr": lr, "seed": seed}, "final_val": final, "diverged": False,
            "val": [[0, 8.0], [100, final]], "sha256_init": f"i{seed}", "sha256_val_batches": "v",
            "sha256_train_batches": f"{batches}{seed}"}


def _results(runs):
    return {oc.run_name({**r["spec"]}): r for r in runs}


def test_check_identical_refuses_runs_that_saw_other_batches():
    ok = _results([_run("adamw", 1e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 4.1), _run("adamw", 1e-3, 1, 4.0)])
    oc.check_identical(ok)  # seeds may differ from each other
    bad = _results([_run("adamw", 1e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 4.1, batches="x")])
    with pytest.raises(SystemExit, match="sha256_train_batches"):
        oc.check_identical(bad)


def test_all_diverged_variant_is_one_line(tmp_path):
    res = _results([_run("adamw", 1e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, float("nan")),
                    _run("adam_mini", 2e-3, 0, float("inf")), _run("adam_mini", 1e-3, 1, 4.0)])
    oc.check_some_converged(res, ["adamw"], 0, tmp_path)
    with pytest.raises(SystemExit, match=r"every lr of adam_mini diverged \(0.001, 0.002\); try smaller --lrs"):
        oc.check_some_converged(res, ["adamw", "adam_mini"], 0, tmp_path)  # seed 1 converged: not this seed's grid


@pytest.mark.parametrize("lrs, why", [("2e-3,abc", "comma-separated numbers"), ("4e-3,0", "positive"),
                                      ("nan", "positive"), ("", "comma-separated numbers")])
def test_bad_lrs_are_one_line(lrs, why, capsys):
    with pytest.raises(SystemExit) as e:
        oc.parse(["--lrs", lrs])
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert oc.parse(["--lrs", "2e-3,4e-3"]).lrs == [2e-3, 4e-3]


def test_best_lr_gaps_and_verdict():
    res = _results([_run("adamw", 1e-3, 0, 4.2), _run("adamw", 2e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 3.9),
                    _run("adam_mini", 2e-3, 0, float("nan")), _run("adamw", 2e-3, 1, 4.1),
                    _run("adam_mini", 1e-3, 1, 4.0)])
    s = oc.summarise(res, ["adamw", "adam_mini"], 0)
    assert s["best"]["adamw"]["spec"]["lr"] == 2e-3 and s["best"]["adam_mini"]["spec"]["lr"] == 1e-3
    gap = s["gaps"]["adam_mini"]
    assert gap["best_vs_best"] == pytest.approx(-0.1) and gap["paired"] == pytest.approx([-0.1, -0.1])
    assert gap["spread"] == pytest.approx(0.0)  # the same paired gap on both seeds
    assert gap["final_spread"] == pytest.approx(0.1)  # 4.0 vs 4.1 (AdamW), 3.9 vs 4.0 (Adam-mini)
    assert "0.1000 nats below AdamW" in s["sentence"] and "a consistent gap" in s["sentence"]
    noisy = _results([_run("adamw", 1e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 4.3),
                      _run("adamw", 1e-3, 1, 4.02), _run("adam_mini", 1e-3, 1, 4.02)])
    s = oc.summarise(noisy, ["adamw", "adam_mini"], 0)
    assert "above AdamW" in s["sentence"] and "within noise" in s["sentence"]  # +0.3 and 0.0: spread 0.3
    mixed = _results([_run("adamw", 1e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 3.95),
                      _run("adamw", 1e-3, 1, 4.0), _run("adam_mini", 1e-3, 1, 4.05)])
    assert "within noise" in oc.summarise(mixed, ["adamw", "adam_mini"], 0)["sentence"]


def test_variants_name_real_optimizer_options():
    """Each variant's options reach the optimizer: its class, its block layout (against `model_layout` with the
    partition the options name) and its first-moment dtype."""
    import models
    from optim.adam_mini import AdamMini
    from optim.build import build_optimizer
    from optim.layout import Partition, model_layout

    config = models.get_config("debug")
    model = models.build_model(config, device="meta")
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for name, options in oc.VARIANTS.items():
        extra = {k: v for k, v in options.items() if k != "name"}
        opt = build_optimizer(model, config, options["name"], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              **extra)
        if options["name"] == "adamw":
            assert not isinstance(opt, AdamMini), name
            continue
        partition = Partition(**{k: v for k, v in extra.items() if k in ("embedding_blocks", "value_blocks")})
        assert opt.layouts == model_layout(config, shapes, partition), name
        assert str(opt.momentum_dtype) == f"torch.{extra.get('momentum_dtype', 'float32')}", name
    assert model_layout(config, shapes, Partition(embedding_blocks="elements")) != model_layout(config, shapes)



def test_results_record_no_absolute_folder():
    """benchmarks/results/*.json are committed: the data folders they record are relative to the repository."""
    inside, outside = oc.ROOT / "out" / "bench_optcmp" / "c4-4096", oc.ROOT.parent / "shared" / "c4"
    runs = {"a": {**_run("adamw", 1e-3, 0, 4.0), "train": [[1, 9.0]]}, "b": _run("adam_mini", 1e-3, 0, 4.1)}
    runs["a"]["spec"]["data_dir"], runs["b"]["spec"]["data_dir"] = str(inside), str(outside)
    recorded = oc.results_runs(runs)
    assert [r["spec"]["data_dir"] for r in recorded.values()] == ["out/bench_optcmp/c4-4096", "../shared/c4"]
    assert "train" not in recorded["a"] and runs["a"]["spec"]["data_dir"] == str(inside)  # the input is untouched
    for path in (oc.ROOT / "benchmarks" / "results").glob("*.json"):
        assert '"data_dir": "/' not in path.read_text(), path
