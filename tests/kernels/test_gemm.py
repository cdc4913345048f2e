import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda
from helpers import (
    g128_case,
    g128_weights,
    per_channel_case,
    per_channel_weights,
    quantize_g128,
    quantize_per_channel,
    random_activations,
    random_weight,
    rel_err,
    sass_report,
    w8_weights,
)

from qoq.kernels.gemm_plan import MODE_W4_G128, MODE_W4_PER_CHANNEL, MODE_W8, GemmPlan
from qoq.kernels.int_gemm import int8_gemm_act_triton, split_tail
from qoq.kernels.quant import ACT_ADD_RMSNORM, ACT_PLAIN, ACT_RMSNORM, ActInput, act_quantize
from qoq.kernels.w4a8_gemm import (
    pack_w4,
    unpack_w4,
    w4a8_g128_gemm_ref,
    w4a8_g128_gemm_triton,
    w4a8_per_channel_gemm_ref,
    w4a8_per_channel_gemm_triton,
)
from qoq.kernels.w8a8_gemm import w8a8_gemm_ref, w8a8_gemm_triton

# Integer accumulation is exact in both twins; only the fp16 epilogue rounding may differ.
EXACT = 2e-3
SPLIT = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_K=2)
NOSWAP = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_K=1, SWAP=False)
# The shared-memory-operand TMA kernel (Hopper's large-M path); tiles larger than M and N check
# that out-of-bounds TMA rows read as zeros and the masked stores.
TMA = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, TMA=True, GROUP_M=2)
UNPACK = dict(TMA, UNPACK=True)  # W4 unpacked to int8 by its own kernel, then the int8 TMA GEMM


def test_pack_roundtrip_and_layout(gen):
    q4 = torch.randint(0, 16, (8, 256), dtype=torch.uint8, generator=gen)
    packed = pack_w4(q4)
    assert packed.shape == (8, 128) and torch.equal(unpack_w4(packed), q4)
    # byte j of a 128-channel chunk: channel j low nibble, channel 64 + j high nibble
    assert torch.equal(packed[:, 64 + 2] & 0xF, q4[:, 128 + 2])
    assert torch.equal(packed[:, 64 + 2] >> 4, q4[:, 128 + 64 + 2])


@pytest.mark.parametrize("m", [1, 5, 16, 37])
@pytest.mark.parametrize("config", [None, SPLIT, NOSWAP, TMA, UNPACK])
def test_w4a8_g128_triton_matches_ref(m, config, device, gen, poison):
    case = g128_case(m, 64, 256, device, gen)
    out = w4a8_g128_gemm_triton(*case, config=config)
    assert out.dtype == torch.float16 and out.shape == (m, 64)
    assert rel_err(out, w4a8_g128_gemm_ref(*case)) < EXACT


@pytest.mark.parametrize("m", [3, 16, 37])
@pytest.mark.parametrize("config", [None, SPLIT, NOSWAP, TMA, UNPACK])
def test_w4a8_per_channel_triton_matches_ref(m, config, device, gen, poison):
    case = per_channel_case(m, 64, 256, device, gen)
    out = w4a8_per_channel_gemm_triton(*case, config=config)
    assert rel_err(out, w4a8_per_channel_gemm_ref(*case)) < EXACT


@pytest.mark.parametrize("config", [None, SPLIT, NOSWAP, TMA])
def test_w8a8_triton_matches_ref(config, device, gen, poison):
    x8, sx, _ = random_activations(7, 256, device, gen)
    w = torch.randint(-127, 128, (48, 256), dtype=torch.int8, generator=gen).to(device)
    s = (torch.rand(48, generator=gen) * 0.01 + 1e-4).half().to(device)
    assert rel_err(w8a8_gemm_triton(x8, sx, w, s, config=config), w8a8_gemm_ref(x8, sx, w, s)) < EXACT


