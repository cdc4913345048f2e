"""Kernel tests: on a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1.

qoq.kernels jits lazily (dispatch.lazy_jit), so setting the variable here works even if some
other test imported qoq.kernels first.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_NAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh data every run
    return g


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty/empty_like return NaN (floats) or -128 (int8) so unwritten outputs show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.dtype in _NAN_DTYPES:
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(-128)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
