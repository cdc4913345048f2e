"""The one place that decides between a Triton kernel and its torch reference twin.

`use_triton(t)` is True for CUDA tensors when Triton imports, and on the CPU only when
QOQ_FORCE_TRITON=1 (tests run the kernels there under TRITON_INTERPRET=1).

Kernels are jitted lazily (`lazy_jit`): Triton decides at decoration time whether a kernel is
interpreted, so deferring the decoration to the first launch lets a test session set
TRITON_INTERPRET=1 no matter which module imported qoq.kernels first.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """True when the kernels for tensor `t` should run through Triton."""
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return os.environ.get("QOQ_FORCE_TRITON", "0") == "1"


class lazy_jit:
    """`triton.jit` applied at the first launch instead of at import."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted = None
        functools.update_wrapper(self, fn)

    @property
    def jitted(self):
        if self._jitted is None:
            import triton

            self._jitted = triton.jit(self.fn)
        return self._jitted

    def __getitem__(self, grid):
        return self.jitted[grid]


def dispatch(ref_fn, triton_fn):
    """Build the public function: Triton path when `use_triton(first tensor arg)`."""

    @functools.wraps(ref_fn)
    def public(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and use_triton(first):
            return triton_fn(*args, **kwargs)
        return ref_fn(*args, **kwargs)

    public.__name__ = ref_fn.__name__.removesuffix("_ref")
    public.__qualname__ = public.__name__
    public.__doc__ = ref_fn.__doc__
    return public