@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("m", [3, 37])
@pytest.mark.parametrize("config", [None, SPLIT, TMA, UNPACK])
def test_silu_mul_matches_ref(kind, m, config, device, gen, poison):
    """The MLP's gate/up GEMM with silu(gate) * up: fused into the epilogue on the unpack-first
    TMA path (the unpack interleaves gate and up rows, the epilogue splits them), the GEMM then a
    SiLU*mul pass elsewhere. 80 weight rows -> 40 outputs, not a multiple of the tiles."""
    if kind == "g128":
        case, triton_fn, ref_fn = g128_case(m, 80, 256, device, gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    elif kind == "per_channel":
        case = per_channel_case(m, 80, 256, device, gen)
        triton_fn, ref_fn = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    else:
        x8, sx, _ = random_activations(m, 256, device, gen)
        w = torch.randint(-127, 128, (80, 256), dtype=torch.int8, generator=gen).to(device)
        s = (torch.rand(80, generator=gen) * 0.01 + 1e-4).half().to(device)
        case, triton_fn, ref_fn = (x8, sx, w, s), w8a8_gemm_triton, w8a8_gemm_ref
    ref = ref_fn(*case, silu_mul=True)
    assert ref.shape == (m, 40) and ref.dtype == torch.float16
    gate, up = ref_fn(*case).double().chunk(2, dim=1)  # independent: the plain GEMM's two halves
    assert rel_err(ref, torch.nn.functional.silu(gate) * up) < 5e-3
    assert rel_err(triton_fn(*case, silu_mul=True, config=config), ref) < EXACT
    lead = 3 if kind == "per_channel" else 2  # the activation arguments before the weight's
    odd = case[:lead] + tuple(a[:-1] for a in case[lead:])  # 79 weight rows: no [gate | up] halves
    with pytest.raises(ValueError, match="even count"):
        triton_fn(*odd, silu_mul=True)


def test_refs_match_float64_dequantized_matmul(gen):
    """Independent check: dequantize everything in float64 and multiply."""
    m, n, k = 4, 32, 256
    x8, sx, xsum = random_activations(m, k, gen=gen)
    x = x8.double() * sx.double()[:, None]
    w = random_weight(n, k, gen)

    q4, s1, s2, sz = quantize_g128(w)
    w_deq = (q4.double() * s2.double().repeat_interleave(128, 1)
             - sz.double().repeat_interleave(128, 1)) * s1.double()[:, None]
    out = w4a8_g128_gemm_ref(x8, sx, pack_w4(q4), s1, s2, sz)
    assert rel_err(out, x @ w_deq.T) < 1e-3
    assert rel_err(out, x @ w.T) < 0.2  # the quantization itself stays close to the weights

    q4, s, szero = quantize_per_channel(w)
    w_deq = q4.double() * s.double()[:, None] - szero.double()[:, None]
    out = w4a8_per_channel_gemm_ref(x8, sx, xsum, pack_w4(q4), s, szero)
    assert rel_err(out, x @ w_deq.T) < 1e-3

    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s8 = (torch.rand(n, generator=gen) * 0.01 + 1e-4).half()
    ref = x @ (w8.double() * s8.double()[:, None]).T
    assert rel_err(w8a8_gemm_ref(x8, sx, w8, s8), ref) < 1e-3


def test_refs_reject_bad_inputs(gen):
    x8, sx, p, s1, s2, sz = g128_case(2, 16, 256, gen=gen)
    with pytest.raises(ValueError, match="group_size"):
        w4a8_g128_gemm_ref(x8, sx, p, s1, s2, sz, group_size=96)
    with pytest.raises(ValueError, match="multiple of 128"):
        w4a8_g128_gemm_ref(x8[:, :200], sx, p[:, :100], s1, s2, sz)
    with pytest.raises(ValueError, match="s2 and sz"):
        w4a8_g128_gemm_ref(x8, sx, p, s1, s2[:, :1], sz)
    with pytest.raises(ValueError, match="int8"):
        w4a8_g128_gemm_ref(x8.float(), sx, p, s1, s2, sz)
    with pytest.raises(ValueError, match="leaves int8"):
        w4a8_g128_gemm_ref(x8, sx, p, s1, torch.full_like(s2, 16), torch.zeros_like(sz))
    with pytest.raises(ValueError, match="group_size=128"):
        w4a8_g128_gemm_triton(x8, sx, p, s1, s2.repeat_interleave(2, 1), sz.repeat_interleave(2, 1),
                              group_size=64)
    x8, sx, xsum, p, s, szero = per_channel_case(2, 16, 256, gen=gen)
    with pytest.raises(ValueError, match="x_sum"):
        w4a8_per_channel_gemm_ref(x8, sx, None, p, s, szero)
    with pytest.raises(ValueError, match="K % 128"):
        pack_w4(torch.zeros(4, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N, 256"):
        w8a8_gemm_ref(x8, sx, torch.zeros(4, 128, dtype=torch.int8), s[:4])


@requires_cuda
@pytest.mark.parametrize("m", [1, 8, 16, 256, 513, 700, 1000, 1200, 2085, 4100])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336)])
def test_gemms_real_shapes_gpu(m, n, k, gen, poison):
    """Default tiles at every M bucket (on Hopper, M > 256 runs the TMA kernel), and silu_mul
    (fused on the unpack-first path: g128 from M > 640, per-channel from M >= 2048)."""
    case = g128_case(m, n, k, "cuda", gen)
    assert rel_err(w4a8_g128_gemm_triton(*case), w4a8_g128_gemm_ref(*case)) < EXACT
    assert rel_err(w4a8_g128_gemm_triton(*case, silu_mul=True), w4a8_g128_gemm_ref(*case, silu_mul=True)) < EXACT
    case = per_channel_case(m, n, k, "cuda", gen)
    assert rel_err(w4a8_per_channel_gemm_triton(*case), w4a8_per_channel_gemm_ref(*case)) < EXACT
    assert rel_err(w4a8_per_channel_gemm_triton(*case, silu_mul=True),
                   w4a8_per_channel_gemm_ref(*case, silu_mul=True)) < EXACT
    x8, sx = case[0], case[1]
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).to("cuda")
    s = (torch.rand(n, generator=gen) * 0.01 + 1e-4).half().to("cuda")
    assert rel_err(w8a8_gemm_triton(x8, sx, w, s), w8a8_gemm_ref(x8, sx, w, s)) < EXACT


@requires_cuda
@pytest.mark.parametrize("m", [1, 8, 16])
def test_gate_up_shape_small_m_gpu(m, gen, poison):
    """The gate/up shape at decode-sized M (its own defaults: 8-token tiles, two warps on
    mma.sync)."""
    n, k = 28672, 4096
    case = g128_case(m, n, k, "cuda", gen)
    assert rel_err(w4a8_g128_gemm_triton(*case), w4a8_g128_gemm_ref(*case)) < EXACT
    case = per_channel_case(m, n, k, "cuda", gen)
    assert rel_err(w4a8_per_channel_gemm_triton(*case), w4a8_per_channel_gemm_ref(*case)) < EXACT


