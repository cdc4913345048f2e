import os

import pytest
import torch

import qoq.kernels as K
from qoq.kernels.dispatch import use_triton


def test_use_triton_cpu_follows_env(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("QOQ_FORCE_TRITON", raising=False)
    assert use_triton(t) is False
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    assert use_triton(t) is True


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU Triton needs the interpreter")
def test_public_functions_dispatch(monkeypatch, gen):
    from helpers import g128_case

    case = g128_case(2, 32, 128, gen=gen)
    monkeypatch.delenv("QOQ_FORCE_TRITON", raising=False)
    ref = K.w4a8_g128_gemm(*case)
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    out = K.w4a8_g128_gemm(*case)
    assert torch.equal(ref, out)
    assert K.w4a8_g128_gemm.__name__ == "w4a8_g128_gemm"
