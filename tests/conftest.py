"""Test-suite set-up.

Without a GPU the Triton kernels run through the interpreter, which must be chosen before triton is
imported; outputs of every kernel launch are poisoned (NaN / -1) so an unwritten element fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTMSC_POISON", "1")

import pytest  # noqa: E402

import fastmsc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The UCR/UEA datasets beside the checkout (../shared/data), or $FASTMSC_SHARED_DATA; None if absent."""
    candidates = [os.environ.get("FASTMSC_SHARED_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("the shared UCR/UEA datasets (../shared/data beside the checkout) are absent in this clone")
    return path


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts on 'auto' and cannot leak a backend into the next."""
    fastmsc.set_backend("auto")
    yield
    fastmsc.set_backend("auto")


@pytest.fixture(autouse=True)
def _lstm_extension_on_every_cpu_class(monkeypatch):
    """`auto` runs the LSTM on torch for CPU calls near grid cases where the extension was measured slower on this
    CPU class (fastmsc.kernels.lstm_cpu_measured). The suite's expectations of `auto` must not depend on which
    machine runs it, so tests see no measurements; tests/test_lstm_layer_fused.py checks the rule itself."""
    from fastmsc.kernels import lstm_cpu_measured
    empty = lstm_cpu_measured.Rule({})
    monkeypatch.setattr(lstm_cpu_measured, "rule", lambda: empty)
