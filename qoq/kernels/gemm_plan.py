"""GEMM plans as data: which kernel runs a W4A8 / W8A8 GEMM, with which tiles, and how.

`select_plan(M, N, K, mode, device)` reads the plan from the device's table
(`qoq/kernels/configs/<device>.json`: per mode and N x K, a list of M ranges), or derives one
from M, N, K and the GPU's SM count where the table has no entry (`fallback_plan`). The
launchers in int_gemm.py execute a plan and decide nothing; routing questions (does a gate/up
GEMM apply SiLU*mul in its epilogue?) are answered by the plan.

Kernels (int_gemm.py, ws_gemm.py):
- "reg_a": the `tl` kernel whose dequantized weight tile is wgmma's register A operand (swap AB),
  with one-launch split-K; decode-sized M.
- "mma_sync": the same kernel at fewer than four warps, which Triton runs on mma.sync.
- "tma": the `tl` kernel with both operands in shared memory by TMA (Hopper), W4 unpacked in its
  loop or ahead by its own pass; the last partial wave of tiles is cut into K pieces.
- "ws": the warp-specialized persistent Gluon kernel (Hopper), W4 unpacked inside it or ahead.
- "gemv" (gemv.py): a few tokens (M <= GEMV_MAX_M) on the CUDA cores, the weight rows read as
  32-bit words and multiplied by dp4a; one token per program (block_m 1), split-K as reg_a's.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch

from qoq.kernels import configs, ws_gemm

log = logging.getLogger(__name__)

MODE_W8, MODE_W4_G128, MODE_W4_PER_CHANNEL = 0, 1, 2
MODE_NAMES = {MODE_W8: "w8a8", MODE_W4_G128: "w4a8_g128", MODE_W4_PER_CHANNEL: "w4a8_per_channel"}
KERNELS = ("reg_a", "mma_sync", "tma", "ws", "gemv")
REGISTER_KERNELS = ("reg_a", "mma_sync")  # the tensor-core kernels with one-launch split-K
SPLIT_K_KERNELS = REGISTER_KERNELS + ("gemv",)  # the kernels that read split_k / unroll / pdl_chunks
# The most tokens a "gemv" plan takes: every token re-reads the weight tile (from L2 after the
# first) and the dp4a work grows with M, where the tensor-core kernels' grows per MMA only.
GEMV_MAX_M = 4
HOPPER_KERNELS = ("tma", "ws")


@dataclass(frozen=True)
class GemmPlan:
    """One GEMM launch, fully decided. Fields a kernel does not read keep their defaults."""

    kernel: str
    block_m: int  # tokens per tile
    block_n: int  # weight rows per tile
    num_warps: int = 4  # "ws": its fixed 4 + 4 + 1 warps; 4 here
    num_stages: int = 4  # pipeline stages; "ws": ring slots, 0 = as many as shared memory holds
    split_k: int = 1  # register kernels: K splits, merged in the same launch
    unroll: int = 1  # register kernels: 128-deep chunks per loop iteration
    swap_ab: bool = True  # register kernels: the weight tile is the MMA's A side
    prefetch: int = 0  # register kernels (Hopper): chunks of L2 prefetch ahead of the loads
    pdl_chunks: int = 4  # register kernels (Hopper, dependent launch): weight chunks pulled into L2 before the wait
    unpack: str = "in_loop"  # W4: "in_loop" (in the GEMM's main loop) or "ahead" (to int8 by its own pass)
    fuse_silu_mul: bool = False  # W4, "tma" / "ws": a gate/up GEMM applies silu(gate) * up in its epilogue
    group_m: int = 8  # "tma" / "ws": token tiles per weight-column sweep (L2 reuse)
    stream_k: bool = False  # "ws": equal shares of (tile, chunk) units instead of whole tiles
    w_in_registers: bool = False  # "ws": packed W4 as wgmma's register operand (transposed tile)
    quantize_input: bool = False  # quantizing kernels, M <= ACT_PROLOGUE_MAX_M: the GEMM quantizes its fp16 rows
    # overrides for tests and probes; never in a table
    fast: bool | None = None  # PTX unpack (default: on CUDA)
    slots: int = 0  # "tma": resident CTAs assumed by the split tail (0: learned from the compiled kernel)
    grid: int = 0  # "ws": persistent programs (0: the SM count)

    def __post_init__(self):
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"invalid GemmPlan ({what}): {self}")

        need(self.kernel in KERNELS, f"kernel one of {KERNELS}")
        need(self.unpack in ("in_loop", "ahead"), "unpack 'in_loop' or 'ahead'")
        need(self.block_m > 0 and self.block_n > 0 and not (self.block_m & (self.block_m - 1))
             and not (self.block_n & (self.block_n - 1)), "power-of-two tiles")
        register = self.kernel in SPLIT_K_KERNELS
        if self.kernel == "gemv":
            need(self.block_m == 1 and self.prefetch == 0, "gemv: one token per program (block_m 1), no prefetch")
        if self.kernel == "reg_a":
            need(self.num_warps >= 4, "reg_a runs warpgroups: num_warps >= 4")
        if self.kernel == "mma_sync":
            need(self.num_warps < 4, "mma_sync: num_warps < 4")
        if not register:
            need(self.split_k == 1 and self.unroll == 1 and self.swap_ab and self.prefetch == 0
                 and self.pdl_chunks == 4, "split_k / unroll / swap_ab / prefetch / pdl_chunks are the register kernels'")
        else:
            need(self.unpack == "in_loop" and not self.fuse_silu_mul, "register kernels unpack in the loop, no fused SiLU")
            need(self.split_k >= 1 and self.unroll >= 1 and self.prefetch >= 0 and self.pdl_chunks >= 1,
                 "split_k, unroll, pdl_chunks >= 1; prefetch >= 0")
        if self.kernel != "ws":
            need(not self.stream_k and not self.w_in_registers and not self.grid, "stream_k / w_in_registers are ws's")
        else:  # its consumers hold a slot until the next one has landed (REG_A: a group of 2-4)
            need(self.num_stages != 1, "ws: a ring of 2 or more slots (num_stages 0: as many as fit)")
        need(not (self.w_in_registers and self.unpack == "ahead"), "w_in_registers takes packed W4")
        need(not self.quantize_input or quantizing_kernel(self), "quantize_input: a quantizing kernel's (gemv, "
             "the register kernels with swap_ab)")

    def to_json(self) -> dict:
        """The fields that differ from the defaults (kernel and tiles always)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("kernel", "block_m", "block_n") or value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict) -> GemmPlan:
        return cls(**data)

    @classmethod
    def from_config(cls, cfg: dict) -> GemmPlan:
        """A plan from the tile dict that probes and tests pass as `config=` (keys BLOCK_M, BLOCK_N,
        num_warps, num_stages, SPLIT_K, UNROLL, SWAP, PREFETCH, TMA, WS, UNPACK, FUSE, STREAM, REG_A,
        GROUP_M, STAGES, FAST, SLOTS, GRID, PDL), run as such a dict always ran."""
        if cfg.get("TMA"):
            kernel = "ws" if cfg.get("WS") else "tma"
        else:
            kernel = "mma_sync" if cfg["num_warps"] < 4 else "reg_a"
        register = kernel in REGISTER_KERNELS
        if kernel == "ws":
            unpack = "in_loop" if cfg.get("FUSE", True) else "ahead"
        else:
            unpack = "ahead" if cfg.get("UNPACK") and kernel == "tma" else "in_loop"
        return cls(
            kernel=kernel, block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"],
            num_warps=4 if kernel == "ws" else cfg["num_warps"],
            num_stages=cfg.get("STAGES", 0) if kernel == "ws" else cfg["num_stages"],
            split_k=cfg.get("SPLIT_K", 1) if register else 1, unroll=cfg.get("UNROLL", 1) if register else 1,
            swap_ab=cfg.get("SWAP", True) if register else True, prefetch=cfg.get("PREFETCH", 0) if register else 0,
            pdl_chunks=cfg.get("PDL", 4) if register else 4,
            unpack=unpack, fuse_silu_mul=bool(cfg.get("UNPACK")) and not register,
            group_m=cfg.get("GROUP_M", 8), stream_k=bool(cfg.get("STREAM")) and kernel == "ws",
            w_in_registers=bool(cfg.get("REG_A")) and kernel == "ws" and unpack == "in_loop",
            fast=cfg.get("FAST"), slots=cfg.get("SLOTS") or 0, grid=(cfg.get("GRID") or 0) if kernel == "ws" else 0,
        )


