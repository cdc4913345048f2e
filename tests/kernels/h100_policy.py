"""The H100 GEMM policy as it stood before issue 22 (int_gemm.py at a892bd3: `default_config`,
`tma_config`, `_ws_config`, `_ws_small_m`), frozen here to generate and check the H100 plan table.

It lives only in the tests: the library reads `qoq/kernels/configs/nvidia-h100-80gb-hbm3.json`.
`python tests/kernels/h100_policy.py` rewrites that table from
this policy over the bundled model configs' shapes, with the points re-tuned since (`TUNED`) taking
over; `test_gemm_plan.py` checks every M of the grid.
The policy is evaluated as on an H100 with Gluon: 132 SMs, TMA. The probe results its comments cite
left benchmarks/results/ with issue 22; they are in git at a892bd3.
"""

from __future__ import annotations

import dataclasses
import json
import os

import triton

from qoq.kernels.gemm_plan import MODE_NAMES, GemmPlan, fit_unroll

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "qoq", "configs")

MODE_W8, MODE_W4_G128, MODE_W4_PER_CHANNEL = 0, 1, 2
SMS = 132

# From these M on, the TMA path unpacks W4 to int8 ahead of the GEMM (the unpack is a fixed cost
# per layer; the int8 tiles it enables win by more). g128 gains already at decode-sized M: at
# M=768-2048 its in-loop multiply-add unpack costs more than the separate pass (0.78-0.90x the time
# per decoder layer with it, benchmarks/results/decode-gemm-probe-h100.json); per-channel only from
# M=2048 (0.97x).
UNPACK_MIN_M = {MODE_W4_G128: 641, MODE_W4_PER_CHANNEL: 2048}
# The warp-specialized Gluon kernel (`_ws_config`): every shape from WS_MIN_M; above WS_DECODE_M
# (per mode) by persistent rounds per shape; below it `_ws_small_m`'s shapes from M > 64.
WS_MIN_M = 2048
WS_DECODE_M = {MODE_W8: WS_MIN_M, MODE_W4_G128: 640, MODE_W4_PER_CHANNEL: 768}
NARROW_ROUND_COST = 0.58  # a persistent round of 128x128 tiles against one of 128x256 (H100, K=4096)


def tma_config(M: int, N: int, K: int, mode: int) -> dict | None:
    """The shared-memory-operand TMA kernel's tiles where it beats the register-A kernel on the
    H100 (probe of 2026-11-24, benchmarks/results/int8-gemm-probe-h100.json), else None.

    Per-channel W4 gains from M > 768 (1.1x at M=1024-8192; the K=14336 shape from M > 512), g128
    already from M > 128 (its unpack is a multiply-add, which this kernel overlaps with the MMA:
    1.25-1.5x), int8 weights (no unpack) from M > 256, with 128x256 tiles from M > 1024 (1.3-1.45x
    at M=8192). From M >= UNPACK_MIN_M W4 is unpacked to int8 first and runs the int8 tiles.
    """
    ws = _ws_config(M, N, K, mode)
    if ws is not None:
        return ws
    if mode != MODE_W8 and M >= UNPACK_MIN_M[mode]:
        return dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, UNPACK=True)
    if mode == MODE_W4_PER_CHANNEL and 512 < M <= 768 and K >= 8192 and N < 8192:
        # the K=14336 down projection: 0.77x the register-A kernel's time at M=768 (decode probe);
        # 70B-sized layers keep their own rule below
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)
    if mode == MODE_W4_PER_CHANNEL and (M > 768 or (M > 256 and K >= 8192 and N >= 8192)):
        # 70B-sized layers (K, N >= 8192) gain already from M > 256: 0.65-0.9x the register-A
        # kernel's time at M=262/512 (benchmarks/results/pc-mid-m-probe-h100.json).
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4)
    if 128 < M <= 256 and mode != MODE_W8:
        # M=256 probe: g128 gains on all four shapes (1.24x geomean); per-channel nowhere (its
        # qkv shape gained in 2026-11-24's probe, 27.9 against 36.4 us, but the register-A kernel
        # ran it in 22.2 against 24.1 us in stream-k-probe2-h100.json).
        if mode == MODE_W4_G128 and N >= 16384:
            return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4)
        if mode == MODE_W4_G128 and K >= 8192:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4)
        if mode == MODE_W4_G128:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
        return None
    if mode == MODE_W4_G128 and M > 256:
        narrow = M <= 768 and N <= 4096
        return dict(BLOCK_M=128, BLOCK_N=64 if narrow else 128, num_warps=4, num_stages=4 if narrow else 3)
    if mode == MODE_W8 and M > 256:
        if M > 1024:
            return dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4)
    return None


