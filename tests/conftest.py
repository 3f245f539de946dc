"""Fixtures shared by the whole suite; helpers live in tests/helpers/ (`from helpers.runs import ...`)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared slice of the embedded sample (helpers/data.py), shared by the session."""
    from helpers.data import prepare_small

    return prepare_small(tmp_path_factory.getbasetemp() / "pretrain_sample")


@pytest.fixture
def faults(monkeypatch):
    """`faults(stop_at=3)` / `faults(nan_at=4)`: inject a real stop signal or a NaN loss into in-process runs."""
    from helpers import faults as f

    return lambda **kw: f.install(monkeypatch.setattr, **kw)


@pytest.fixture
def float64_default():
    # Fabric's "64-true" casts module outputs to the default dtype: make that float64 too.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