def fit_unroll(chunks: int, split: int, unroll: int) -> int:
    """The largest of unroll, unroll / 2, ... that divides every split's chunk count (the last
    split's too), e.g. 2 for 86 chunks in 4 splits of 22."""
    per = -(-chunks // split)
    while unroll > 1 and (per % unroll or chunks % per % unroll):
        unroll //= 2
    return unroll


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_to(tiles: int, want: int, chunks: int) -> int:
    """K splits (powers of two, at most 8, each split >= 4 chunks) until tiles * splits >= want."""
    split = 1
    while tiles * split < want and split < 8 and chunks // (split * 2) >= 4:
        split *= 2
    return split


def fallback_plan(M: int, N: int, K: int, mode: int, sms: int, tma: bool, gluon: bool) -> GemmPlan:
    """A plan from the sizes alone, for GPUs and shapes without a table entry: decode-sized M is
    weight-bandwidth bound (narrow tiles, split-K until ~2 CTAs per SM stream weights); mid-size
    M takes the Gluon kernel with W4 unpacked inside it (64-row tiles while 128-row ones would
    leave SMs idle, stream-K where even those make less than half a wave); large M unpacks W4
    ahead and takes 128x256 tiles where their persistent rounds cost less than 128x128 ones
    (one such round measured 0.58 of a 128x256 one on an H100)."""
    chunks = K // 128
    w4 = mode != MODE_W8
    if M <= 64:
        small = M <= 16
        bm = (8 if w4 and M <= 8 else 16) if small else 64
        tiles = _cdiv(M, bm) * _cdiv(N, 64)
        split = _split_to(tiles, (2 if small else 1) * sms, chunks)
        unroll = fit_unroll(chunks, split, 4) if small and mode == MODE_W4_G128 else 1
        return GemmPlan("reg_a", bm, 64, num_warps=4, num_stages=3 if unroll > 1 else 4, split_k=split, unroll=unroll)
    if not tma:
        if M <= 256:
            return GemmPlan("reg_a", 64, 64, num_warps=4, num_stages=4)
        if M <= 768:
            return GemmPlan("reg_a", 128, 128, num_warps=4, num_stages=3)
        return GemmPlan("reg_a", 256, 128, num_warps=8, num_stages=3)
    large = M > 640
    if not gluon:
        if large:
            return GemmPlan("tma", 128, 256, num_warps=8, num_stages=4, unpack="ahead" if w4 else "in_loop",
                            fuse_silu_mul=w4)
        return GemmPlan("tma", 128, 128, num_warps=4, num_stages=4)
    if not large and w4:
        bm = 64 if _cdiv(M, 128) * _cdiv(N, 128) < sms else 128
        stream = _cdiv(M, bm) * _cdiv(N, 128) * 2 <= sms and chunks >= 32
        return GemmPlan("ws", bm, 128, num_stages=0, stream_k=stream)
    if not large:
        return GemmPlan("tma", 128, 128, num_warps=4, num_stages=4)

    def rounds(bn: int) -> int:
        return _cdiv(_cdiv(M, 128) * _cdiv(N, bn), sms)

    bn = 256 if rounds(256) <= 0.58 * rounds(128) else 128
    return GemmPlan("ws", 128, bn, num_stages=0, unpack="ahead" if w4 else "in_loop", fuse_silu_mul=w4)


def table_plan(table: dict, mode: int, M: int, N: int, K: int) -> GemmPlan | None:
    """The plan of M's range in a table's (mode, N x K) entry, or None."""
    entries = table.get("gemm", {}).get(MODE_NAMES[mode], {}).get(f"{N}x{K}")
    if not entries:
        return None
    bounds = [hi if hi is not None else float("inf") for hi, _ in entries]
    i = bisect.bisect_left(bounds, max(M, 1))
    return GemmPlan.from_json(entries[min(i, len(entries) - 1)][1])


@functools.lru_cache(maxsize=None)
def device_caps(device_index: int) -> tuple[int, bool, bool]:
    """(SMs, TMA, Gluon kernel) of a CUDA device."""
    major = torch.cuda.get_device_capability(device_index)[0]
    return (torch.cuda.get_device_properties(device_index).multi_processor_count, major >= 9,
            ws_gemm.supported(device_index))


def runnable(plan: GemmPlan, tma: bool, gluon: bool, m: int = 1) -> bool:
    """Whether this GPU (TMA, the Gluon kernel) can run the plan for m tokens."""
    return ((plan.kernel in SPLIT_K_KERNELS or (tma and plan.kernel == "tma") or (gluon and plan.kernel == "ws"))
            and (plan.prefetch == 0 or tma) and (plan.kernel != "gemv" or m <= GEMV_MAX_M))


@functools.lru_cache(maxsize=None)
def _warn_untuned(key: str, what: str) -> None:
    """Say once per GPU without a table, or per shape its table lacks, that the fallback plans run
    and how to tune them."""
    log.warning("no tuned GEMM plans for %s in qoq/kernels/configs/%s.json: the shape-agnostic fallback "
                "plans run, which may be slower; tune them once with `python benchmarks/tune_kernels.py "
                "--model <the model's config.json or folder>`", what, key)


@functools.lru_cache(maxsize=8192)
def _select_cuda(M: int, N: int, K: int, mode: int, device_index: int) -> GemmPlan:
    sms, tma, gluon = device_caps(device_index)
    key = configs.device_key(device_index)
    table = configs.load_table(key)
    plan = table_plan(table, mode, M, N, K) if table else None
    if plan is None:
        _warn_untuned(key, f"{MODE_NAMES[mode]} {N}x{K}" if table else "this GPU")
    if plan is None or not runnable(plan, tma, gluon, M):
        plan = fallback_plan(M, N, K, mode, sms, tma, gluon)
    return plan


# the CPU (the interpreter's tests) plans as for a GPU of this many SMs without TMA
CPU_SMS = 8

# Up to this many tokens a register-kernel GEMM may quantize its own input rows (int_gemm's ACT
# prologue: the row's statistics, then each chunk as it is loaded) instead of a row kernel's pass
# before it; every program reads the whole rows, so the L2 traffic grows with M.
ACT_PROLOGUE_MAX_M = 8


def act_prologue_allowed(M: int) -> bool:
    """The cheap half of `quantizes_input`, asked before any plan lookup (it runs for every
    quantized linear of an eager forward)."""
    return M <= ACT_PROLOGUE_MAX_M and os.environ.get("QOQ_ACT_PROLOGUE", "") != "0"


def quantizing_kernel(plan: GemmPlan) -> bool:
    """Whether the plan's kernel can quantize its own input rows (the register kernels with swap_ab,
    gemv)."""
    return (plan.kernel in REGISTER_KERNELS and plan.swap_ab) or plan.kernel == "gemv"


def quantizes_input(plan: GemmPlan, M: int) -> bool:
    """Whether the GEMM of this plan at M tokens takes its activation unquantized: where the plan
    says so (`quantize_input`, a tuner's finding: the prologue against the row kernel's pass, on
    this GPU, at this point). QOQ_ACT_PROLOGUE=1 makes every quantizing plan do it, =0 none (A/B
    runs: an H100 step took 4.26 ms with it everywhere against 2.82, decode-b1-ab-h100.json)."""
    if not act_prologue_allowed(M) or not quantizing_kernel(plan):
        return False
    return plan.quantize_input or os.environ.get("QOQ_ACT_PROLOGUE", "") == "1"


def select_plan(M: int, N: int, K: int, mode: int, device: torch.device) -> GemmPlan:
    """The plan for an [M, K] x [N, K]^T GEMM of `mode` on `device`."""
    if device.type != "cuda":
        return fallback_plan(M, N, K, mode, CPU_SMS, tma=False, gluon=False)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _select_cuda(M, N, K, mode, index)


def set_range(entries: list, lo: int, hi: int | None, plan: dict) -> list:
    """entries ([max_m or None, plan] ascending, the last open) with M in (lo, hi] set to `plan`
    (hi None: everything above lo); equal neighbours merged. An empty list takes plan for all M."""
    inf = float("inf")
    hi_v = inf if hi is None else hi
    spans, prev = [], 0  # (lo, hi, plan) with M in (lo, hi]
    for top, p in entries or [[None, plan]]:
        top_v = inf if top is None else top
        spans.append((prev, top_v, p))
        prev = top_v
    out = []
    for a, b, p in spans:
        for x, y in ((a, min(b, lo)), (max(a, hi_v), b)):  # the parts outside (lo, hi]
            if x < y:
                out.append((x, y, p))
    out.append((lo, hi_v, plan))
    out.sort(key=lambda s: s[0])
    merged = []
    for a, b, p in out:
        if merged and merged[-1][2] == p:
            merged[-1] = (merged[-1][0], b, p)
        else:
            merged.append((a, b, p))
    return [[None if b == inf else int(b), p] for _, b, p in merged]