def _ws_config(M: int, N: int, K: int, mode: int) -> dict | None:
    """Where the warp-specialized Gluon kernel (ws_gemm.py) takes the GEMM on Hopper, from the H100
    probes benchmarks/results/ws-gemm-probe-h100.json (M = 1200, 8192), ws-gemm-decode-probe-h100.json
    (M = 768, 1024, 1536) and ws-fused-probe-h100.json (W4 unpacked inside the kernel). None: the
    tl.dot kernels.

    - M >= WS_MIN_M (prefill): every shape, 128x256 tiles, W4 unpacked to int8 by its own pass
      first (FUSE=False). Per decoder layer at M = 8192: 0.90x the tl.dot kernel's time for
      per-channel W4; ~1.0x for g128, whose full-range int8 weights run the same integer GEMM 5-10%
      slower with either kernel (presumably the power limit; not measured). Unpacking inside the kernel was slower here (per-channel 1.06x, g128 1.27x).
    - Decode sizes above WS_DECODE_M: a persistent kernel runs ceil(tiles / SMs) rounds of tiles.
      N <= 6144 (qkv, o_proj) takes the 128x128 tiles where their rounds cost less (a 128x128
      round measured 0.58 of a 128x256 one): at M = 1200 o_proj 58 against 67-69 us before. The
      K = 14336 down projection takes 128x256 tiles only where they make one round; past it the
      tl.dot kernel's split tail is faster (164 against 178 us at M = 1200). Per-channel W4 is
      unpacked inside the kernel (FUSE: no unpack pass; 563 against 636 us per decoder layer at
      M = 1200) and keeps its in-loop-unpack tl.dot kernel up to M = 1024 for o_proj and gate/up
      (one wave of its 128x128 tiles: 237 against 263 us for gate/up with the unpack pass); g128
      is unpacked ahead (its in-kernel unpack's scale loads cost more than the pass).
    The num_warps given are the tl.dot kernel's, which runs these tiles where Gluon is missing."""
    unpack = mode != MODE_W8
    wide = dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, UNPACK=unpack, WS=True, FUSE=False)
    if M >= WS_MIN_M:
        return wide
    if M <= WS_DECODE_M[mode]:
        return _ws_small_m(M, N, K, mode)
    sms = SMS
    fuse = mode == MODE_W4_PER_CHANNEL

    def rounds(bn: int) -> int:
        return -(-(-(-M // 128) * -(-N // bn)) // sms)

    if K >= 8192:
        return dict(wide, FUSE=fuse) if rounds(256) == 1 else None
    if mode == MODE_W4_PER_CHANNEL and M <= 1024 and N != 6144:
        return None
    if N >= 16384 or rounds(256) <= NARROW_ROUND_COST * rounds(128):
        return dict(wide, FUSE=fuse)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=unpack, WS=True, FUSE=fuse)


def _ws_small_m(M: int, N: int, K: int, mode: int) -> dict | None:
    """Mid-size M (16 < M <= 640): the Gluon kernel with W4 unpacked inside it, per shape where it
    beat the tl.dot kernels on the H100 (benchmarks/results/ws-small-m-probe-h100.json, M = 128 /
    256 / 512, and stream-k-probe-h100.json / stream-k-probe2-h100.json, M = 32-512). None where
    the tl.dot kernel won.

    - Stream-K (STREAM) where few tiles would leave most SMs idle: the K = 14336 down projection
      up to M = 128 (g128: 256), 64x128 tiles to M = 64 (32 tiles: per-channel 30.1 -> 21.6 us,
      g128 33.1 -> 25.7 at M = 64), 128x128 from there (M = 128: 40.0 -> 29.6, g128 52.8 ->
      34.0); o_proj at 64 < M <= 128 (g128 17.6 -> 14.6). Elsewhere the partial-tile round trip
      cost more than the idle SMs (qkv at M = 256: 27.1 against 22.7 us).
    - Narrow 64-row tiles at M <= 384 for the narrow and the long-K shapes (more CTAs streaming
      weights), and for gate/up at M <= 64 (34.0 against 39.3 us at M = 64); 128x128 elsewhere.
    - The packed weights as wgmma's register operand (REG_A) on 256-token x 128-row tiles for
      gate/up at 192 < M <= 256 (reg-a-probe-h100.json, M = 256: g128 78.7 against 87.2 us,
      per-channel 76.8 against 78.6) and g128 qkv at 384 < M <= 512 (41.5 against 43.6 us).
      Its chunks do not overlap their own unpack (ptxas waits before it rewrites the A
      registers), so it pays only where the tiles are large enough for the other consumer's MMAs
      to keep the tensor cores busy."""
    if M <= 16 or M > 640 or mode == MODE_W8:
        return None
    narrow = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True)
    square = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True)
    g128 = mode == MODE_W4_G128
    if K >= 8192 and N < 8192 and (M <= 128 or (g128 and M <= 256)):
        return dict(narrow if M <= 64 else square, STREAM=True)
    if M <= 64:  # gate/up only (Llama-2-70B's K = 8192 one unmeasured)
        return narrow if N >= 16384 and K < 8192 else None
    if K >= 8192 and N >= 8192:
        # Llama-2-70B-sized layers (benchmarks/results/mid-70b-probe-h100.json, M = 257): g128 on
        # 128x128 tiles (qkv 84 against 116 us with 64-row tiles, gate/up 442 against 472), its
        # K = 28672 down projection unpacked ahead on 128x256 tiles (296 against 321); per-channel
        # keeps the 64-row tiles but for qkv (N = 10240: 80 against 91 us).
        if g128:
            return dict(square, BLOCK_N=256, num_warps=8, FUSE=False) if K > 16384 else square
        return square if N < 16384 and K < 16384 and N > 8192 else narrow
    if K >= 8192:  # the down projection
        return narrow if M <= 384 else square
    if N >= 16384:  # gate/up
        if 192 < M <= 256:
            return dict(square, BLOCK_M=256, REG_A=True)
        return square if M <= 192 or (g128 and M > 384) else None
    if M <= 128 and N <= 4096:
        return dict(narrow, STREAM=True)
    if M <= 192:
        return narrow
    if M <= 384:
        return narrow if N <= 4096 else (square if g128 else None)
    if g128 and M <= 512 and N == 6144:  # qkv
        return dict(square, BLOCK_M=256, REG_A=True)
    return square if N <= 4096 else None



