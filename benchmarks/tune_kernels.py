"""Tune the GEMM plan table of the present GPU for a model's linear shapes.

For each mode, shape (qkv, o_proj, gate_up, down_proj of the model config) and M, a bounded list
of candidate plans (the table's current plan first, the shape-agnostic fallback second, then a
few per M class, and the plans the tree's other tables give the point: a table tuned later may
name kernels this one predates) is checked against the torch twin on fresh data and timed as bench_kernels.py
times (CUDA graphs, weight copies rotated beyond L2, median). The fastest plan takes the M range
(the protocol's M below it, M] of the shape's entry (a run over a few M leaves the other ranges
alone); the table is rewritten after every shape, so a run cut by --budget-s keeps what it
finished (candidates still untried keep the table's plans).

    python benchmarks/tune_kernels.py --model qoq/configs/llama-3-8b.json --budget-s 420 \\
        --out qoq/kernels/configs/nvidia-h200.json

Starts from --table (default: this GPU's table in the tree, else the H100's).

Decode attention (--attention-bits): one plan per KV bit width serves the launches of at least
as many (sequence, kv head) pairs as SMs, another (the latency plan) those of fewer, a third (the
wide plan) those of at least 8 per SM (serving batches of a few hundred), so each is tuned by
coordinate descent over the plan's knobs at a few (batch, context) points of the model's heads: a
change is kept where the geometric mean of its times over the points is at least 2% below the
best plan's so far; two sweeps over the knobs at most.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import multiprocessing
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))

from helpers import g128_weights, per_channel_weights, random_activations, rel_err, w8_weights  # noqa: E402

from qoq.kernels import configs  # noqa: E402
from qoq.kernels.decode_attention import (  # noqa: E402
    DEFAULT_PLANS,
    LATENCY_KEY,
    WIDE_KEY,
    DecodePlan,
    num_sms,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from qoq.kernels.gemm_plan import (  # noqa: E402
    ACT_PROLOGUE_MAX_M,
    GEMV_MAX_M,
    MODE_NAMES,
    MODE_W4_G128,
    MODE_W8,
    SPLIT_K_KERNELS,
    GemmPlan,
    fallback_plan,
    fit_unroll,
    quantizes_input,
    quantizing_kernel,
    runnable,
    set_range,
    table_plan,
)
from qoq.kernels.int_gemm import int8_gemm_act_triton  # noqa: E402
from qoq.kernels.kv_cache import allocate_kv_cache  # noqa: E402
from qoq.kernels.quant import (  # noqa: E402
    ACT_ADD_RMSNORM,
    ACT_PLAIN,
    ActInput,
    add_rmsnorm_quant,
    quantize_per_token,
)
from qoq.kernels.w4a8_gemm import (  # noqa: E402
    w4a8_g128_gemm_ref,
    w4a8_g128_gemm_triton,
    w4a8_per_channel_gemm_ref,
    w4a8_per_channel_gemm_triton,
)
from qoq.kernels.w8a8_gemm import w8a8_gemm_ref, w8a8_gemm_triton  # noqa: E402

MODES = {name: mode for mode, name in MODE_NAMES.items()}
# mode -> (triton, reference, weight builder, takes x_sum)
KERNELS = {
    MODE_W8: (w8a8_gemm_triton, w8a8_gemm_ref, w8_weights, False),
    MODE_W4_G128: (w4a8_g128_gemm_triton, w4a8_g128_gemm_ref, g128_weights, False),
    2: (w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref, per_channel_weights, True),
}
DEFAULT_MS = (1, 4, 8, 16, 64, 128, 256, 512, 1024, 4096)
TOLERANCE = 2e-3


def linear_shapes(config_path: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of qkv, o_proj, gate_up and down_proj; K padded to 128 as QuantLinear does.
    config_path: a config JSON (qoq/configs, a HF config.json) or a folder holding config.json (a HF
    model, a qoq checkpoint)."""
    if os.path.isdir(config_path):
        config_path = os.path.join(config_path, "config.json")
    with open(config_path) as f:
        c = json.load(f)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim") or hidden // heads
    pad = lambda k: -(-k // 128) * 128  # noqa: E731
    return [("qkv", (heads + 2 * kv_heads) * head_dim, pad(hidden)), ("o_proj", hidden, pad(heads * head_dim)),
            ("gate_up", 2 * inter, pad(hidden)), ("down_proj", hidden, pad(inter))]


def _register(m, n, k, mode, sms, warps, want, stages=4) -> GemmPlan:
    w4 = mode != MODE_W8
    bm = (8 if w4 and m <= 8 else 16) if m <= 16 else 64
    tiles = -(-m // bm) * -(-n // 64)
    chunks, split = k // 128, 1
    while tiles * split < want and split < 8 and chunks // (split * 2) >= 4:
        split *= 2
    unroll = fit_unroll(chunks, split, 4 if mode == MODE_W4_G128 and m <= 16 else 1)
    return GemmPlan("reg_a" if warps >= 4 else "mma_sync", bm, 64, num_warps=warps, num_stages=stages,
                    split_k=split, unroll=unroll)


def _hopper(m, n, k, mode, sms) -> list[GemmPlan]:
    w4 = mode != MODE_W8
    ahead = "ahead" if w4 else "in_loop"
    out = []
    if m <= 64:
        out += [GemmPlan("ws", 64, 128, num_stages=0, stream_k=s) for s in (False, True)]
        out.append(GemmPlan("tma", 64, 64, num_stages=4))
    elif m <= 640:
        # W4: the packed weights as wgmma's register operand first (no unpacked copy in shared
        # memory; the taller tiles give each chunk's unpack more MMA work to hide behind), then
        # through shared memory; stream-K where whole tiles leave SMs idle
        if w4:
            out += _ws_tiles(m, n, sms, (64, 128, 256) if m > 128 else (64, 128), reg_a=True)
        out += _ws_tiles(m, n, sms, (64, 128), reg_a=False)
        out += [GemmPlan("tma", 128, 64, num_stages=4), GemmPlan("tma", 128, 128, num_stages=3)]
    else:
        if w4:
            out += _ws_tiles(m, n, sms, (256, 128), reg_a=True)
        out += [GemmPlan("ws", 128, 256, num_stages=0, unpack=ahead), GemmPlan("ws", 128, 128, num_stages=0, unpack=ahead),
                GemmPlan("ws", 128, 128, num_stages=0)]
        out += [GemmPlan("tma", 128, 256, num_warps=8, unpack=ahead), GemmPlan("tma", 128, 128, num_stages=4)]
    return out


def _ws_tiles(m, n, sms, rows, reg_a: bool) -> list[GemmPlan]:
    """The ws kernel at block_m in `rows` x 128 channels, each also with stream-K where its whole
    tiles leave SMs idle."""
    out = []
    for bm in rows:
        out.append(GemmPlan("ws", bm, 128, num_stages=0, w_in_registers=reg_a))
        if -(-m // bm) * -(-n // 128) < sms:
            out.append(GemmPlan("ws", bm, 128, num_stages=0, stream_k=True, w_in_registers=reg_a))
    return out


def candidates(mode: int, m: int, n: int, k: int, sms: int, tma: bool, gluon: bool,
               current: GemmPlan | None = None, limit: int = 8, others: list | None = None) -> list[GemmPlan]:
    """The plans worth timing for one point, at most `limit`: the current one, the plans the
    other GPUs' tables give it (`others`: tuned later, they may name kernels this table predates),
    the fallback, then the M class's kernels (register kernels with split-K for decode-sized M; the
    Gluon and TMA kernels with W4 unpacked inside or ahead above)."""
    pool = [current, *(others or []), fallback_plan(m, n, k, mode, sms, tma, gluon)]
    if m <= DECODE_M:
        pool += decode_shapes(m, n, k, mode, sms)
    elif m <= 64:
        pool += [_register(m, n, k, mode, sms, w, f * sms) for w in (4, 2) for f in (1, 2, 4)]
    else:
        pool.append(_register(m, n, k, mode, sms, 4, 0))
    if tma and m > DECODE_M:
        pool += _hopper(m, n, k, mode, sms)
    out = []
    for plan in pool:
        if plan is None:
            continue
        if plan.kernel in ("tma", "ws"):
            w4_ahead = mode != MODE_W8 and plan.unpack == "ahead"
            plan = GemmPlan.from_json(dict(plan.to_json(), unpack="ahead" if w4_ahead else "in_loop",
                                           fuse_silu_mul=w4_ahead))
        if plan.w_in_registers and (mode == MODE_W8 or plan.block_n // 2 not in (64, 128)):
            continue
        if runnable(plan, tma, gluon, m) and plan not in out:
            out.append(plan)
    return out[:limit]


# M up to which the register kernels' tiles and splits are searched wider, then refined
DECODE_M = 16


def decode_shapes(m: int, n: int, k: int, mode: int, sms: int) -> list[GemmPlan]:
    """Decode-sized M (weight-bandwidth bound): the register kernels' tile widths and warp counts
    (and the CUDA-core gemv kernel's up to GEMV_MAX_M tokens), each with every power-of-two split-K
    from one wave's worth of programs up to eight."""
    w4 = mode != MODE_W8
    chunks = k // 128
    out = []
    shapes = [("reg_a", 4, 64), ("mma_sync", 2, 64), ("reg_a", 4, 128), ("mma_sync", 2, 32), ("mma_sync", 1, 32)]
    if m <= GEMV_MAX_M:  # the CUDA-core kernel: one token per program
        shapes += [("gemv", 4, 32), ("gemv", 4, 64), ("gemv", 2, 16), ("gemv", 8, 128)]
    for kernel, warps, bn in shapes:
        bm = 1 if kernel == "gemv" else 8 if w4 and m <= 8 else 16
        tiles = -(-m // bm) * -(-n // bn)
        for split in (1, 2, 4, 8, 16):
            if split > 1 and (chunks // split < 2 or tiles * split > 8 * sms):
                break  # pieces under two chunks, or more than eight programs per SM
            if 2 * tiles * split < sms and split < 16 and chunks // (2 * split) >= 2:
                continue  # under half a wave while a larger split is possible
            want = (4 if w4 else 2) if kernel == "gemv" else 4 if mode == MODE_W4_G128 else 1
            unroll = fit_unroll(chunks, split, want)
            out.append(GemmPlan(kernel, bm, bn, num_warps=warps, num_stages=3 if unroll > 1 else 4,
                                split_k=split, unroll=unroll))
    return out


def refinements(plan: GemmPlan, k: int, tma: bool) -> list[GemmPlan]:
    """A register plan's neighbours in its pipeline knobs: stages, chunks per iteration, the L2
    prefetch and the early prefetch before the dependent launch's wait (`pdl_chunks`, timed behind
    the row kernel as in the decode chain, tune_point: timed behind a copy of the same GEMM, the
    H200's first tuning run saw only its cost and chose 1 at most points)."""
    if plan.kernel not in SPLIT_K_KERNELS:
        return []
    chunks = k // 128
    out = [dataclasses.replace(plan, num_stages=s) for s in (2, 3, 4, 5) if s != plan.num_stages]
    out += [dataclasses.replace(plan, unroll=u) for u in (1, 2, 4)
            if u != plan.unroll and fit_unroll(chunks, plan.split_k, u) == u]
    if tma:  # Hopper PTX
        if plan.kernel != "gemv":
            out += [dataclasses.replace(plan, prefetch=p) for p in (4, 8) if p != plan.prefetch]
        out += [dataclasses.replace(plan, pdl_chunks=c) for c in (1, 8, 16) if c != plan.pdl_chunks]
    return out


ACT_VARIANTS = 3  # the fastest quantizing plans of a point timed again with quantize_input


def prologue_variants(timed: list[dict], m: int, tried: list[GemmPlan]) -> list[GemmPlan]:
    """The ACT_VARIANTS fastest timed plans of a decode point whose kernel can quantize its own
    input (up to ACT_PROLOGUE_MAX_M tokens), with quantize_input set: where one wins, the table
    says so and the engine skips the row kernel before that GEMM."""
    out = []
    for rec in sorted(timed, key=lambda r: r["ms"]):
        plan = GemmPlan.from_json(rec["plan"])
        if m > ACT_PROLOGUE_MAX_M or not quantizing_kernel(plan) or quantizes_input(plan, m):
            continue  # (QOQ_ACT_PROLOGUE=1: every quantizing plan was timed so already)
        variant = dataclasses.replace(plan, quantize_input=True)
        if variant not in tried and variant not in out:
            out.append(variant)
        if len(out) == ACT_VARIANTS:
            break
    return out


def gpu_timer(calls) -> float:
    """Milliseconds per call: bench_kernels.time_calls with a shorter warm-up and measurement."""
    import bench_kernels

    bench_kernels.WARMUP_MS, bench_kernels.MEASURE_MS = 5.0, 20.0
    return bench_kernels.time_calls(calls, reps=10)


def cpu_timer(calls) -> float:
    start = time.perf_counter()
    for c in calls:
        c()
    return (time.perf_counter() - start) * 1e3 / len(calls)


def weight_copies(mode: int, n: int, k: int, device, gen) -> list:
    """Enough weight copies that the rotated set exceeds L2 four times over (one on the CPU)."""
    builder = KERNELS[mode][2]
    if device == "cpu":
        return [builder(n, k, device, gen)]
    import bench_kernels

    nbytes = n * k if mode == MODE_W8 else n * k // 2
    return [builder(n, k, device, gen) for _ in range(bench_kernels.copies_for(nbytes))]


# What feeds each linear at decode (llama.py): the norm of x + residual before qkv and gate/up,
# the attention output before o_proj; down_proj's rows come quantized from SiLU*mul's row kernel.
SHAPE_ACT = {"qkv": ACT_ADD_RMSNORM, "o_proj": ACT_PLAIN, "gate_up": ACT_ADD_RMSNORM, "down_proj": None}


def tune_point(mode, m, n, k, plans, weights, device, gen, timer, deadline, act_kind=ACT_PLAIN) -> list[dict]:
    """One record per plan tried: its time, or why it was rejected; stops at the deadline.

    Decode-sized M is timed as the decode step runs it: each call quantizes fp16 rows (the row
    kernel of `act_kind`: quantize_per_token, or add_rmsnorm_quant of rows, a residual and a norm
    weight) and then runs the GEMM, so the GEMM starts, as a dependent launch, behind a short
    kernel rather than behind a copy of itself (its early weight prefetch overlaps the row kernel,
    as in the engine); the row kernel's time is the same for every plan. Where the engine would
    have the plan's kernel quantize its own input (its quantize_input, or QOQ_ACT_PROLOGUE=1;
    gemm_plan.quantizes_input), the call is that kernel alone, from the same rows, checked
    against the row kernel's codes through the GEMM twin first."""
    fn, ref, _, with_sum = KERNELS[mode]
    x8, sx, xsum = random_activations(m, k, device, gen)
    act = (x8, sx, xsum) if with_sum else (x8, sx)
    sets = [act + w for w in weights]
    xf = torch.randn(m, k, generator=gen, device=gen.device).to(device, torch.float16)
    kind = act_kind or ACT_PLAIN
    rows = ActInput(xf, kind)
    if kind == ACT_ADD_RMSNORM:
        rows = ActInput(xf, kind, torch.randn(m, k, generator=gen, device=gen.device).to(device, torch.float16),
                        (torch.rand(k, generator=gen, device=gen.device) + 0.5).to(device, torch.float16), 1e-5,
                        torch.empty_like(xf))

    def row_kernel():
        if kind == ACT_ADD_RMSNORM:
            return add_rmsnorm_quant(rows.x, rows.residual, rows.weight, rows.eps)[:3]
        return quantize_per_token(xf)

    def chained(w, plan):
        if quantizes_input(plan, m):  # (w, s1, s2, sz) in int_gemm's order
            packed, s1, *rest = w
            s2, sz = rest if mode == MODE_W4_G128 else (None, rest[0] if rest else None)
            return int8_gemm_act_triton(rows, packed, s1, s2, sz, mode, plan)
        x8, sx, xsum = row_kernel()
        return fn(*((x8, sx, xsum) if with_sum else (x8, sx)), *w, config=plan)

    def twin(w):  # what `chained` computes: the row kernel's codes into the GEMM's torch twin
        x8, sx, xsum = row_kernel()
        return ref(*((x8, sx, xsum) if with_sum else (x8, sx)), *w)

    records = []
    for plan in plans:
        if time.time() > deadline:
            break
        rec = {"plan": plan.to_json()}
        try:
            err = rel_err(fn(*sets[0], config=plan), ref(*sets[0]))  # checked before it is timed
            if m <= DECODE_M and quantizes_input(plan, m):  # and the prologue's rows
                err = max(err, rel_err(chained(weights[0], plan), twin(weights[0])))
            if not err < TOLERANCE:
                raise AssertionError(f"rel err {err:.3g} against the torch twin")
            if m <= DECODE_M:
                rec["ms"] = timer([lambda w=w: chained(w, plan) for w in weights])
            else:
                rec["ms"] = timer([lambda a=a: fn(*a, config=plan) for a in sets])
        except Exception as e:  # a plan this GPU cannot build or run: noted, not chosen
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        records.append(rec)
    return records


def tune(table: dict, modes, shapes, ms, device: str, caps, timer, budget_s: float, out: str | None,
         limit: int = 8, log=print, jobs: int = 1, decode_limit: int = 40,
         siblings: list | None = None) -> tuple[dict, list]:
    """Tune `table` (a copy is returned) over modes x shapes x ms; rewrites `out` after each shape.
    `siblings`: other GPUs' tables, whose plans for each point are candidates too.

    M up to DECODE_M takes up to `decode_limit` candidates, then the best one's refinements.
    jobs > 1 (GPU): the candidates are compiled in that many worker processes first (Triton's
    disk cache), so that the timing process loads them instead of compiling one by one."""
    sms, tma, gluon = caps
    table = copy.deepcopy(table)
    ms = sorted(set(ms))  # each M's range starts at the one before it
    deadline = time.time() + budget_s
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    pool = CompilePool(jobs) if jobs > 1 and device == "cuda" else None
    try:
        for mode in modes:
            for name, n, k in shapes:
                if time.time() > deadline:
                    return table, results
                act_kind = SHAPE_ACT.get(name, ACT_PLAIN)  # None: the engine never hands it fp16 rows
                weights = weight_copies(mode, n, k, device, gen)
                entries = table.setdefault("gemm", {}).setdefault(MODE_NAMES[mode], {}).get(f"{n}x{k}", [])
                known = bool(entries)
                prev = 0
                for i, m in enumerate(ms):
                    current = table_plan(table, mode, m, n, k)
                    others = [table_plan(t, mode, m, n, k) for t in siblings or ()]
                    decode = m <= DECODE_M
                    plans = candidates(mode, m, n, k, sms, tma, gluon, current,
                                       max(limit, decode_limit) if decode else limit, others)
                    if pool:
                        pool.compile(mode, m, n, k, plans)
                    records = tune_point(mode, m, n, k, plans, weights, device, gen, timer, deadline, act_kind)
                    complete = len(records) == len(plans)
                    timed = [r for r in records if "ms" in r]
                    if decode and timed and complete:  # the best one's pipeline knobs
                        best = GemmPlan.from_json(min(timed, key=lambda r: r["ms"])["plan"])
                        more = [p for p in refinements(best, k, tma) if p not in plans and runnable(p, tma, gluon)]
                        if pool:
                            pool.compile(mode, m, n, k, more)
                        extra = tune_point(mode, m, n, k, more, weights, device, gen, timer, deadline, act_kind)
                        complete = len(extra) == len(more)
                        records += extra
                        timed = [r for r in records if "ms" in r]
                        # the fastest quantizing plans again, quantizing their own input: the kernel
                        # alone against the row kernel and the GEMM it stands for
                        acts = prologue_variants(timed, m, plans + more) if act_kind else []
                        if complete and acts:
                            extra = tune_point(mode, m, n, k, acts, weights, device, gen, timer, deadline, act_kind)
                            complete = len(extra) == len(acts)
                            records += extra
                            timed = [r for r in records if "ms" in r]
                    point = {"mode": MODE_NAMES[mode], "shape": name, "M": m, "N": n, "K": k, "records": records}
                    if timed and complete:  # every candidate tried: the range takes the best
                        best = min(timed, key=lambda r: r["ms"])
                        # the last M takes everything above it when it is the protocol's last or the
                        # shape is new; a run over a few small M keeps the table's plans above them
                        hi = None if i == len(ms) - 1 and (m >= DEFAULT_MS[-1] or not known) else m
                        # from the protocol's M below it (or the run's, where that is higher): a
                        # run over some M leaves the table's plans between and below them alone
                        lo = max([x for x in DEFAULT_MS if x < m] + [prev])
                        entries = set_range(entries, lo, hi, best["plan"])
                        point["best"] = best
                        log(f"{MODE_NAMES[mode]} {name} M={m}: {best['ms'] * 1e3:.1f} us {best['plan']} "
                            f"({len(timed)} timed)")
                    results.append(point)
                    prev = m
                if entries:
                    table["gemm"][MODE_NAMES[mode]][f"{n}x{k}"] = entries
                if out:
                    configs.dump_table(table, out)
                del weights
    finally:
        if pool:
            pool.close()
    return table, results


# (batch, context) points of decode attention: batch 64 of BENCHMARKS.md's serving batches for
# the table's plan, batches whose (sequence, kv head) pairs are fewer than the SMs for its latency
# plan (batch 1 is the single-stream decode of issue 22), and batches of at least WIDE_PER_SM
# pairs per SM for its wide plan (decode_attention.decode_plan says which plan a launch takes)
ATTENTION_POINTS = ((64, 1024), (64, 4096), (128, 1024))
LATENCY_POINTS = ((1, 1024), (1, 4096), (8, 1024))
WIDE_POINTS = ((256, 1024), (256, 4096), (1024, 1024))
ATTENTION_KNOBS = {
    "transposed": (False, True), "num_warps": (1, 2, 4, 8), "chains": (1, 2, 4, 8), "num_stages": (2, 3, 4),
    "block_t": (0, 32, 128),
    "programs_per_sm": (4, 8, 12, 16), "max_waves": (1, 2, 3, 4), "min_split_blocks": (1, 2, 4, 8),
    "deep_stages": (0, 3, 4), "biased": (False, True), "biased_v": (False, True), "skew": (False, True),
    "maxnreg": (0, 128, 168, 200),
}
ATTENTION_TOLERANCE = 5e-3
KEEP = 0.98  # a knob change is kept where it makes the plan this much faster (geometric mean)


def attention_heads(config_path: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a model config."""
    with open(config_path) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    return heads, c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads


def attention_cases(batch: int, ctx: int, bits: int, heads: tuple, page: int, device: str, gen) -> list:
    """(q, cache, block tables, lengths) copies whose caches together exceed L2 (one on the CPU)."""
    import bench_attention
    import bench_kernels

    hq, hkv, d = heads
    pages = -(-ctx // page)
    per_copy = 2 * batch * ctx * hkv * d * bits // 8
    copies = 1 if device == "cpu" else bench_kernels.copies_for(per_copy)
    out = []
    for _ in range(copies):
        cache = bench_attention.random_cache(batch * pages, bits, gen, hkv, d, page, device)
        bt = torch.randperm(batch * pages, device=device, generator=gen).reshape(batch, pages).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, hq, d, device=device, dtype=torch.float16, generator=gen)
        out.append((q, cache, bt, lens))
    return out


def time_attention(plan: DecodePlan, cases: dict, timer) -> list[float]:
    """Milliseconds of `plan` at each point, each checked against the torch twin first (raises)."""
    times = []
    for (batch, ctx), sets in cases.items():
        q, cache, bt, lens = sets[0]
        n = min(batch, 8)
        scale = q.shape[-1] ** -0.5
        got = paged_decode_attention_triton(q, cache, bt, lens, scale, plan=plan)[:n].float()
        want = paged_decode_attention_ref(q[:n], cache, bt[:n], lens[:n], scale).float()
        err = float((got - want).norm() / want.norm())
        if not err < ATTENTION_TOLERANCE:
            raise AssertionError(f"rel err {err:.3g} against the torch twin at batch {batch}, context {ctx}")
        times.append(timer([lambda s=s: paged_decode_attention_triton(*s, scale, plan=plan) for s in sets]))
    return times


def _geomean_ratio(times: list[float], base: list[float]) -> float:
    prod = 1.0
    for t, b in zip(times, base):
        prod *= t / b
    return prod ** (1 / len(times))


def _knob_applies(field: str, plan: DecodePlan, bits: int, min_programs: int = 1, device: str = "cpu") -> bool:
    """Whether coordinate descent tries `field` from `plan` at `bits`, where the tuned points'
    smallest launch has `min_programs` (sequence, kv head) pairs: chains only where they would
    run at some point (`decode_chains` keeps more than one), and never beside what they exclude."""
    if bits == 16 and field in ("transposed", "biased", "biased_v", "deep_stages", "chains"):
        return False  # fp16 runs the row kernel without codes
    if field == "skew":
        return plan.transposed and plan.chains == 1  # the one-warp transposed kernel's knob
    if field == "transposed":
        return plan.chains == 1
    if field == "chains":
        wave = plan.programs_per_sm * num_sms(torch.device(device))
        return plan.transposed and not plan.skew and 2 * min_programs <= wave
    return True


def tune_attention(table: dict, bits_list, heads: tuple, points, device: str, timer, budget_s: float,
                   out: str | None, log=print, knobs: dict | None = None, page: int = 64,
                   key: str = "decode_attention", pool: CompilePool | None = None) -> tuple[dict, list]:
    """Tune the decode attention plan of each KV bit width (coordinate descent, see the module
    docstring) into table[key] (LATENCY_KEY / WIDE_KEY: the plan of small / wide launches, starting
    from the table's plan); the table (a copy is returned) is rewritten after each bit width.
    pool (GPU): the candidates one knob away from the best plan so far are compiled in its worker
    processes first, each sweep and after each improvement (their errors come again from the timing)."""
    table = copy.deepcopy(table)
    deadline = time.time() + budget_s
    gen = torch.Generator(device=device).manual_seed(0)
    knobs = ATTENTION_KNOBS if knobs is None else knobs
    results = []
    for bits in bits_list:
        if time.time() > deadline:
            break
        entry = table.get(key, {}).get(str(bits)) or table.get("decode_attention", {}).get(str(bits))
        best = DecodePlan(**entry) if entry is not None else DEFAULT_PLANS[bits]
        cases = {(b, c): attention_cases(b, c, bits, heads, page, device, gen) for b, c in points}
        min_programs = min(b for b, _ in points) * heads[1]
        best_ms = time_attention(best, cases, timer)
        records = [{"plan": best.to_json(), "ms": best_ms}]
        tried = {best}
        compiling = {}

        def neighbours(plan):
            for field, values in knobs.items():
                if _knob_applies(field, plan, bits, min_programs, device):
                    yield from (dataclasses.replace(plan, **{field: value}) for value in values)

        def precompile(plan):  # ahead of the timing, not beside it: the workers' launches would skew it
            if pool is not None and time.time() < deadline:
                for cand in neighbours(plan):
                    if cand not in tried and cand not in compiling:
                        compiling[cand] = pool.submit(_compile_attention, bits, heads, page, list(points),
                                                      cand.to_json())
                concurrent.futures.wait(list(compiling.values()))

        for _ in range(2):
            improved = False
            precompile(best)
            for field, values in knobs.items():
                if not _knob_applies(field, best, bits, min_programs, device):
                    continue
                for value in values:
                    cand = dataclasses.replace(best, **{field: value})
                    if cand in tried or time.time() > deadline:
                        continue
                    tried.add(cand)
                    rec = {"plan": cand.to_json()}
                    try:
                        rec["ms"] = time_attention(cand, cases, timer)
                    except Exception as e:  # a plan this GPU cannot build or run: noted, not chosen
                        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    records.append(rec)
                    if "ms" in rec and _geomean_ratio(rec["ms"], best_ms) < KEEP:
                        best, best_ms, improved = cand, rec["ms"], True
                        precompile(best)
            if not improved:
                break
        table.setdefault(key, {})[str(bits)] = best.to_json()
        results.append({"bits": bits, "key": key, "points": [list(p) for p in points],
                        "best": {"plan": best.to_json(), "ms": best_ms}, "records": records})
        log(f"{key} kv{bits}: {best.to_json()} " + " ".join(f"b{b}/ctx{c} {t * 1e3:.1f} us"
                                                        for (b, c), t in zip(points, best_ms)))
        if out:
            configs.dump_table(table, out)
    return table, results


def _compile_one(mode: int, m: int, n: int, k: int, plan_json: dict) -> str:
    """In a worker: run one plan once on small random data of the point's sizes (Triton compiles
    it into its disk cache); '' or the error."""
    try:
        fn, _, builder, with_sum = KERNELS[mode]
        gen = torch.Generator(device="cuda").manual_seed(0)
        x8, sx, xsum = random_activations(m, k, "cuda", gen)
        act = (x8, sx, xsum) if with_sum else (x8, sx)
        fn(*act, *builder(n, k, "cuda", gen), config=GemmPlan.from_json(plan_json))
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # the timing process records it again
        return f"{type(e).__name__}: {e}"


def _compile_attention(bits: int, heads: tuple, page: int, points: list, plan_json: dict) -> str:
    """In a worker: run one decode attention plan once at each (batch, context) point on a one-page
    cache (every block-table entry page 0): the same specialization as the timed calls, so Triton
    compiles it into its disk cache for them; '' or the error."""
    try:
        hq, hkv, d = heads
        cache = allocate_kv_cache(1, 1, hkv, d, page_size=page, bits=bits, device="cuda")[0]
        plan = DecodePlan(**plan_json)
        for batch, ctx in points:
            q = torch.zeros(batch, hq, d, dtype=torch.float16, device="cuda")
            bt = torch.zeros(batch, -(-ctx // page), dtype=torch.int32, device="cuda")
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, plan=plan)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # the timing process records it again
        return f"{type(e).__name__}: {e}"


class CompilePool:
    """Worker processes (spawned: CUDA does not survive fork) that compile candidate plans."""

    def __init__(self, jobs: int) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def compile(self, mode: int, m: int, n: int, k: int, plans: list) -> None:
        futures = [self.executor.submit(_compile_one, mode, m, n, k, p.to_json()) for p in plans]
        concurrent.futures.wait(futures)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        return self.executor.submit(fn, *args)

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


def sibling_tables(start: str, config_dir: str | None = None) -> list[dict]:
    """The tree's GPU tables other than `start` (the tuner's candidates: plans tuned on another GPU)."""
    config_dir = config_dir or configs.CONFIG_DIR
    out = []
    for name in sorted(os.listdir(config_dir)):
        path = os.path.join(config_dir, name)
        if name.endswith(".json") and not os.path.samefile(path, start):
            with open(path) as f:
                out.append(json.load(f))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "qoq", "configs", "llama-3-8b.json"),
                    help="the model's config JSON, or a folder with config.json (a HF model, a qoq checkpoint)")
    ap.add_argument("--modes", default="w4a8_g128", help="comma-separated: w4a8_g128, w4a8_per_channel, w8a8")
    ap.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)))
    ap.add_argument("--budget-s", type=float, default=420.0, help="no candidate starts after this many seconds")
    ap.add_argument("--max-candidates", type=int, default=8)
    ap.add_argument("--decode-candidates", type=int, default=40, help="candidates at M <= 16, before refinement")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="processes compiling candidates")
    ap.add_argument("--table", help="the table to start from (default: this GPU's, else the H100's)")
    ap.add_argument("--out", help="the table to write (default: this GPU's in qoq/kernels/configs)")
    ap.add_argument("--no-siblings", action="store_true",
                    help="leave out the plans of the other GPUs' tables in qoq/kernels/configs")
    ap.add_argument("--results", help="also write every timing here (JSON)")
    ap.add_argument("--attention-bits", default="4,8", help="KV bit widths whose decode attention plan is tuned ('' none)")
    ap.add_argument("--attention-budget-s", type=float, default=150.0,
                    help="seconds for the table's plans, then a third of it for their latency plans and a "
                         "half for their wide plans")
    args = ap.parse_args(argv)

    from qoq.kernels.gemm_plan import device_caps

    key = configs.device_key(0)
    start = args.table or (configs.table_path(key) if os.path.exists(configs.table_path(key))
                           else configs.table_path("nvidia-h100-80gb-hbm3"))
    with open(start) as f:
        table = json.load(f)
    caps = device_caps(0)
    table.update(device=torch.cuda.get_device_name(0), sms=caps[0],
                 source=f"benchmarks/tune_kernels.py --model {os.path.basename(args.model)} from {os.path.basename(start)}")
    siblings = [] if args.no_siblings else sibling_tables(start)
    modes = [MODES[m] for m in args.modes.split(",") if m]
    ms = [int(m) for m in args.ms.split(",")]
    began = time.time()
    table, results = tune(table, modes, linear_shapes(args.model), ms, "cuda", caps, gpu_timer, args.budget_s,
                          args.out or configs.table_path(key), args.max_candidates,
                          log=lambda s: print(f"[{time.time() - began:6.0f}s] {s}", flush=True), jobs=args.jobs,
                          decode_limit=args.decode_candidates, siblings=siblings)
    done = sum("best" in p for p in results)
    print(f"tuned {done} of {len(modes) * 4 * len(ms)} points in {time.time() - began:.0f} s", flush=True)
    bits = [int(b) for b in args.attention_bits.split(",") if b]
    attention = []
    if bits:
        pool = CompilePool(args.jobs) if args.jobs > 1 else None
        try:
            for points, budget, plans in ((ATTENTION_POINTS, args.attention_budget_s, "decode_attention"),
                                          (LATENCY_POINTS, args.attention_budget_s / 3, LATENCY_KEY),
                                          (WIDE_POINTS, args.attention_budget_s / 2, WIDE_KEY)):
                table, tuned = tune_attention(
                    table, bits, attention_heads(args.model), points, "cuda", gpu_timer, budget,
                    args.out or configs.table_path(key), key=plans, pool=pool,
                    log=lambda s: print(f"[{time.time() - began:6.0f}s] {s}", flush=True))
                attention += tuned
        finally:
            if pool is not None:
                pool.close()
    if args.results:
        with open(args.results, "w") as f:
            json.dump({"device": table["device"], "model": args.model, "points": results, "attention": attention},
                      f, indent=1)


if __name__ == "__main__":
    main()