@requires_cuda
@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("m", [1, 16])
def test_small_m_prefetch_gpu(kind, m, gen, poison):
    """The register-A kernel's L2 prefetch (Hopper; PREFETCH chunks ahead, up to past the end of
    each split's K range), and the early prefetch before the dependent launch's wait (PDL chunks,
    up to past the end of a split, on the mma.sync form too), leave the sums unchanged."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("a Hopper option")
    n, k = 4096, 4096
    if kind == "w8a8":
        x8, sx, _ = random_activations(m, k, "cuda", gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).to("cuda")
        s = (torch.rand(n, generator=gen) * 0.01 + 1e-4).half().to("cuda")
        case, fn, ref = (x8, sx, w, s), w8a8_gemm_triton, w8a8_gemm_ref
    elif kind == "g128":
        case, fn, ref = g128_case(m, n, k, "cuda", gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    else:
        case = per_channel_case(m, n, k, "cuda", gen)
        fn, ref = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    want = ref(*case)
    for split, prefetch, early, warps in ((2, 4, 4, 4), (8, 3, 1, 4), (8, 64, 16, 4), (4, 0, 16, 2), (16, 0, 8, 1)):
        cfg = dict(BLOCK_M=16, BLOCK_N=64 if warps > 1 else 32, num_warps=warps, num_stages=4, SPLIT_K=split,
                   PREFETCH=prefetch, PDL=early)
        assert rel_err(fn(*case, config=cfg), want) < EXACT


@pytest.mark.parametrize("kind", ["g128", "per_channel"])
def test_unrolled_chunks_match_ref(kind, device, gen, poison):
    """UNROLL chunks per loop iteration (the small-M probe's option) give the same sums; a count
    that does not divide each split's chunks is refused."""
    case = (g128_case if kind == "g128" else per_channel_case)(3, 64, 1024, device, gen)
    fn, ref = ((w4a8_g128_gemm_triton, w4a8_g128_gemm_ref) if kind == "g128"
               else (w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref))
    want = ref(*case)
    for split, unroll in ((1, 4), (2, 2)):  # K=1024: 8 chunks
        cfg = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_K=split, UNROLL=unroll)
        assert rel_err(fn(*case, config=cfg), want) < EXACT
    with pytest.raises(ValueError, match="UNROLL=3"):
        fn(*case, config=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_K=1, UNROLL=3))