def default_config(M: int, N: int, K: int, mode: int, tma: bool = False) -> dict:
    """Tiles by M bucket, from the H100 sweeps (docs/kernels.md, "Tuning log").

    With `tma` (a Hopper GPU) the large-M buckets go to the TMA kernel (`tma_config`).

    The weight-as-A order (SWAP) won at every size. Small M is weight-bandwidth bound: narrow
    64-row weight tiles and a one-launch split-K until ~256 CTAs stream weights (M <= 16; its
    chunks per iteration, 8-token tiles at M <= 8 and the two-warp mma.sync programs are below). At M=256 the main loop is latency-bound (the
    register-A wgmma is waited on every chunk), so the best tile is the one that keeps the most
    CTAs per SM busy for the shape: small tiles for N<=6144, 256-token tiles for the wide gate/up GEMM,
    split-K 2 for the K=14336 down projection.
    """
    if tma and (cfg := tma_config(M, N, K, mode)) is not None:
        return dict(cfg, TMA=True, SPLIT_K=1)
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
        # Split-K until ~256 programs stream weights (longer programs than 512 won on every
        # shape for both W4 modes: benchmarks/results/g128-small-m-probe-h100.json,
        # pc-unroll-probe-h100.json). Gate/up takes four chunks per iteration (with session 9's
        # L2 prefetch, 27.0 / 28.9 us per-channel and 29.2 / 31.0 g128 at M = 1 / 16, against
        # 30.9 / 32.2 and 32.9 / 34.9: g128-unroll-probe-h100.json); g128 runs four chunks per
        # iteration everywhere (its scale bytes in one 32-bit load per row, PACKED);
        # per-channel's down projection two chunks. The L2 prefetch option (PREFETCH, Hopper) is
        # no longer a default: the programs below do better without it.
        want = 256
        if mode == MODE_W4_G128 or (mode == MODE_W4_PER_CHANNEL and N >= 16384):
            cfg.update(UNROLL=4, num_stages=2 if N >= 16384 else 3)
        elif mode == MODE_W4_PER_CHANNEL and K >= 8192:
            cfg.update(UNROLL=2)
        if mode != MODE_W8 and (N >= 16384 or (mode == MODE_W4_G128 and K >= 8192 and M > 8)):
            # two warps, which Triton runs on mma.sync instead of a warpgroup's wgmma: 20-30% fewer
            # instructions per weight (offline sm_90 build, benchmarks/sass_report.py --warps).
            # gate/up at M = 1 / 16: g128 27.5-27.9 / 33.3 -> 27.4-27.9 / 29.7-30.3 us,
            # per-channel 26.5-26.9 / 28.6 -> 25.6 / 28.5-29.0; g128's down projection at M = 16
            # 20.8 -> 18.8-19.0 (mma2-probe-h100.json, mma2-probe2-h100.json). qkv and o_proj,
            # per-channel's down projection and g128's at M <= 8 stay on wgmma (on mma.sync they
            # ran up to 8% slower). Neither these programs nor the 8-token tiles below gain from
            # the L2 prefetch (PREFETCH) that the warpgroup programs took here before: g128's down
            # projection at M = 16 ran 17.7 without against 18.5 us with it, per-channel gate/up
            # 28.4 against 28.9, g128 gate/up 29.6 against 29.4 (m16-prefetch-probe-h100.json);
            # at M = 1 gate/up 27.6 against 28.5, down 16.7 against 17.5
            # (narrow-m-hopper-probe-h100.json).
            cfg["num_warps"] = 2
        if mode != MODE_W8 and M <= 8:
            # 8-token tiles (wgmma's and mma.sync's narrowest N): half the X tile and the
            # accumulator, 12-20% fewer instructions per chunk (g128 M = 1: qkv 10.6 -> 9.8 us,
            # down 18.7 -> 16.7; narrow-m-probe-h100.json, narrow-m-hopper-probe-h100.json).
            cfg["BLOCK_M"] = 8
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
        want = 128
    elif M <= 256:
        want = 0
        if mode == MODE_W8:
            big = N >= 16384 and M > 128
            cfg = dict(BLOCK_M=256 if big else (128 if N == 6144 and M > 128 else 64), BLOCK_N=128,
                       num_warps=8, num_stages=3 if big else 4)
        elif N >= 16384 and M > 128:
            cfg = (dict(BLOCK_M=256, BLOCK_N=64, num_warps=4, num_stages=3) if mode == MODE_W4_G128
                   else dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3))
        elif K >= 8192:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4)
            want = 2 * triton.cdiv(M, 128) * triton.cdiv(N, 64)  # split-K 2
        elif mode == MODE_W4_PER_CHANNEL and N <= 4096:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=6)
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
    elif M <= 768:
        # 256-token tiles would leave half of the SMs idle on N=4096 (64 CTAs at M=512): 128-token
        # tiles, split-K 2 for the K=14336 down projection (M=512 sweep, docs/kernels.md).
        want = 0
        if K >= 8192:
            cfg = dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3)
            want = 2 * triton.cdiv(M, 256) * triton.cdiv(N, 128)
        elif mode == MODE_W4_G128:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3)
        want = 0
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = 1
    while tiles * split < want and split < 8 and (K // 128) // (split * 2) >= 4:
        split *= 2
    cfg["SPLIT_K"] = split
    cfg["SWAP"] = True
    if "UNROLL" in cfg:
        cfg["UNROLL"] = fit_unroll(K // 128, split, cfg["UNROLL"])
    return cfg



def old_fused_silu_mul(M: int, N: int, K: int, mode: int) -> bool:
    """`int_gemm.fused_silu_mul` on an H100 before issue 22."""
    cfg = tma_config(M, N, K, mode)
    return bool(mode != MODE_W8 and cfg and cfg.get("UNPACK") and not (cfg.get("WS") and cfg.get("FUSE", True)))


def old_plan(M: int, N: int, K: int, mode: int) -> GemmPlan:
    """What the old policy ran on an H100, as a plan."""
    plan = GemmPlan.from_config(default_config(M, N, K, mode, tma=True))
    # int8 weights have nothing to unpack (the Gluon dicts said "not fused" for them too)
    unpack = "in_loop" if mode == MODE_W8 else plan.unpack
    return dataclasses.replace(plan, fuse_silu_mul=old_fused_silu_mul(M, N, K, mode), unpack=unpack)


# Past this M the old policy no longer depends on M (WS_MIN_M and above: one plan per shape).
M_GRID_MAX = 4096

# Where the H100 was re-tuned since: decode-sized M of Llama-3-8B's shapes with the gemv kernel
# among the candidates ({mode: {"NxK": [[lo, hi, plan], ...]}}, M in (lo, hi]; h100_tuned.json says
# from which run). The table takes these over the old policy.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "h100_tuned.json")) as _f:
    _TUNED_FILE = json.load(_f)
TUNED = _TUNED_FILE["gemm"]
# decode attention's latency and wide plans, as tune_kernels.py chose them on an H100 (the main
# plans are DEFAULT_PLANS)
TUNED_ATTENTION = {k: v for k, v in _TUNED_FILE.items() if k.startswith("decode_attention_")}


def tuned_plan(M: int, N: int, K: int, mode: int) -> GemmPlan | None:
    """The re-tuned plan at this point, or None where the old policy's stands."""
    for lo, hi, plan in TUNED.get(MODE_NAMES[mode], {}).get(f"{N}x{K}", []):
        if lo < M <= hi:
            return GemmPlan.from_json(plan)
    return None


def h100_plan(M: int, N: int, K: int, mode: int) -> GemmPlan:
    """What the H100 table runs: the re-tuned plan where there is one, else the old policy's."""
    return tuned_plan(M, N, K, mode) or old_plan(M, N, K, mode)


def model_shapes(config_dir: str = CONFIGS) -> list[tuple[int, int]]:
    """(N, K) of qkv, o_proj, gate_up and down_proj of every bundled model config but tiny.json."""
    shapes = set()
    for name in sorted(os.listdir(config_dir)):
        if not name.endswith(".json") or name == "tiny.json":
            continue
        with open(os.path.join(config_dir, name)) as f:
            c = json.load(f)
        hidden, inter = c["hidden_size"], c["intermediate_size"]
        heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        head_dim = c.get("head_dim") or hidden // heads
        pad = lambda k: -(-k // 128) * 128  # noqa: E731 (QuantLinear pads K to 128)
        shapes |= {((heads + 2 * kv_heads) * head_dim, pad(hidden)), (hidden, pad(heads * head_dim)),
                   (2 * inter, pad(hidden)), (hidden, pad(inter))}
    return sorted(shapes)


def shape_entries(N: int, K: int, mode: int) -> list:
    """[max_m, plan] ranges (the last open) of the H100 plans for one (mode, N, K)."""
    entries: list = []
    for m in range(1, M_GRID_MAX + 2):  # one past the grid: the open range is the old policy's
        plan = h100_plan(m, N, K, mode).to_json()
        if entries and entries[-1][1] == plan:
            entries[-1][0] = m
        else:
            entries.append([m, plan])
    entries[-1][0] = None
    return entries


def h100_table() -> dict:
    from qoq.kernels.decode_attention import DEFAULT_PLANS

    gemm = {MODE_NAMES[mode]: {f"{n}x{k}": shape_entries(n, k, mode) for n, k in model_shapes()}
            for mode in (MODE_W8, MODE_W4_G128, MODE_W4_PER_CHANNEL)}
    return {"device": "NVIDIA H100 80GB HBM3", "sms": SMS,
            "source": "generated by tests/kernels/h100_policy.py from the H100 if-tree of int_gemm.py "
                      "(a892bd3), which the H100 probes under benchmarks/results/ had tuned, and the "
                      "decode-sized points re-tuned since (tests/kernels/h100_tuned.json)",
            "gemm": gemm, "decode_attention": {str(b): p.to_json() for b, p in DEFAULT_PLANS.items()},
            **TUNED_ATTENTION}


if __name__ == "__main__":
    from qoq.kernels.configs import dump_table, table_path

    dump_table(h100_table(), table_path("nvidia-h100-80gb-hbm3"))
