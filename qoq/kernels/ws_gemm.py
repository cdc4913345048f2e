"""Warp-specialized persistent int8 GEMM for Hopper (Gluon): the prefill-sized GEMMs.

Y = X @ W^T for int8 X [M, K] and int8 W [N, K] (W8A8, or W4 unpacked to int8 by
`int_gemm.unpack_w4_int8`), int32 accumulation, the same epilogues as `_int8_gemm_tma_kernel`
(per-token x per-channel scales, the per-channel zero term, silu(gate) * up of interleaved gate/up
rows). The result is bit-identical to that kernel's: the same integers are summed exactly and the
epilogue runs the same fp32 operations.

Why a second kernel: `tl.dot` on Hopper gives one CTA per SM for 128x256 tiles (192 KB of operand
stages), which runs its prologue and epilogue with the tensor cores idle, and Triton 3.6 does not
warp-specialize it (`tl.range(warp_specialize=True)` changed nothing, docs/kernels.md). Gluon lets
us write the schedule explicitly:

- one persistent CTA per SM walks the output tiles (grouped along M so that CTAs running together
  share weight tiles in L2);
- a producer warp issues the TMA loads of X and W chunks (BLOCK_K = 128) into a ring of STAGES
  shared-memory slots, each with a `ready` (TMA bytes landed) and an `empty` (MMA done) mbarrier;
- two consumer warpgroups take alternate tiles ("ping-pong"): since the producer fills the ring in
  tile order, one consumer's main loop runs while the other converts, scales and stores its
  accumulator, so the tensor cores do not wait for epilogues. Each consumer keeps one wgmma group
  in flight (issue chunk c, wait until chunk c-1 is done, release c-1's slot).

Hopper only (wgmma, TMA, mbarriers); `int_gemm._launch_tma` uses it where `ws_config` says so and
keeps `_int8_gemm_tma_kernel` elsewhere. Gluon kernels do not run in the CPU interpreter: the CPU
tests compile this kernel for sm_90 (`compile_sm90`) and the GPU tests compare it with the torch
reference and with the tl.dot kernel at real shapes.
"""

from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
except ImportError:  # pragma: no cover - an old Triton, or none
    gluon = None

BLOCK_K = 128
ROLE_CONSUMER_0, ROLE_CONSUMER_1, ROLE_PRODUCER = 0, 1, 2
# Registers per thread: the kernel runs 4 (consumer 0) + 4 (consumer 1) + 1 (producer, padded to a
# warpgroup) warps, so 12 x 32 x MAXNREG must fit the SM's 64K; the producer gives most of its
# share to the consumers, whose int32 accumulator alone takes 128.
MAXNREG, CONSUMER_REGS, PRODUCER_REGS = 168, 232, 40


def available() -> bool:
    return gluon is not None


