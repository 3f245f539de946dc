"""benchmarks/optimizer_comparison.py bookkeeping: identical-batch check, best-lr choice, the verdict sentence."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "optimizer_comparison", Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_comparison.py")
oc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oc)


def _run(opt, lr, seed, final, batches="b"):
    return {"spec": {"optimizer": opt, "lr": lr, "seed": seed}, "final_val": final, "diverged": False,
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


def test_best_lr_and_verdict():
    res = _results([_run("adamw", 1e-3, 0, 4.2), _run("adamw", 2e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 3.9),
                    _run("adam_mini", 2e-3, 0, float("nan")), _run("adamw", 2e-3, 1, 4.1), _run("adam_mini", 1e-3, 1, 4.0)])
    s = oc.summarise(res, None, 0)
    assert s["best"]["adamw"]["spec"]["lr"] == 2e-3 and s["best"]["adam_mini"]["spec"]["lr"] == 1e-3
    assert s["winner"] == "Adam-mini" and s["diff"] == pytest.approx(-0.1)
    assert s["paired"] == pytest.approx([-0.1, -0.1]) and "Adam-mini is better here" in s["sentence"]
    mixed = _results([_run("adamw", 1e-3, 0, 4.0), _run("adam_mini", 1e-3, 0, 3.95),
                      _run("adamw", 1e-3, 1, 4.0), _run("adam_mini", 1e-3, 1, 4.05)])
    assert "on par" in oc.summarise(mixed, None, 0)["sentence"]
