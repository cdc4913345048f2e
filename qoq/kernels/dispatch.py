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

try:
    import triton.language as tl  # noqa: F401  (the helpers' constexpr annotations)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    tl = None


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


_BOUND_MODULES: set = set()  # ids of the module namespaces whose helpers are rebound


def _bind_helpers(module_globals: dict) -> None:
    """Rebind every lazy_jit helper of a module namespace to its JITFunction, once per module."""
    if id(module_globals) in _BOUND_MODULES:
        return
    _BOUND_MODULES.add(id(module_globals))
    for name, obj in list(module_globals.items()):
        if isinstance(obj, lazy_jit) and obj.is_helper:
            module_globals[name] = obj.jitted


class lazy_jit:
    """`triton.jit` applied at the first launch instead of at import.

    A `@lazy_jit.helper` is a device function that kernels (or helpers) call: when a kernel or
    helper is jitted, every helper in its module's globals is jitted first and its module name
    rebound to the JITFunction, which is what Triton resolves the call to; a helper imported from
    another module rebinds that module's helpers in turn.
    """

    def __init__(self, fn, helper: bool = False):
        self.fn = fn
        self.is_helper = helper
        self._jitted = None
        functools.update_wrapper(self, fn)

    @classmethod
    def helper(cls, fn):
        return cls(fn, helper=True)

    @property
    def jitted(self):
        if self._jitted is None:
            import triton

            _bind_helpers(self.fn.__globals__)
            if self._jitted is None:  # (binding its module may have jitted it already)
                self._jitted = triton.jit(self.fn)
        return self._jitted

    def __getitem__(self, grid):
        return self.jitted[grid]


@functools.lru_cache(maxsize=16)
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Programmatic dependent launch for kernels on t's device (Hopper and later, QOQ_PDL not 0).

    A kernel launched with it may start while the kernel before it on the stream is still
    running, once that one's programs have all signalled (`gdc_launch_dependents`) or exited; it
    must wait (`gdc_wait`) before it reads anything an earlier kernel wrote or writes anything an
    earlier kernel may read. What it does before the wait overlaps the previous kernel: the
    decode-sized GEMMs launch during the row kernel that quantizes their input and pull the
    first chunks of their weights into L2 (weights no kernel writes)."""
    return t.is_cuda and os.environ.get("QOQ_PDL", "1") != "0" and _pdl_device(t.device.index or 0)


def pdl_launch(t: torch.Tensor) -> dict:
    """The launch arguments of a kernel that begins with `pdl_enter(PDL)`: a programmatic
    dependent launch where `pdl(t)`, else an ordinary one."""
    return dict(PDL=True, launch_pdl=True) if pdl(t) else {}


@lazy_jit.helper
def pdl_enter(PDL: tl.constexpr):
    """A kernel of the decode chain (row quantization, RoPE / KV write, decode attention), launched
    by `pdl_launch`: wait for the kernel before it, then let the next one launch at once. The
    next kernel's programs are then resident and waiting when this one ends (no launch gap), and
    at most one kernel runs ahead: it launches only once all of this kernel's programs are past
    their wait. Nothing before this call may touch memory."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


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


def output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A kernel's output buffer: a fresh one like q, or the caller's `out` (e.g. a slice of a
    larger buffer, so that two kernels fill one tensor without a concatenation)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


_ARRIVAL_COUNTERS: dict = {}


def arrival_counters(device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for one-launch split-K reductions (kept per device).

    Shared by the kernels that merge their own splits (the split-K GEMM, decode attention): each
    launch finishes before the next one on the stream touches them (a dependent launch waits for
    the kernel before it first, `pdl_enter`).

    The kernel resets every counter it uses, so the buffer stays zero between calls. It is
    allocated outside CUDA-graph capture when possible (a buffer first made during a capture
    would live in that graph's private pool); inside a capture without a cached buffer, a fresh
    zeroed one is captured instead.
    """
    buf = _ARRIVAL_COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        fresh = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        _ARRIVAL_COUNTERS[device] = buf = fresh
    return buf