@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("m", [1, 8, 13])
def test_eight_token_tiles_match_ref(kind, m, device, gen, poison):
    """8-token tiles (the narrowest MMA N; the default at M <= 8), also when M spills into a
    second token tile, whole and split-K, on a warpgroup (wgmma) and on two warps (mma.sync)."""
    k = 512
    if kind == "w8a8":
        x8, sx, _ = random_activations(m, k, device, gen)
        w = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=gen).to(device)
        s = (torch.rand(64, generator=gen) * 0.01 + 1e-4).half().to(device)
        case, fn, ref = (x8, sx, w, s), w8a8_gemm_triton, w8a8_gemm_ref
    elif kind == "g128":
        case, fn, ref = g128_case(m, 64, k, device, gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    else:
        case = per_channel_case(m, 64, k, device, gen)
        fn, ref = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    want = ref(*case)
    for split, warps in ((1, 4), (2, 4), (2, 2)):
        cfg = dict(BLOCK_M=8, BLOCK_N=64, num_warps=warps, num_stages=2, SPLIT_K=split)
        out = fn(*case, config=cfg)
        assert out.shape == want.shape and rel_err(out, want) < EXACT


@pytest.mark.parametrize("chunks", [13, 22])
def test_small_m_default_unroll_divides_the_splits(chunks, device, gen, poison):
    """g128's M <= 16 plans take four chunks per iteration; where they do not divide each
    split's chunks (86 chunks in 4 splits of 22) they take fewer."""
    from qoq.kernels import configs, int_gemm
    from qoq.kernels.gemm_plan import select_plan, table_plan

    k = 128 * chunks
    plan = select_plan(3, 64, k, int_gemm.MODE_W4_G128, torch.device("cpu"))
    per = -(-chunks // plan.split_k)
    assert per % plan.unroll == 0 and chunks % per % plan.unroll == 0
    case = g128_case(3, 64, k, device, gen)
    assert rel_err(w4a8_g128_gemm_triton(*case), w4a8_g128_gemm_ref(*case)) < EXACT
    h100 = configs.load_table("nvidia-h100-80gb-hbm3")
    assert table_plan(h100, int_gemm.MODE_W4_G128, 1, 4096, 11008).unroll == 2


@pytest.mark.parametrize("split", [2, 4])
def test_one_launch_split_k_resets_its_counters(split, device, gen, poison):
    """The last split to arrive reduces the tile and zeroes its counter: repeat calls stay exact."""
    from qoq.kernels import dispatch

    case = per_channel_case(3, 64, 512, device, gen)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_K=split)
    want = w4a8_per_channel_gemm_ref(*case)
    for _ in range(2):
        assert rel_err(w4a8_per_channel_gemm_triton(*case, config=cfg), want) < EXACT
    counters = dispatch._ARRIVAL_COUNTERS
    assert counters and all(int(b.abs().sum()) == 0 for b in counters.values())


def test_split_tail_rule():
    assert split_tail(320, 264, 112) == (264, 4)  # 56 tail tiles of the K=14336 GEMM at M=1200
    assert split_tail(2240, 264, 112) == (2112, 2)  # 128 tail tiles: 2 pieces fill the last wave
    assert split_tail(480, 264, 112) == (480, 1)  # a tail of 216: most of a wave, left whole
    assert split_tail(528, 264, 112) == (528, 1)  # whole waves
    assert split_tail(100, 264, 112) == (100, 1)  # below one wave: default_config's business
    assert split_tail(320, 264, 32) == (320, 1)  # K=4096: pieces too short to pay


@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("unpack,silu", [(False, False), (True, False), (True, True)])
def test_tma_split_tail_is_exact(kind, unpack, silu, device, gen, poison):
    """The TMA kernel with its last tiles cut into K pieces (SLOTS forces the resident-CTA count
    that the GPU path learns from the compiled kernel): 3 x 2 tiles on 4 slots run 4 whole tiles
    and 2 tiles in 2 pieces each. The int32 partials add up exactly, so the output equals the
    unsplit kernel's bit for bit; twice in a row (the arrival counters reset)."""
    from qoq.kernels import dispatch

    m, n, k = 37, 64 * (2 if silu else 1), 6144  # 48 chunks: 2 pieces of 24
    if kind == "g128":
        case, fn, ref = g128_case(m, n, k, device, gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    elif kind == "per_channel":
        case = per_channel_case(m, n, k, device, gen)
        fn, ref = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    else:
        x8, sx, _ = random_activations(m, k, device, gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).to(device)
        s = (torch.rand(n, generator=gen) * 0.01 + 1e-4).half().to(device)
        case, fn, ref = (x8, sx, w, s), w8a8_gemm_triton, w8a8_gemm_ref
    if silu and kind == "w8a8":
        pytest.skip("int8 weights take the GEMM-then-SiLU*mul path")
    cfg = dict(TMA, UNPACK=True) if unpack else dict(TMA)
    if unpack and kind == "w8a8":
        pytest.skip("int8 weights need no unpack")
    whole = fn(*case, silu_mul=silu, config=cfg)
    assert rel_err(whole, ref(*case, silu_mul=silu)) < EXACT
    for _ in range(2):
        assert torch.equal(fn(*case, silu_mul=silu, config=dict(cfg, SLOTS=4)), whole)
    counters = dispatch._ARRIVAL_COUNTERS
    assert counters and all(int(b.abs().sum()) == 0 for b in counters.values())


# The warp-specialized Gluon kernel (ws_gemm.py) behind the unpack-first TMA path on Hopper.
WS = dict(BLOCK_M=128, BLOCK_N=256, num_warps=4, num_stages=4, TMA=True, WS=True)


WS_BUILDS = [[mode, zero, gated, *tile, False, False]
             for mode, zero, gated in [(0, False, False), (0, True, False), (0, False, True), (0, True, True),
                                       (1, False, False), (2, True, False)]
             for tile in [(128, 256), (64, 256), (256, 128), (64, 128)]]
# stream-K builds (STREAM): the split tiles' partial sums meet through acq_rel arrival counters
WS_BUILDS += [[2, True, False, 128, 128, True, False], [1, False, False, 128, 256, True, False],
              [0, False, True, 128, 256, True, False]]
# packed W4 as wgmma's register operand (REG_A): no unpacked copy in shared memory, so no fence
WS_BUILDS += [[mode, mode == 2, False, *tile, stream, True] for mode in (1, 2)
              for tile, stream in [((64, 128), False), ((128, 128), False), ((256, 128), False), ((128, 256), False),
                                   ((128, 128), True)]]


def ws_compile_check(cases: list, *flags: str) -> list[dict]:
    """ws_compile_check.py's report of each case, compiled for sm_90 in a fresh process (it says
    why); skips where this Triton has no Gluon."""
    from qoq.kernels import ws_gemm

    if not ws_gemm.available():
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "ws_compile_check.py"),
                          json.dumps(cases), *flags], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.fixture(scope="module")
def ws_builds():
    """Every WS_BUILDS case compiled for sm_90."""
    return {tuple(r["case"]): r for r in ws_compile_check(WS_BUILDS)}


@pytest.mark.parametrize("case", WS_BUILDS, ids=lambda c: "mode{}-zero{}-gated{}-{}x{}-stream{}-rega{}".format(*c))
def test_ws_gemm_compiles_for_sm90(case, ws_builds):
    """Gluon kernels do not run in the CPU interpreter: build this one for an H100 instead, and
    check that it is what it claims (async wgmma on int8, TMA loads, register hand-off between its
    partitions; W4 modes store their unpacked chunk and fence it before the MMA reads it, unless
    the MMA takes it from registers, REG_A, which ptxas must then not serialize)."""
    built = ws_builds[tuple(case)]
    assert built["int8_wgmma"] and built["setmaxnreg"] and built["tma"]
    assert built["fence"] == (case[0] != 0 and not case[6])
    assert built["serialized"] is False
    assert built["atomics"] == case[5]
    assert built["shared"] <= 227 * 1024


