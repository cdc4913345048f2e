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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class L2Prefetch:
    """Bytes a kernel pulls into L2 for the kernels after it (`prefetch_l2`): up to two ranges,
    each the first `nbytes` of a contiguous tensor no kernel writes (a linear's weights).
    `for_tensors` builds it once (byte views); a launch passes `launch_args()`."""

    ranges: tuple  # ((uint8 view, nbytes), ...), at most two
    evict_last: bool = False

    @classmethod
    def for_tensors(cls, ranges, evict_last: bool = False) -> L2Prefetch:
        """ranges: (tensor, nbytes or None for all of it), at most two."""
        if not 1 <= len(ranges) <= 2:
            raise ValueError(f"L2Prefetch takes one or two ranges, got {len(ranges)}")
        views = []
        for t, nbytes in ranges:
            if not t.is_contiguous():
                raise ValueError("L2Prefetch ranges must be contiguous tensors")
            flat = t.detach().reshape(-1).view(torch.uint8)
            views.append((flat, flat.numel() if nbytes is None else max(0, min(int(nbytes), flat.numel()))))
        return cls(tuple(views), evict_last)

    def launch_args(self, cuda: bool) -> dict:
        """The kernel arguments of `prefetch_l2` (off CUDA: plain loads, which the interpreter runs)."""
        (a, na), (b, nb) = self.ranges if len(self.ranges) == 2 else (self.ranges[0], (self.ranges[0][0], 0))
        mode = (2 if self.evict_last else 1) if cuda else 3
        return dict(pf_ptr=a, pf_bytes=na, pf2_ptr=b, pf2_bytes=nb, PREFETCH=mode)


@lazy_jit.helper
def prefetch_line_l2(ptrs, EVICT_LAST: tl.constexpr = False):
    """Prefetch the cache line of each address of `ptrs` into L2 (one instruction per thread);
    EVICT_LAST: with the evict-last priority, so that streaming loads evict other lines first."""
    asm: tl.constexpr = ("prefetch.global.L2::evict_last [$1]; // $0" if EVICT_LAST
                         else "prefetch.global.L2 [$1]; // $0")
    tl.inline_asm_elementwise(asm, "=r,l", [ptrs.to(tl.int64, bitcast=False)], dtype=tl.int32, is_pure=False, pack=1)


@lazy_jit.helper
def _prefetch_share_l2(base, nbytes, share, shares, MODE: tl.constexpr):
    """Share `share` of `shares` of the nbytes from the byte pointer `base`, pulled into L2 in
    128-byte lines, 128 lines a step over the program's threads."""
    lines = tl.cdiv(nbytes, 128)
    per = tl.cdiv(lines, shares)
    lo = share * per
    hi = tl.minimum(lo + per, lines)
    offs = tl.arange(0, 128)
    for l0 in range(lo, hi, 128):
        line = tl.minimum(l0 + offs, hi - 1).to(tl.int64)  # the step's tail repeats the last line
        if MODE == 3:  # off CUDA: a plain load of each line's first byte (the interpreter runs the addressing)
            tl.load(base + line * 128)
        else:
            prefetch_line_l2(base + line * 128, MODE == 2)


@lazy_jit.helper
def prefetch_l2(pf_ptr, pf_bytes, pf2_ptr, pf2_bytes, PREFETCH: tl.constexpr):
    """The program's share of two byte ranges (weights the next kernels read, `L2Prefetch`) pulled
    into L2, the launch's programs splitting each range between them. A latency-bound kernel
    (decode attention at a small batch) leaves the memory idle while it runs; issued before its
    `pdl_enter`, the lines stream in while it and the kernel before it run. PREFETCH: 0 none, 1 plain,
    2 evict-last, 3 plain loads (off CUDA). Memory no kernel writes only: it runs before the wait."""
    if PREFETCH:
        share = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        shares = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        _prefetch_share_l2(pf_ptr, pf_bytes, share, shares, PREFETCH)
        _prefetch_share_l2(pf2_ptr, pf2_bytes, share, shares, PREFETCH)


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