if gluon is not None:
    # the kernels' view of the module constants
    _BK = gl.constexpr(BLOCK_K)
    _CONSUMER_0 = gl.constexpr(ROLE_CONSUMER_0)
    _CONSUMER_1 = gl.constexpr(ROLE_CONSUMER_1)
    _PRODUCER = gl.constexpr(ROLE_PRODUCER)
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        """Output tile -> (row block, column block), GROUP_M row blocks per column sweep."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m

    @gluon.jit
    def _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, num_m, num_n, chunks,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        HALF: gl.constexpr = BLOCK_N // 2
        nbytes: gl.constexpr = x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
        seq = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            for c in range(chunks):
                s = seq % STAGES
                # a fresh mbarrier counts as having completed the phase before 0: the first pass
                # over the ring does not wait
                mbarrier.wait(empty.index(s), ((seq // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, c * _BK], bar, x_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, c * _BK], bar, w_bufs.index(2 * s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N + HALF, c * _BK], bar,
                                                w_bufs.index(2 * s + 1))
                seq += 1

    @gluon.jit
    def _epilogue(acc, row0, col0, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N,
                  ZERO: gl.constexpr, GATED: gl.constexpr):
        """Scale the int32 tile acc (rows row0.., columns col0..) and store it (fp16)."""
        BM: gl.constexpr = acc.shape[0]
        BN: gl.constexpr = acc.shape[1]
        layout: gl.constexpr = acc.type.layout
        offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        offs_n = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        m_mask = offs_m < M
        n_mask = offs_n < N
        src = offs_n
        if GATED:  # interleaved rows: gate j at 2j, up j at 2j + 1; scales in [gate | up] order
            src = (offs_n % 2) * (N // 2) + offs_n // 2
        sx = gl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
        s1 = gl.load(s1_ptr + src, mask=n_mask, other=0.0).to(gl.float32)
        y = acc.to(gl.float32) * sx[:, None] * s1[None, :]
        if ZERO:
            xsum = gl.load(xsum_ptr + offs_m, mask=m_mask, other=0.0)
            szero = gl.load(sz_ptr + src, mask=n_mask, other=0.0).to(gl.float32)
            y = y - xsum[:, None] * szero[None, :]
        if GATED:
            # each thread holds column pairs (2j, 2j + 1) of the wgmma layout: a register-local split
            gate, up = gl.split(gl.reshape(y, (BM, BN // 2, 2)))
            out = gate / (1.0 + gl.exp(-gate)) * up
            out_layout: gl.constexpr = out.type.layout
            rows = gl.convert_layout(offs_m, gl.SliceLayout(1, out_layout))
            cols = col0 // 2 + gl.arange(0, BN // 2, layout=gl.SliceLayout(0, out_layout))
            mask = (rows < M)[:, None] & (cols < N // 2)[None, :]
            gl.store(y_ptr + rows[:, None].to(gl.int64) * (N // 2) + cols[None, :], out.to(gl.float16), mask=mask)
        else:
            mask = m_mask[:, None] & n_mask[None, :]
            gl.store(y_ptr + offs_m[:, None].to(gl.int64) * N + offs_n[None, :], y.to(gl.float16), mask=mask)

    @gluon.jit
    def _consume(x_bufs, w_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N, num_m, num_n, chunks,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, ZERO: gl.constexpr,
                 GATED: gl.constexpr, WHICH: gl.constexpr):
        """One consumer warpgroup: columns [WHICH * BLOCK_N / 2, (WHICH + 1) * BLOCK_N / 2) of every
        tile of this CTA."""
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        HALF: gl.constexpr = BLOCK_N // 2
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128 if HALF > 128 else HALF, 32])
        seq = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            acc = gl.zeros((BLOCK_M, HALF), gl.int32, layout)
            prev = 0
            for c in range(chunks):
                s = seq % STAGES
                mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
                acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(2 * s + WHICH).permute((1, 0)), acc, is_async=True)
                # chunk c - 1's MMAs are done once at most this chunk's are in flight: release its
                # slot (it is free when both consumers have)
                acc = warpgroup_mma_wait(1, deps=(acc, ))
                mbarrier.arrive(empty.index(prev), pred=c > 0)
                prev = s
                seq += 1
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(prev))
            _epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N + WHICH * HALF, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr,
                      M, N, ZERO, GATED)

    @gluon.jit
    def _partition(x_desc, w_desc, x_bufs, w_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N,
                   num_m, num_n, chunks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                   ZERO: gl.constexpr, GATED: gl.constexpr, ROLE: gl.constexpr):
        if ROLE == _PRODUCER:
            _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, num_m, num_n, chunks, BLOCK_M, BLOCK_N, GROUP_M)
        else:
            _consume(x_bufs, w_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N, num_m, num_n,
                     chunks, BLOCK_M, BLOCK_N, GROUP_M, ZERO, GATED, ROLE)

    @gluon.jit
    def _ws_gemm_kernel(x_desc, w_desc, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N, K,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                        ZERO: gl.constexpr, GATED: gl.constexpr):
        x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, _BK], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int8, [2 * STAGES, BLOCK_N // 2, _BK], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a slot
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        chunks = K // _BK
        gl.warp_specialize([
            (_partition, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N,
                          num_m, num_n, chunks, BLOCK_M, BLOCK_N, GROUP_M, ZERO, GATED, _CONSUMER_0)),
            (_partition, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N,
                          num_m, num_n, chunks, BLOCK_M, BLOCK_N, GROUP_M, ZERO, GATED, _CONSUMER_1)),
            (_partition, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N,
                          num_m, num_n, chunks, BLOCK_M, BLOCK_N, GROUP_M, ZERO, GATED, _PRODUCER)),
        ], [4, 1], [_CONSUMER_REGS, _PRODUCER_REGS])


def stages_for(block_m: int, block_n: int, smem_bytes: int = 227 * 1024) -> int:
    """Ring slots that fit the SM's shared memory (one X and one W chunk each), at most 8."""
    return min(8, (smem_bytes - 1024) // ((block_m + block_n) * BLOCK_K))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_args(x8, w, sx, xsum, s1, sz, y, cfg: dict, zero: bool, gated: bool):
    """(grid, positional args, constexpr kwargs) of one `_ws_gemm_kernel` launch."""
    M, K = x8.shape
    N = w.shape[0]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    x_desc = GluonDescriptor.from_tensor(x8, [bm, BLOCK_K], gl.NVMMASharedLayout.get_default_for([bm, BLOCK_K], gl.int8))
    half = [bn // 2, BLOCK_K]  # each consumer warpgroup's half of the weight tile
    w_desc = GluonDescriptor.from_tensor(w, half, gl.NVMMASharedLayout.get_default_for(half, gl.int8))
    tiles = -(-M // bm) * -(-N // bn)
    sms = _num_sms(x8.device.index or 0) if x8.is_cuda else 132
    dummy = sx
    args = (x_desc, w_desc, sx, xsum if xsum is not None else dummy, s1, sz if sz is not None else dummy, y, M, N, K)
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=cfg.get("STAGES") or stages_for(bm, bn),
                  GROUP_M=cfg.get("GROUP_M", 8), ZERO=zero, GATED=gated)
    return (min(sms, tiles),), args, consts


def ws_int8_gemm(x8, w, sx, xsum, s1, sz, y, cfg: dict, zero: bool = False, gated: bool = False) -> None:
    """Run the kernel into y ([M, N] fp16, or [M, N / 2] with gated); inputs validated by callers.

    zero: subtract xsum[m] * sz[n] (per-channel W4 unpacked to its uint4 codes)."""
    grid, args, consts = launch_args(x8, w, sx, xsum, s1, sz, y, cfg, zero, gated)
    _ws_gemm_kernel[grid](*args, **consts, num_warps=4, maxnreg=MAXNREG)


def compile_sm90(x8, w, sx, xsum, s1, sz, y, cfg: dict, zero: bool = False, gated: bool = False):
    """Compile the kernel for an H100 (sm_90) without a GPU (tensors on any device give the
    signature): the CPU tests' check that it builds, and a way to read its SASS offline."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    _, args, consts = launch_args(x8, w, sx, xsum, s1, sz, y, cfg, zero, gated)
    fn = _ws_gemm_kernel
    names = fn.arg_names
    signature = {name: mangle_type(arg) for name, arg in zip(names, args)}
    signature.update({name: "constexpr" for name in consts})
    src = GluonASTSource(fn, signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=MAXNREG))
