"""Warp-specialized persistent int8 GEMM for Hopper, written in Gluon.

Y = X @ W'^T for int8 X [M, K] and the weights as int8 W [N, K] (MODE 0: W8A8, or W4 unpacked by
`int_gemm.unpack_w4_int8`) or as packed W4 [N, K / 2] unpacked inside the kernel (MODE 1 g128,
MODE 2 per-channel; `int_gemm.pack_w4`'s layout), int32 accumulation, and the epilogues of
`int_gemm._int8_gemm_tma_kernel`: per-token x per-channel scales, the per-channel zero term, and
silu(gate) * up over interleaved gate/up rows. The result is bit-identical to that kernel's: the
same integers are summed exactly and the epilogue runs the same fp32 operations.

Why a second kernel: `tl.dot` on Hopper gives one CTA per SM at 128x256 tiles (192 KB of operand
stages), which runs its prologue and epilogue with the tensor cores idle, and Triton 3.6 does not
warp-specialize it (`tl.range(warp_specialize=True)` changed nothing, docs/kernels.md). Gluon lets
the schedule be written out:

- one persistent CTA per SM walks the output tiles, GROUP_M row blocks per column sweep so that
  CTAs running together share weight tiles in L2; or (STREAM, stream-K) takes an equal share of
  the (tile, 128-deep chunk) units, where whole tiles would leave SMs idle, and the pieces of a
  shared tile are summed exactly through a workspace (`_stream_fixup`);
- a producer warp issues the TMA loads of each 128-deep chunk (X, and the weight tile as two column
  halves) into a ring of STAGES shared-memory slots, each with a `ready` mbarrier (TMA bytes
  landed) and an `empty` one (count 2: both consumers are done with the slot); it runs ahead into
  the next tile while the consumers run an epilogue;
- two consumer warpgroups each compute one column half of every tile ("cooperative"; both wait on
  every fill in order, so neither can mistake a slot's parity two phases ahead), keeping one async
  wgmma group in flight: issue chunk c, wait until chunk c-1 is done, release its slot;
- W4: each consumer unpacks its packed half in registers (the PTX of qoq/kernels/ptx.py), stores
  it to its own int8 buffers (two, alternating by chunk), fences and syncs its warpgroup, and
  multiplies from there.

Hopper only (wgmma, TMA, mbarriers, setmaxnreg). A `GemmPlan` of kernel "ws" says where it runs
(gemm_plan.py) and `int_gemm._launch_hopper` launches it; elsewhere the tl.dot kernels run. Gluon kernels do not run in
the CPU interpreter: the CPU tests compile this one for sm_90 (`compile_sm90`) and check its PTX,
and the GPU tests compare it bit for bit with the tl.dot TMA kernel and with the torch reference.
"""

from __future__ import annotations

import functools

import torch

from qoq.kernels.dispatch import arrival_counters
from qoq.kernels.ptx import G128_UNPACK_ASM, PER_CHANNEL_UNPACK_ASM

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
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
    """Whether this Triton has Gluon (the CPU tests compile the kernel whenever it does)."""
    return gluon is not None


@functools.lru_cache(maxsize=None)
def supported(device_index: int) -> bool:
    """Whether the kernel runs on this GPU: Hopper (sm_90) only, wgmma does not exist elsewhere."""
    return available() and torch.cuda.get_device_capability(device_index)[0] == 9


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