def test_g128_register_kernels_loops_sm90():
    """The sm_90 loops of the register GEMMs (decode-sized tiles, mma_sync and wgmma, split-K, unroll
    4 and 1) and of the gemv kernel hold at most the instructions they were measured at, g128's s2 /
    sz reaching the unpack as per-row 32-bit words (ptx.py) and, in gemv, each row's byte taken out of
    the iteration's parameter words by one byte permute."""
    for cfg, most in ((["--block-m", "16", "--block-n", "32", "--unroll", "4", "--stages", "3", "--warps", "2"], 432),
                      (["--block-m", "8", "--block-n", "64", "--split", "4", "--unroll", "4", "--stages", "3",
                        "--warps", "2"], 712),
                      (["--block-m", "64", "--block-n", "64", "--split", "4"], 157)):
        loop = int(sass_report("gemm", "--mode", "1", *cfg)["loop_instructions"])
        assert loop <= most, (cfg, loop)
    cfg = ["--mode", "1", "--block-n", "16", "--warps", "2", "--unroll", "4", "--stages", "3"]
    loop = int(sass_report("gemv", *cfg)["loop_instructions"])
    assert loop <= 231, loop


def test_ws_register_operand_loop_sm90():
    """The same for the Gluon kernel's register-operand consumer loop at 64x128 (sm_90 SASS, four
    chunks an iteration): g128 and per-channel W4."""
    cases = [[1, False, False, 64, 128, False, True], [2, True, False, 64, 128, False, True]]
    loops = [r["mma_loop"] for r in ws_compile_check(cases, "--sass")]
    assert loops[0] <= 483 and loops[1] <= 258, loops


@requires_cuda
@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("m,n,k", [(77, 384, 1024), (1000, 6144, 4096), (4100, 4096, 14336), (8192, 28672, 4096)])
def test_ws_gemm_matches_tma_kernel_gpu(kind, silu, m, n, k, gen, poison):
    """The Gluon kernel gives the tl.dot TMA kernel's output bit for bit (the same exact int32 sums
    and fp32 epilogue), at tile, M and N tails and real shapes, and matches the reference."""
    from qoq.kernels import dispatch, ws_gemm

    if not ws_gemm.available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs Gluon and a Hopper GPU")
    if silu and kind == "w8a8":
        pytest.skip("int8 weights take the GEMM-then-SiLU*mul path")
    if kind == "g128":
        case, fn, ref = g128_case(m, n, k, "cuda", gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    elif kind == "per_channel":
        case = per_channel_case(m, n, k, "cuda", gen)
        fn, ref = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    else:
        x8, sx, _ = random_activations(m, k, "cuda", gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).to("cuda")
        s = (torch.rand(n, generator=gen) * 0.01 + 1e-4).half().to("cuda")
        case, fn, ref = (x8, sx, w, s), w8a8_gemm_triton, w8a8_gemm_ref
    unpack = {} if kind == "w8a8" else dict(UNPACK=True)
    tl_cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, TMA=True, **unpack)
    want = fn(*case, silu_mul=silu, config=tl_cfg)
    assert rel_err(want, ref(*case, silu_mul=silu)) < EXACT
    for tile in [(128, 256), (64, 256), (256, 128)]:
        for fuse in ([False, True] if unpack else [False]):  # W4 unpacked ahead, or in the kernel
            cfg = dict(WS, BLOCK_M=tile[0], BLOCK_N=tile[1], FUSE=fuse, **unpack)
            assert torch.equal(fn(*case, silu_mul=silu, config=cfg), want)
    # stream-K: the SMs' grid, and a grid of 7 programs (most tiles split, several segments each)
    for tile, grid in [((128, 128), None), ((128, 256), 7)]:
        for fuse in ([False, True] if unpack else [False]):
            cfg = dict(WS, BLOCK_M=tile[0], BLOCK_N=tile[1], FUSE=fuse, STREAM=True, GRID=grid, **unpack)
            assert torch.equal(fn(*case, silu_mul=silu, config=cfg), want)
    assert all(int(b.abs().sum()) == 0 for b in dispatch._ARRIVAL_COUNTERS.values())


@requires_cuda
@pytest.mark.parametrize("kind", ["g128", "per_channel"])
@pytest.mark.parametrize("m,n,k", [(77, 384, 1024), (256, 6144, 4096), (300, 4096, 14336), (129, 28672, 4096)])
def test_ws_gemm_reg_a_matches_tma_kernel_gpu(kind, m, n, k, gen, poison):
    """The packed weights as wgmma's register operand (REG_A, the transposed tile) give the tl.dot
    TMA kernel's output bit for bit: every tile shape, whole tiles and stream-K (also a grid of 7
    programs, which splits nearly every tile into odd and even chunk counts)."""
    from qoq.kernels import dispatch, ws_gemm

    if not ws_gemm.available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs Gluon and a Hopper GPU")
    if kind == "g128":
        case, fn, ref = g128_case(m, n, k, "cuda", gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    else:
        case = per_channel_case(m, n, k, "cuda", gen)
        fn, ref = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    want = fn(*case, config=dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, TMA=True, UNPACK=True))
    assert rel_err(want, ref(*case)) < EXACT
    for tile, stream, grid in [((64, 128), False, None), ((128, 128), False, None), ((256, 128), False, None),
                               ((128, 256), False, None), ((128, 128), True, None), ((64, 128), True, 7)]:
        cfg = dict(WS, BLOCK_M=tile[0], BLOCK_N=tile[1], FUSE=True, UNPACK=True, REG_A=True, STREAM=stream, GRID=grid)
        assert torch.equal(fn(*case, config=cfg), want), (tile, stream, grid)
    assert all(int(b.abs().sum()) == 0 for b in dispatch._ARRIVAL_COUNTERS.values())