if gluon is not None:
    # the kernels' view of the module constants
    _BK = gl.constexpr(BLOCK_K)
    _CONSUMER_0 = gl.constexpr(ROLE_CONSUMER_0)
    _CONSUMER_1 = gl.constexpr(ROLE_CONSUMER_1)
    _PRODUCER = gl.constexpr(ROLE_PRODUCER)
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)
    _G128_ASM = gl.constexpr(G128_UNPACK_ASM)
    _PER_CHANNEL_ASM = gl.constexpr(PER_CHANNEL_UNPACK_ASM)

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        """Output tile -> (row block, column block), GROUP_M row blocks per column sweep."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m

    @gluon.jit
    def _stream_range(num_tiles, chunks):
        """Stream-K: this program's [start, end) of the (tile, chunk) units, tile-major, in equal
        shares over the grid; `per` is the share."""
        total = num_tiles * chunks
        per = gl.cdiv(total, gl.num_programs(0))
        start = gl.program_id(0) * per
        return start, gl.minimum(start + per, total), per

    @gluon.jit
    def _load_chunk(x_desc, w_desc, x_bufs, w_bufs, ready, empty, seq, pid_m, pid_n, c,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MODE: gl.constexpr):
        """Ring slot seq % STAGES <- chunk c of X's [BLOCK_M, 128] (W4: as two 64-wide halves) and
        the two consumers' weight halves, int8 [BLOCK_N / 2, 128] or packed W4 [BLOCK_N / 2, 64]."""
        STAGES: gl.constexpr = ready.type.shape[0]
        HALF: gl.constexpr = BLOCK_N // 2
        WK: gl.constexpr = w_desc.block_type.shape[1]  # weight bytes per row and chunk
        X_PARTS: gl.constexpr = 1 if MODE == 0 else 2
        nbytes: gl.constexpr = X_PARTS * x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
        s = seq % STAGES
        # a fresh mbarrier counts as having completed the phase before 0: the first pass over the
        # ring does not wait
        mbarrier.wait(empty.index(s), ((seq // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, nbytes)
        for part in gl.static_range(X_PARTS):
            tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, c * _BK + part * (_BK // X_PARTS)],
                                            bar, x_bufs.index(X_PARTS * s + part))
        for h in gl.static_range(2):
            tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N + h * HALF, c * WK], bar,
                                            w_bufs.index(2 * s + h))

    @gluon.jit
    def _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, num_m, num_n, chunks,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, MODE: gl.constexpr,
                 STREAM: gl.constexpr):
        """The TMA warp: every chunk of this program's tiles (STREAM: of its stream-K units), in
        the order the consumers take them."""
        seq = 0
        if STREAM:
            start, end, per = _stream_range(num_m * num_n, chunks)
            for u in range(start, end):
                pid_m, pid_n = _tile_coords(u // chunks, num_m, num_n, GROUP_M)
                _load_chunk(x_desc, w_desc, x_bufs, w_bufs, ready, empty, seq, pid_m, pid_n, u % chunks,
                            BLOCK_M, BLOCK_N, MODE)
                seq += 1
        else:
            for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
                pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
                for c in range(chunks):
                    _load_chunk(x_desc, w_desc, x_bufs, w_bufs, ready, empty, seq, pid_m, pid_n, c,
                                BLOCK_M, BLOCK_N, MODE)
                    seq += 1

    @gluon.jit
    def _epilogue(acc, row0, col0, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N,
                  ZERO: gl.constexpr, GATED: gl.constexpr, TRANS: gl.constexpr = False):
        """Scale the int32 tile acc (rows row0.., columns col0..; TRANS: acc holds the transposed
        tile, weight columns down, rows across) and store it (fp16)."""
        layout: gl.constexpr = acc.type.layout
        AX_M: gl.constexpr = 1 if TRANS else 0  # acc's axis of the output rows (tokens)
        AX_N: gl.constexpr = 1 - AX_M
        BM: gl.constexpr = acc.shape[AX_M]
        BN: gl.constexpr = acc.shape[AX_N]
        offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(AX_N, layout))
        offs_n = col0 + gl.arange(0, BN, layout=gl.SliceLayout(AX_M, layout))
        m_mask = offs_m < M
        n_mask = offs_n < N
        src = offs_n
        if GATED:  # interleaved rows: gate j at 2j, up j at 2j + 1; scales in [gate | up] order
            src = (offs_n % 2) * (N // 2) + offs_n // 2
        sx = gl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
        s1 = gl.load(s1_ptr + src, mask=n_mask, other=0.0).to(gl.float32)
        y = acc.to(gl.float32) * gl.expand_dims(sx, AX_N) * gl.expand_dims(s1, AX_M)
        if ZERO:
            xsum = gl.load(xsum_ptr + offs_m, mask=m_mask, other=0.0)
            szero = gl.load(sz_ptr + src, mask=n_mask, other=0.0).to(gl.float32)
            y = y - gl.expand_dims(xsum, AX_N) * gl.expand_dims(szero, AX_M)
        if GATED:
            gl.static_assert(not TRANS, "the gated epilogue takes untransposed tiles")
            # each thread holds column pairs (2j, 2j + 1) of the wgmma layout: a register-local split
            gate, up = gl.split(gl.reshape(y, (BM, BN // 2, 2)))
            out = gate / (1.0 + gl.exp(-gate)) * up
            out_layout: gl.constexpr = out.type.layout
            rows = gl.convert_layout(offs_m, gl.SliceLayout(1, out_layout))
            cols = col0 // 2 + gl.arange(0, BN // 2, layout=gl.SliceLayout(0, out_layout))
            mask = (rows < M)[:, None] & (cols < N // 2)[None, :]
            gl.store(y_ptr + rows[:, None].to(gl.int64) * (N // 2) + cols[None, :], out.to(gl.float16), mask=mask)
        else:
            mask = gl.expand_dims(m_mask, AX_N) & gl.expand_dims(n_mask, AX_M)
            ptrs = y_ptr + gl.expand_dims(offs_m.to(gl.int64) * N, AX_N) + gl.expand_dims(offs_n, AX_M)
            gl.store(ptrs, y.to(gl.float16), mask=mask)

    @gluon.jit
    def _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, c, MODE: gl.constexpr):
        """g128 (MODE 1): chunk c's step s2 and scaled zero sz of the weight rows `rows` (int32);
        other modes: placeholders, unused."""
        if MODE == 1:
            s2 = gl.load(s2_ptr + rows * stride_sg + c, mask=rows < N, other=0).to(gl.int32)
            sz = gl.load(sz_ptr + rows * stride_sg + c, mask=rows < N, other=0).to(gl.int32)
        else:
            s2 = rows
            sz = rows
        return s2, sz

    @gluon.jit
    def _unpack(p, s2, sz, MODE: gl.constexpr, PINNED: gl.constexpr = False):
        """Packed W4 bytes [rows, 64] of one chunk -> int8 (low half, high half): Q8' (g128, MODE 1)
        or the uint4 codes (per-channel, MODE 2), four per 32-bit word (qoq/kernels/ptx.py).
        PINNED: volatile asm, which LLVM keeps in program order with the wgmma waits (ptxas may
        still schedule a wait ahead of it: `_mma_chunks_reg_a`)."""
        if MODE == 1:
            # the per-row parameters as 32-bit words: the same register for every word of a row
            s2w, _ = gl.broadcast(gl.expand_dims(s2, 1), p)
            cbw, _ = gl.broadcast(gl.expand_dims((128 - sz) * 0x01010101, 1), p)
            lo, hi = gl.inline_asm_elementwise(asm=_G128_ASM, constraints="=r,=r" + ",r" * 9, args=[p, s2w, cbw],
                                               dtype=(gl.int8, gl.int8), is_pure=not PINNED, pack=4)
        else:
            lo, hi = gl.inline_asm_elementwise(asm=_PER_CHANNEL_ASM, constraints="=r,=r,r", args=[p],
                                               dtype=(gl.int8, gl.int8), is_pure=not PINNED, pack=4)
        return lo, hi

    @gluon.jit
    def _mma_chunks(x_bufs, w_bufs, wq_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, col0, c0, c1, seq,
                    BLOCK_M: gl.constexpr, HALF: gl.constexpr, MODE: gl.constexpr, WHICH: gl.constexpr):
        """One consumer warpgroup's int32 [BLOCK_M, HALF] product over chunks [c0, c1) of the weight
        columns col0.., from ring slot seq % STAGES on; returns it and the next seq. W4 (MODE 1, 2):
        the packed chunk is unpacked in registers into this warpgroup's own int8 buffers (two,
        alternating by chunk: the MMA of chunk c - 1 may still read the other) and multiplied from
        there, two 64-deep MMAs per chunk."""
        STAGES: gl.constexpr = ready.type.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128 if HALF > 128 else HALF, 32])
        # packed bytes [HALF, 64]: 16 consecutive bytes (four words) per thread
        packed: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
        GROUPS: gl.constexpr = 1 if MODE == 0 else 2  # MMA groups per chunk
        acc = gl.zeros((BLOCK_M, HALF), gl.int32, layout)
        prev = 0
        rows = col0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, packed))
        # g128: each chunk's s2 / sz are loaded one chunk ahead, off the unpack's critical path
        s2_next, sz_next = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, c0, MODE)
        for c in range(c0, c1):
            s = seq % STAGES
            s2 = s2_next
            sz = sz_next
            if MODE == 1:
                s2_next, sz_next = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c + 1, c1 - 1), MODE)
            mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
            if MODE == 0:
                acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(2 * s + WHICH).permute((1, 0)), acc,
                                    is_async=True)
            else:
                lo, hi = _unpack(w_bufs.index(2 * s + WHICH).load(packed), s2, sz, MODE)
                w_lo = wq_bufs.index(4 * WHICH + 2 * (c % 2))
                w_hi = wq_bufs.index(4 * WHICH + 2 * (c % 2) + 1)
                w_lo.store(lo)
                w_hi.store(hi)
                fence_async_shared()  # the stores, before the MMA (async proxy) reads them
                gl.thread_barrier()  # all of this warpgroup's stores
                acc = warpgroup_mma(x_bufs.index(2 * s), w_lo.permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma(x_bufs.index(2 * s + 1), w_hi.permute((1, 0)), acc, is_async=True)
            # chunk c - 1's MMAs are done once at most this chunk's are in flight: release its
            # slot (it is free when both consumers have)
            acc = warpgroup_mma_wait(GROUPS, deps=(acc, ))
            mbarrier.arrive(empty.index(prev), pred=c > c0)
            prev = s
            seq += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index(prev))
        return acc, seq

    @gluon.jit
    def _reg_a_chunk(x_bufs, w_bufs, ready, seq, acc, s2, sz, a_layout: gl.constexpr, MODE: gl.constexpr,
                     WHICH: gl.constexpr):
        """Issue one chunk's two MMAs (ring slot seq, g128 parameters s2 / sz): once the slot has
        landed, its packed weights are loaded into the registers of wgmma's A operand and unpacked
        there (lo / hi), and multiplied with X's two 64-wide halves (B, from shared memory)."""
        STAGES: gl.constexpr = ready.type.shape[0]
        s = seq % STAGES
        mbarrier.wait(ready.index(s), (seq // STAGES) & 1)
        lo, hi = _unpack(w_bufs.index(2 * s + WHICH).load(a_layout), s2, sz, MODE, True)
        acc = warpgroup_mma(lo, x_bufs.index(2 * s).permute((1, 0)), acc, is_async=True)
        return warpgroup_mma(hi, x_bufs.index(2 * s + 1).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _mma_chunks_reg_a(x_bufs, w_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, row0, c0, c1, seq,
                          BLOCK_M: gl.constexpr, HALF: gl.constexpr, MODE: gl.constexpr, WHICH: gl.constexpr):
        """REG_A (W4 only): one consumer warpgroup's int32 [HALF, BLOCK_M] = W X^T over chunks
        [c0, c1) of the weight rows row0.. (the transposed tile): the packed chunk is loaded from
        its ring slot straight into the registers of wgmma's A operand, unpacked there and
        multiplied with X's two 64-wide halves (B, from shared memory). No unpacked copy in shared
        memory, no proxy fence, no warpgroup barrier.

        Chunks go in groups of U (4, or 2 where the ring has under 8 slots, so the producer keeps
        slots to fill): each chunk of a group waits for its slot, is unpacked into its own A
        registers and its MMAs are issued; the next group's g128 parameters are loaded; one wait
        then retires the group's MMAs and its slots are released. The unpack of chunks 2..U
        overlaps the group's earlier MMAs, the parameters' loads the group's last ones, and no
        unpacked operand crosses the loop's back edge (carried as bytes, its repacking doubled the
        loop's instructions). Every MMA retires in the iteration that issued it: one still in
        flight across the back edge makes ptxas serialize all of them (C7512)."""
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 128 if BLOCK_M > 128 else BLOCK_M, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=layout, k_width=4)
        acc = gl.zeros((HALF, BLOCK_M), gl.int32, layout)
        rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, a_layout))
        STAGES: gl.constexpr = ready.type.shape[0]
        U: gl.constexpr = 4 if STAGES >= 8 else 2
        full = c0 + ((c1 - c0) // U) * U
        last = c1 - 1
        # the first group's parameters (chunks past the range: the last one's, unused)
        s2_0, sz_0 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c0, last), MODE)
        s2_1, sz_1 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c0 + 1, last), MODE)
        if U == 4:
            s2_2, sz_2 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c0 + 2, last), MODE)
            s2_3, sz_3 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c0 + 3, last), MODE)
        else:
            s2_2, sz_2, s2_3, sz_3 = s2_0, sz_0, s2_1, sz_1
        for c in range(c0, full, U):
            acc = _reg_a_chunk(x_bufs, w_bufs, ready, seq, acc, s2_0, sz_0, a_layout, MODE, WHICH)
            acc = _reg_a_chunk(x_bufs, w_bufs, ready, seq + 1, acc, s2_1, sz_1, a_layout, MODE, WHICH)
            if U == 4:
                acc = _reg_a_chunk(x_bufs, w_bufs, ready, seq + 2, acc, s2_2, sz_2, a_layout, MODE, WHICH)
                acc = _reg_a_chunk(x_bufs, w_bufs, ready, seq + 3, acc, s2_3, sz_3, a_layout, MODE, WHICH)
            s2_0, sz_0 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c + U, last), MODE)
            s2_1, sz_1 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c + U + 1, last), MODE)
            if U == 4:
                s2_2, sz_2 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c + U + 2, last), MODE)
                s2_3, sz_3 = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, gl.minimum(c + U + 3, last), MODE)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            for i in gl.static_range(U):
                mbarrier.arrive(empty.index((seq + i) % STAGES))
            seq += U
        for c in range(full, c1):  # the chunks short of a group
            s2, sz = _group_params(s2_ptr, sz_ptr, rows, N, stride_sg, c, MODE)
            acc = _reg_a_chunk(x_bufs, w_bufs, ready, seq, acc, s2, sz, a_layout, MODE, WHICH)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(seq % STAGES))
            seq += 1
        return acc, seq

    @gluon.jit
    def _stream_fixup(acc, ws_ptr, cnt_ptr, tile, first, per, chunks, WHICH: gl.constexpr):
        """Stream-K: this warpgroup's partial sum of a tile that several programs share. It goes to
        the workspace (slot: the program's first or last segment), the tile half's arrival counter
        counts it (acq_rel), and the last piece to arrive adds the others' (exact int32) and resets
        the counter. Returns (the sum, whether this piece is the last)."""
        BM: gl.constexpr = acc.shape[0]
        HALF: gl.constexpr = acc.shape[1]
        layout: gl.constexpr = acc.type.layout
        offs = (gl.arange(0, BM, layout=gl.SliceLayout(1, layout))[:, None] * HALF
                + gl.arange(0, HALF, layout=gl.SliceLayout(0, layout))[None, :])
        slot = 2 * gl.program_id(0) + gl.where(first, 0, 1)
        gl.store(ws_ptr + (2 * slot + WHICH).to(gl.int64) * (BM * HALF) + offs, acc)
        gl.thread_barrier()  # the warpgroup's stores, before its arrival
        arrived = gl.atomic_add(cnt_ptr + 2 * tile + WHICH, 1, sem="acq_rel", scope="gpu")
        p_first = tile * chunks // per
        p_last = ((tile + 1) * chunks - 1) // per
        last = arrived == p_last - p_first
        if last:
            for q in range(p_first, p_last + 1):
                if q != gl.program_id(0):
                    # q's piece is its first segment unless q started before this tile
                    q_slot = 2 * q + gl.where(q * per >= tile * chunks, 0, 1)
                    acc += gl.load(ws_ptr + (2 * q_slot + WHICH).to(gl.int64) * (BM * HALF) + offs,
                                   cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr + 2 * tile + WHICH, 0, sem="relaxed", scope="gpu")
        return acc, last

    @gluon.jit
    def _product(x_bufs, w_bufs, wq_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, col0, c0, c1, seq,
                 BLOCK_M: gl.constexpr, HALF: gl.constexpr, MODE: gl.constexpr, WHICH: gl.constexpr,
                 REG_A: gl.constexpr):
        """This warpgroup's int32 product over chunks [c0, c1) and the next ring seq: [BLOCK_M, HALF],
        or (REG_A) its transpose, the weights as the register operand."""
        if REG_A:
            acc, seq = _mma_chunks_reg_a(x_bufs, w_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, col0, c0, c1,
                                         seq, BLOCK_M, HALF, MODE, WHICH)
        else:
            acc, seq = _mma_chunks(x_bufs, w_bufs, wq_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, col0, c0, c1,
                                   seq, BLOCK_M, HALF, MODE, WHICH)
        return acc, seq

    @gluon.jit
    def _consume(x_bufs, w_bufs, wq_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr,
                 cnt_ptr, M, N, stride_sg, num_m, num_n, chunks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 GROUP_M: gl.constexpr, MODE: gl.constexpr, ZERO: gl.constexpr, GATED: gl.constexpr,
                 STREAM: gl.constexpr, REG_A: gl.constexpr, WHICH: gl.constexpr):
        """One consumer warpgroup: columns [WHICH * BLOCK_N / 2, (WHICH + 1) * BLOCK_N / 2) of every
        tile of this CTA (STREAM: of every tile segment of its units; a tile's last piece to finish
        runs the epilogue)."""
        HALF: gl.constexpr = BLOCK_N // 2
        seq = 0
        if STREAM:
            start, end, per = _stream_range(num_m * num_n, chunks)
            u = start
            while u < end:
                tile = u // chunks
                c0 = u - tile * chunks
                c1 = gl.minimum(chunks, c0 + end - u)
                pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
                col0 = pid_n * BLOCK_N + WHICH * HALF
                acc, seq = _product(x_bufs, w_bufs, wq_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, col0,
                                    c0, c1, seq, BLOCK_M, HALF, MODE, WHICH, REG_A)
                last = c1 - c0 == chunks
                if not last:
                    acc, last = _stream_fixup(acc, ws_ptr, cnt_ptr, tile, u == start, per, chunks, WHICH)
                if last:
                    _epilogue(acc, pid_m * BLOCK_M, col0, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N, ZERO,
                              GATED, REG_A)
                u += c1 - c0
        else:
            for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
                pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
                col0 = pid_n * BLOCK_N + WHICH * HALF
                acc, seq = _product(x_bufs, w_bufs, wq_bufs, ready, empty, s2_ptr, sz_ptr, N, stride_sg, col0,
                                    0, chunks, seq, BLOCK_M, HALF, MODE, WHICH, REG_A)
                _epilogue(acc, pid_m * BLOCK_M, col0, sx_ptr, xsum_ptr, s1_ptr, sz_ptr, y_ptr, M, N, ZERO, GATED,
                          REG_A)

    @gluon.jit
    def _partition(x_desc, w_desc, x_bufs, w_bufs, wq_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr,
                   y_ptr, ws_ptr, cnt_ptr, M, N, stride_sg, num_m, num_n, chunks, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, MODE: gl.constexpr, ZERO: gl.constexpr,
                   GATED: gl.constexpr, STREAM: gl.constexpr, REG_A: gl.constexpr, ROLE: gl.constexpr):
        if ROLE == _PRODUCER:
            _produce(x_desc, w_desc, x_bufs, w_bufs, ready, empty, num_m, num_n, chunks, BLOCK_M, BLOCK_N, GROUP_M,
                     MODE, STREAM)
        else:
            _consume(x_bufs, w_bufs, wq_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr,
                     cnt_ptr, M, N, stride_sg, num_m, num_n, chunks, BLOCK_M, BLOCK_N, GROUP_M, MODE, ZERO, GATED,
                     STREAM, REG_A, ROLE)

    @gluon.jit
    def _ws_gemm_kernel(x_desc, w_desc, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                        stride_sg, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        GROUP_M: gl.constexpr, MODE: gl.constexpr, ZERO: gl.constexpr, GATED: gl.constexpr,
                        STREAM: gl.constexpr, REG_A: gl.constexpr = False):
        """STREAM (stream-K): the grid shares the (tile, 128-deep chunk) units equally instead of
        taking whole tiles in rounds, so that no SM idles when the tiles do not divide into the
        grid (e.g. 96 tiles on 132 SMs); tiles split between programs are summed through a
        workspace ws_ptr (int32 [2 * grid, 2, BLOCK_M, BLOCK_N / 2]) with arrival counters
        cnt_ptr (int32 [2 * tiles], zero), bit-identical to the unsplit sums."""
        X_PARTS: gl.constexpr = 1 if MODE == 0 else 2
        x_bufs = gl.allocate_shared_memory(gl.int8, [X_PARTS * STAGES] + x_desc.block_type.shape, x_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [2 * STAGES] + w_desc.block_type.shape, w_desc.layout)
        # W4: each consumer's unpacked chunk, [2 parities x (low, high)] of [BLOCK_N / 2, 64] int8
        # (REG_A unpacks into registers: none)
        wq_bufs = gl.allocate_shared_memory(gl.int8, [8 if MODE != 0 and not REG_A else 1] + w_desc.block_type.shape,
                                            w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a slot
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        chunks = K // _BK
        gl.warp_specialize([
            (_partition, (x_desc, w_desc, x_bufs, w_bufs, wq_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, s2_ptr,
                          sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_sg, num_m, num_n, chunks, BLOCK_M, BLOCK_N,
                          GROUP_M, MODE, ZERO, GATED, STREAM, REG_A, _CONSUMER_0)),
            (_partition, (x_desc, w_desc, x_bufs, w_bufs, wq_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, s2_ptr,
                          sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_sg, num_m, num_n, chunks, BLOCK_M, BLOCK_N,
                          GROUP_M, MODE, ZERO, GATED, STREAM, REG_A, _CONSUMER_1)),
            (_partition, (x_desc, w_desc, x_bufs, w_bufs, wq_bufs, ready, empty, sx_ptr, xsum_ptr, s1_ptr, s2_ptr,
                          sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_sg, num_m, num_n, chunks, BLOCK_M, BLOCK_N,
                          GROUP_M, MODE, ZERO, GATED, STREAM, REG_A, _PRODUCER)),
        ], [4, 1], [_CONSUMER_REGS, _PRODUCER_REGS])


def stages_for(block_m: int, block_n: int, mode: int = 0, smem_bytes: int = 227 * 1024, reg_a: bool = False) -> int:
    """Ring slots that fit the SM's shared memory, at most 8: each holds X's [block_m, 128] and the
    weights' [block_n, 128] (int8) or [block_n, 64] (packed W4, which also needs the consumers'
    four unpacked [block_n / 2, 64] buffers unless it unpacks into registers, reg_a)."""
    if mode == 0:
        return min(8, (smem_bytes - 1024) // ((block_m + block_n) * BLOCK_K))
    unpacked = 0 if reg_a else 4 * block_n * 64
    return min(8, (smem_bytes - 1024 - unpacked) // ((2 * block_m + block_n) * 64))


def launch_args(x8, w, sx, xsum, s1, s2, sz, y, mode: int, plan, zero: bool, gated: bool):
    """(grid, positional args, constexpr kwargs) of one `_ws_gemm_kernel` launch of a
    `gemm_plan.GemmPlan` (kernel "ws")."""
    M, K = x8.shape
    N = w.shape[0]
    bm, bn = plan.block_m, plan.block_n
    xk = BLOCK_K if mode == 0 else BLOCK_K // 2  # W4: X as two 64-wide halves per chunk
    x_desc = GluonDescriptor.from_tensor(x8, [bm, xk], gl.NVMMASharedLayout.get_default_for([bm, xk], gl.int8))
    half = [bn // 2, xk]  # each consumer warpgroup's half of the weight tile (W4: packed bytes)
    w_desc = GluonDescriptor.from_tensor(w, half, gl.NVMMASharedLayout.get_default_for(half, gl.int8))
    tiles = -(-M // bm) * -(-N // bn)
    sms = plan.grid or (num_sms(x8.device.index or 0) if x8.is_cuda else 132)  # CPU: compile_sm90, an H100
    stream = plan.stream_k
    reg_a = plan.w_in_registers
    if reg_a and (mode == 0 or gated or bn // 2 not in (64, 128) or bm > 256):
        raise ValueError(f"REG_A takes packed W4 (mode 1 or 2), no gated epilogue, BLOCK_N 128 or 256 and "
                         f"BLOCK_M <= 256; got mode {mode}, gated {gated}, {bm}x{bn} tiles")
    grid = sms if stream else min(sms, tiles)
    dummy = sx
    if stream:  # each program holds at most two partial tiles (its first and last segments)
        ws = torch.empty(2 * grid * bm * bn, dtype=torch.int32, device=x8.device)
        cnt = arrival_counters(x8.device, 2 * tiles)
    else:
        ws = cnt = dummy
    args = (x_desc, w_desc, sx, xsum if xsum is not None else dummy, s1, s2 if s2 is not None else dummy,
            sz if sz is not None else dummy, y, ws, cnt, M, N, K, s2.stride(0) if s2 is not None else 0)
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=plan.num_stages or stages_for(bm, bn, mode, reg_a=reg_a),
                  GROUP_M=plan.group_m, MODE=mode, ZERO=zero, GATED=gated, STREAM=stream, REG_A=reg_a)
    return (grid,), args, consts


def ws_gemm(x8, w, sx, xsum, s1, s2, sz, y, mode: int, plan, zero: bool = False, gated: bool = False) -> None:
    """Run the kernel into y ([M, N] fp16, or [M, N / 2] with gated); inputs validated by callers.

    mode: int_gemm's MODE (0 int8 weights [N, K]; 1 g128 / 2 per-channel packed W4 [N, K / 2],
    unpacked in the kernel). zero: subtract xsum[m] * sz[n] (per-channel W4, packed or unpacked to
    its uint4 codes). gated: the int8 weights' rows are gate/up pairs (mode 0 only)."""
    if x8.shape[0] == 0:
        return
    grid, args, consts = launch_args(x8, w, sx, xsum, s1, s2, sz, y, mode, plan, zero, gated)
    _ws_gemm_kernel[grid](*args, **consts, num_warps=4, maxnreg=MAXNREG)


def compile_sm90(x8, w, sx, xsum, s1, s2, sz, y, mode: int, plan, zero: bool = False, gated: bool = False):
    """Compile the kernel for an H100 (sm_90) without a GPU (tensors on any device give the
    signature): the CPU tests' check that it builds, and a way to read its SASS offline."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    _, args, consts = launch_args(x8, w, sx, xsum, s1, s2, sz, y, mode, plan, zero, gated)
    fn = _ws_gemm_kernel
    signature = {name: mangle_type(arg) for name, arg in zip(fn.arg_names, args)}
    signature.update({name: "constexpr" for name in consts})
    src = GluonASTSource(fn, signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=MAXNREG))