@pytest.mark.parametrize("mode,gated,tile", [(0, False, (128, 128)), (2, True, (128, 128)), (2, False, (128, 512)),
                                             (1, False, (512, 128))])
def test_ws_gemm_reg_a_refuses_what_it_cannot_run(mode, gated, tile):
    """REG_A takes packed W4 only, without the gated epilogue, 64 or 128 weight rows per consumer
    and at most 256 tokens per tile: anything else is refused before a launch, with what was asked."""
    from qoq.kernels import ws_gemm

    if not ws_gemm.available():
        pytest.skip("this Triton has no Gluon")
    m, n, k = 64, 1024, 1024
    x8, sx = torch.zeros(m, k, dtype=torch.int8), torch.zeros(m)
    w = torch.zeros(n, k if mode == 0 else k // 2, dtype=torch.int8 if mode == 0 else torch.uint8)
    s1, y = torch.zeros(n, dtype=torch.float16), torch.zeros(m, n, dtype=torch.float16)
    s2 = torch.zeros(n, k // 128, dtype=torch.uint8) if mode == 1 else None
    with pytest.raises(ValueError, match="REG_A takes packed W4"):
        ws_gemm.launch_args(x8, w, sx, None, s1, s2, s2, y, mode,
                            GemmPlan("ws", tile[0], tile[1], num_stages=0, w_in_registers=True), zero=False, gated=gated)


def test_ws_dispatch_rules():
    """Where the Gluon kernel takes a GEMM in the policy the H100 probes tuned (the H100 table's
    base; test_gemm_plan.py checks the table is it but at the points re-tuned since): every
    prefill shape with 128x256 tiles and the unpack pass; at the serving batch the persistent rounds
    pick 128x128 for o_proj and 128x256 for qkv, the long-K down projection keeps the tl.dot split
    tail past one round; per-channel unpacks W4 inside the kernel at decode sizes (and then fuses no
    SiLU*mul), g128 does not."""
    import h100_policy

    from qoq.kernels import int_gemm

    g128, pc = int_gemm.MODE_W4_G128, int_gemm.MODE_W4_PER_CHANNEL

    def plan(m, n, k, mode):
        return h100_policy.old_plan(m, n, k, mode)

    def cfg(m, n, k, mode):
        p = plan(m, n, k, mode)
        return (p.block_m, p.block_n, p.unpack == "in_loop") if p.kernel == "ws" else None

    for mode in (g128, pc):
        assert all(cfg(8192, n, k, mode) == (128, 256, False) for n, k in [(6144, 4096), (4096, 14336)])
    assert all(cfg(8192, n, k, int_gemm.MODE_W8)[:2] == (128, 256) for n, k in [(6144, 4096), (4096, 14336)])
    assert cfg(1200, 6144, 4096, pc) == (128, 256, True)  # 240 tiles: 2 rounds either way
    assert cfg(1200, 4096, 4096, pc) == (128, 128, True)  # 3 rounds of 128x128 < 2 of 128x256
    assert cfg(1200, 4096, 4096, g128) == (128, 128, False)
    assert cfg(1200, 4096, 14336, g128) is None  # 160 tiles of 128x256: the split tail instead
    assert cfg(1024, 4096, 14336, pc) == (128, 256, True)  # one round
    assert cfg(1024, 28672, 4096, pc) is None  # one wave of the in-loop kernel's tiles
    assert cfg(256, 4096, 14336, pc) == (64, 128, True)  # mid-size M: W4 unpacked inside
    # few tiles for the SMs: stream-K (down projection; o_proj at 64 < M <= 128)
    for m, n, k, mode, tile in [(32, 4096, 14336, pc, (64, 128)), (64, 4096, 14336, g128, (64, 128)),
                                (128, 4096, 14336, pc, (128, 128)), (256, 4096, 14336, g128, (128, 128)),
                                (128, 4096, 4096, g128, (64, 128))]:
        assert cfg(m, n, k, mode) == (*tile, True)
        assert plan(m, n, k, mode).stream_k
    assert not plan(128, 6144, 4096, pc).stream_k
    assert cfg(48, 28672, 4096, pc) == (64, 128, True)  # gate/up at M <= 64: narrow Gluon tiles
    for mode in (g128, pc):  # gate/up at M = 256: the packed weights as the register operand
        assert plan(256, 28672, 4096, mode) == GemmPlan("ws", 256, 128, num_stages=0, w_in_registers=True)
        assert not plan(128, 28672, 4096, mode).w_in_registers
    assert plan(512, 6144, 4096, g128).w_in_registers
    assert not plan(512, 6144, 4096, pc).w_in_registers
    assert cfg(16, 4096, 14336, pc) is None and cfg(64, 4096, 4096, pc) is None
    assert cfg(1200, 4096, 4096, int_gemm.MODE_W8) is None
    assert plan(8192, 28672, 4096, pc).fuse_silu_mul  # the unpack pass interleaves gate/up
    assert plan(1200, 28672, 4096, g128).fuse_silu_mul
    assert not plan(1200, 28672, 4096, pc).fuse_silu_mul  # W4 unpacked in the kernel


def test_pdl_gemm_touches_no_memory_before_its_wait_sm90():
    """Launched as a programmatic dependent launch, the register GEMM may start while the kernel
    before it still writes X (and may still read buffers the GEMM writes): before griddepcontrol.wait
    its sm_90 build only prefetches weight lines into L2."""
    out = sass_report("gemm", "--mode", "1", "--block-m", "8", "--split", "4", "--unroll", "4", "--stages", "3",
                      "--pdl", "4")
    assert out["pdl_wait"] == "True" and out["memory_before_pdl_wait"] == "0"
    assert out["pdl_signal_after_wait"] == "True"  # the next kernel launches only once this one waited
    assert int(out["prefetch_before_pdl_wait"]) > 0
    # quantizing its own input rows (with the residual add, whose sum it stores) changes nothing before the wait
    act = sass_report("gemm", "--mode", "2", "--block-m", "8", "--split", "4", "--pdl", "4", "--act", "3")
    assert act["pdl_wait"] == "True" and act["memory_before_pdl_wait"] == "0" and act["pdl_signal_after_wait"] == "True"
    plain = sass_report("gemm", "--mode", "1", "--block-m", "8", "--split", "4", "--unroll", "4", "--stages", "3")
    assert plain["pdl_wait"] == "False"
    # the CUDA-core gemv kernel: the same contract, and its dp4a compiles to IDP
    gemv = sass_report("gemv", "--mode", "1", "--block-n", "32", "--split", "4", "--unroll", "4", "--pdl", "4")
    assert gemv["pdl_wait"] == "True" and gemv["memory_before_pdl_wait"] == "0"
    assert gemv["pdl_signal_after_wait"] == "True" and int(gemv["prefetch_before_pdl_wait"]) > 0
    assert "'IDP'" in gemv["top"] and gemv["stack"] == "0"
    act = sass_report("gemv", "--mode", "2", "--block-n", "32", "--split", "4", "--pdl", "4", "--act", "3")
    assert act["pdl_wait"] == "True" and act["memory_before_pdl_wait"] == "0" and act["pdl_signal_after_wait"] == "True"


def test_pdl_decode_attention_waits_before_memory_sm90():
    """Decode attention launched as a dependent of the RoPE kernel: nothing global (the cache, the
    split workspace and counters) before griddepcontrol.wait, and the next kernel signalled after it."""
    out = sass_report("decode", "--bits", "4", "--swap", "1", "--split", "4", "--pdl", "1")
    assert out["pdl_wait"] == "True" and out["memory_before_pdl_wait"] == "0"
    assert out["pdl_signal_after_wait"] == "True"
    assert sass_report("decode", "--bits", "4", "--swap", "1", "--split", "4")["pdl_wait"] == "False"


def test_pdl_is_off_on_the_cpu_and_by_env(monkeypatch):
    from qoq.kernels import dispatch

    assert not dispatch.pdl(torch.zeros(1))  # the CPU (and the interpreter) never launch with it
    assert dispatch.pdl_launch(torch.zeros(1)) == {}  # an ordinary launch: PDL stays False
    monkeypatch.setenv("QOQ_PDL", "0")
    assert not dispatch.pdl(torch.zeros(1))


def _rows_off_rounding_edges(m, h, act_kind, norm_weight, gen, margin=1e-3):
    """fp16 rows (x, residual or None, norm weight or None) for an ACT prologue whose values, divided
    by their token's scale, all sit at least `margin` from a rounding edge (k + 0.5): the GEMM's
    prologue normalizes in fp32 and the row twin in float64, and a value on an edge may round to
    either code (each flip moves a token's outputs by about 1 / (sqrt(h) * 40) of their size)."""
    for _ in range(100):
        x = (torch.randn(m, h, generator=gen) * 3).half()
        residual = torch.randn(m, h, generator=gen).half() if act_kind == ACT_ADD_RMSNORM else None
        nw = (torch.rand(h, generator=gen) + 0.5).half() if norm_weight else None
        y = (x if residual is None else x + residual).double()
        if act_kind != ACT_PLAIN:
            y = y * torch.rsqrt(y.pow(2).mean(dim=1, keepdim=True) + 1e-5) * (1.0 if nw is None else nw.double())
        t = y / (y.abs().amax(dim=1, keepdim=True) / 127)
        if ((t - t.floor() - 0.5).abs() >= margin).all():
            return x, residual, nw
    raise AssertionError("no rows off the rounding edges in 100 draws")


@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("act_kind", [ACT_PLAIN, ACT_RMSNORM, ACT_ADD_RMSNORM])
def test_gemm_quantizing_its_own_input_matches_row_kernel_then_gemm(kind, act_kind, device, gen, poison,
                                                                    monkeypatch):
    """The register kernel's and gemv's ACT prologue (decode-sized M): from fp16 rows, per token (plain),
    of their RMSNorm (with and without a norm weight), or of the norm of x + residual (the sum
    written once, as the row kernel writes it), over a width H below the padded K, with split-K
    (per-channel: each split's own codes' zero term) and without, the passes over a row in one
    step or (64 channels a step) in several: the same GEMM as the row kernel's int8 rows into the twin."""
    from qoq.kernels import gemv, int_gemm

    h, k, n = 200, 256, 64
    weights = {"g128": g128_weights, "per_channel": per_channel_weights, "w8a8": w8_weights}[kind](n, k, device, gen)
    mode = {"g128": MODE_W4_G128, "per_channel": MODE_W4_PER_CHANNEL, "w8a8": MODE_W8}[kind]
    w, s1 = weights[0], weights[1]
    s2, sz = (weights[2], weights[3]) if kind == "g128" else (None, weights[2] if kind == "per_channel" else None)
    cases = ((1, 2, True, GemmPlan("reg_a", 8, 64, split_k=2)), (5, 1, False, GemmPlan("reg_a", 8, 64)),
             (3, 2, True, GemmPlan("gemv", 1, 32, split_k=2, unroll=1)), (1, 1, False, GemmPlan("gemv", 1, 64)),
             (2, 2, True, GemmPlan("gemv", 1, 32, split_k=2, unroll=1), 64),
             (3, 2, True, GemmPlan("reg_a", 8, 64, split_k=2), 64))
    real_block = gemv.act_block
    for m, split, norm_weight, plan, *block in cases:
        for module in (gemv, int_gemm):
            monkeypatch.setattr(module, "act_block", (lambda h, w, b=block: b[0]) if block else real_block)
        x, residual, nw = _rows_off_rounding_edges(m, h, act_kind, norm_weight, gen)
        x, residual, nw = (None if t is None else t.to(device) for t in (x, residual, nw))
        s_out = torch.empty(m, h, dtype=torch.float16, device=device) if residual is not None else None
        act = ActInput(x, act_kind, residual, nw, 1e-5, s_out)
        got = int8_gemm_act_triton(act, w, s1, s2, sz, mode, plan)
        # the reference: the row twin (float64 ops on fp32 rows), its codes padded to K, the GEMM twin
        ref_act = ActInput(x.cpu(), act_kind, None if residual is None else residual.cpu(),
                           None if nw is None else nw.cpu(), 1e-5,
                           None if residual is None else torch.empty(m, h, dtype=torch.float16))
        x8, sx, xsum = (t.to(device) for t in act_quantize(ref_act))
        x8 = torch.nn.functional.pad(x8, (0, k - h))
        if kind == "g128":
            want = w4a8_g128_gemm_ref(x8, sx, w, s1, s2, sz)
        elif kind == "per_channel":
            want = w4a8_per_channel_gemm_ref(x8, sx, xsum, w, s1, sz)
        else:
            want = w8a8_gemm_ref(x8, sx, w, s1)
        assert rel_err(got, want) < 2e-3, (m, plan)
        if residual is not None:
            assert torch.equal(s_out.cpu(), ref_act.s)  # x + residual in fp16, exactly
    with pytest.raises(ValueError, match="register kernels"):
        int8_gemm_act_triton(act, w, s1, s2, sz, mode, GemmPlan("tma", 64, 64))


@pytest.mark.parametrize("kind", ["g128", "per_channel", "w8a8"])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_matches_ref(kind, m, device, gen, poison):
    """The CUDA-core "gemv" plan (dp4a on 32-bit words, one token per program): whole and split-K
    (repeat calls: the counters reset), one to four chunks per iteration, N not a multiple of the
    tile, with SiLU*mul after it; the same sums as the twin."""
    k, n = 512, 80
    if kind == "w8a8":
        x8, sx, _ = random_activations(m, k, device, gen)
        case, fn, ref = (x8, sx) + w8_weights(n, k, device, gen), w8a8_gemm_triton, w8a8_gemm_ref
    elif kind == "g128":
        case, fn, ref = g128_case(m, n, k, device, gen), w4a8_g128_gemm_triton, w4a8_g128_gemm_ref
    else:
        case = per_channel_case(m, n, k, device, gen)
        fn, ref = w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref
    want = ref(*case)
    for split, unroll, bn, warps in ((1, 4, 32, 4), (2, 2, 16, 2), (4, 1, 64, 4)):
        plan = GemmPlan("gemv", 1, bn, num_warps=warps, num_stages=2, split_k=split, unroll=unroll)
        for _ in range(2):
            out = fn(*case, config=plan)
            assert out.shape == want.shape and rel_err(out, want) < EXACT
    plan = GemmPlan("gemv", 1, 32, split_k=2)
    assert rel_err(fn(*case, silu_mul=True, config=plan), ref(*case, silu_mul=True)) < EXACT
    if kind == "g128":  # scale rows not aligned to a word (a view into wider rows): one byte a load
        from qoq.kernels.gemv import params_packed

        s2, sz = (torch.cat([t, t[:, :1]], dim=1)[:, :-1] for t in case[4:6])
        assert params_packed(MODE_W4_G128, 4, *case[4:6]) and not params_packed(MODE_W4_G128, 4, s2, sz)
        plan = GemmPlan("gemv", 1, 32, split_k=1, unroll=4)
        assert rel_err(fn(*case[:4], s2, sz, config=plan), want) < EXACT


def test_gemv_plan_rules(device, gen):
    """A gemv plan is one token per program; more tokens than it takes are refused at launch, and
    a table's gemv plan is not selected above them."""
    from qoq.kernels.gemm_plan import GEMV_MAX_M, runnable

    with pytest.raises(ValueError, match="block_m 1"):
        GemmPlan("gemv", 8, 32)
    plan = GemmPlan("gemv", 1, 32, split_k=4)
    assert runnable(plan, False, False, GEMV_MAX_M) and not runnable(plan, True, True, GEMV_MAX_M + 1)
    case = g128_case(GEMV_MAX_M + 1, 32, 256, device, gen)
    with pytest.raises(ValueError, match="at most"):
        w4a8_g128_gemm_triton(*case, config=GemmPlan("gemv", 1, 32))
