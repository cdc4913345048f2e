"""Paged KV cache (KV4/KV8/KV16, docs/formats.md#kv-cache) and the fused RoPE + quantize + paged-write kernel.

Layout per layer, page p, kv head h, token slot o (slot = page * page_size + o):
  bits=4:  k_cache/v_cache uint8 [num_pages, num_kv_heads, page_size, head_dim // 2];
           byte j holds dim j in its LOW nibble and dim j + head_dim/2 in its HIGH nibble.
           The halves match RoPE's rotate_half halves, and let decode split q into two halves
           and use a mask and a shift per byte, no shuffles.
  bits=8:  uint8 [num_pages, num_kv_heads, page_size, head_dim]
  bits=16: fp16 [.., head_dim]; no scales.
  V of a quantized cache (bits 4 and 8) is stored transposed per page: v_cache uint8
  [num_pages, num_kv_heads, width, page_size], byte (j, o) of a page-head block. Decode multiplies
  P by V over the tokens, so the MMA operand pairs neighbouring tokens: in this layout they are
  neighbouring bytes, which the kernel reads by ldmatrix instead of one byte at a time (15% fewer
  instructions in its loop). `KVCacheLayer.codes` gives either in the token-major order.
  k_scale/k_zero/v_scale/v_zero fp16 [num_pages, num_kv_heads, page_size] for bits 4 and 8.
Asymmetric per token-head: scale = (max - min) / (2^bits - 1), zero = min, both rounded to fp16
first and then used to quantize (so the stored pair reproduces what was quantized):
  q = clamp(round((x - zero) / scale), 0, 2^bits - 1), x_hat = q * scale + zero.

A cache with `qk_hadamard` holds keys in a rotated basis: after RoPE, q and k of every head are
multiplied by the normalized Sylvester Hadamard H (head_dim x head_dim, H H^T = I), so
(q H)(k H)^T = q k^T and attention is unchanged, while a key's outlier channels are spread over all
its channels before the per token-head quantization (KV4 keys lose far less; docs/accuracy.md).
`rope_kv_write` returns the rotated q and k, so prefill and decode attention read one basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.kernels.dispatch import dispatch, lazy_jit, pdl_enter, pdl_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


@dataclass
class KVCacheLayer:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None
    k_zero: torch.Tensor | None
    v_scale: torch.Tensor | None
    v_zero: torch.Tensor | None
    bits: int
    page_size: int
    qk_hadamard: bool = False  # keys stored (and queries returned) rotated by H after RoPE

    @property
    def num_pages(self) -> int:
        return self.k_cache.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3] * (2 if self.bits == 4 else 1)

    def codes(self, which: str) -> torch.Tensor:
        """K or V data as [num_pages, num_kv_heads, page_size, width] (a view; quantized V is
        stored with its last two dims swapped, see the module docstring)."""
        data = getattr(self, f"{which}_cache")
        return data.transpose(2, 3) if which == "v" and self.bits != 16 else data


def allocate_kv_cache(num_layers, num_pages, num_kv_heads, head_dim, page_size=64, bits=4,
                      device="cpu", dtype=torch.float16, qk_hadamard=False) -> list[KVCacheLayer]:
    if bits not in (4, 8, 16):
        raise ValueError(f"KV cache bits must be 4, 8 or 16, got {bits}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if qk_hadamard:
        check_hadamard_dim(head_dim)
    width = head_dim // 2 if bits == 4 else head_dim
    data_dtype = dtype if bits == 16 else torch.uint8
    shape = (num_pages, num_kv_heads, page_size)
    layers = []
    v_shape = (*shape, width) if bits == 16 else (num_pages, num_kv_heads, width, page_size)
    for _ in range(num_layers):
        def meta():
            return None if bits == 16 else torch.zeros(shape, dtype=torch.float16, device=device)
        layers.append(KVCacheLayer(
            torch.zeros(*shape, width, dtype=data_dtype, device=device),
            torch.zeros(v_shape, dtype=data_dtype, device=device),
            meta(), meta(), meta(), meta(), bits, page_size, qk_hadamard))
    return layers


def check_hadamard_dim(head_dim: int) -> None:
    if head_dim < 32 or head_dim & (head_dim - 1):
        raise ValueError(f"qk_hadamard needs a power-of-two head_dim >= 32 (a Sylvester Hadamard), got {head_dim}; "
                         "quantize without it (qoq quantize --no-qk-hadamard)")


_HADAMARD: dict[tuple[int, str], torch.Tensor] = {}


def hadamard_matrix(n: int, device) -> torch.Tensor:
    """Normalized Sylvester Hadamard [n, n] in fp32: entry (i, j) = (-1)^popcount(i & j) / sqrt(n)."""
    key = (n, str(device))
    if key not in _HADAMARD:
        i = torch.arange(n)
        bits = i[:, None] & i[None, :]
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        _HADAMARD[key] = ((1 - 2 * parity).float() / n**0.5).to(device)
    return _HADAMARD[key]


def qk_hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (after RoPE) -> x H in fp32 (the rotation of a `qk_hadamard` cache)."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


def quantize_kv_ref(x: torch.Tensor, bits: int):
    """x [..., D] -> (data, scale fp16 [...], zero fp16 [...]) in the cache's stored form."""
    if bits == 16:
        return x.to(torch.float16), None, None
    xf = x.float()
    qmax = 2 ** bits - 1
    mn, mx = xf.amin(-1), xf.amax(-1)
    scale = ((mx - mn) / qmax).to(torch.float16)
    zero = mn.to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(mn))
    q = torch.round((xf - zero.float()[..., None]) / safe[..., None]).clamp(0, qmax).to(torch.uint8)
    if bits == 4:
        lo, hi = q.chunk(2, dim=-1)
        q = lo | (hi << 4)
    return q, scale, zero


def dequantize_kv_ref(data, scale, zero, bits: int, dtype=torch.float16):
    """Inverse of `quantize_kv_ref`, in fp32 math, returned as `dtype`."""
    if bits == 16:
        return data.to(dtype)
    if bits == 4:
        data = torch.cat([data & 0xF, data >> 4], dim=-1)
    return (data.float() * scale.float()[..., None] + zero.float()[..., None]).to(dtype)


@dataclass(frozen=True)
class KVAppend:
    """A decode step's new keys and values, for decode attention to rotate and write itself
    (`paged_decode_attention(..., append=)`, what `rope_kv_write` would do first): one token per
    sequence, rows [B, kv heads, D] (views of the fused qkv output will do), their positions [B],
    the RoPE table and their cache slots [B] (-1: not cached). The query goes unrotated."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def _rope_ref(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def check_rope(q, k, v, positions, cos_sin_cache, slot_mapping, cache):
    t, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d or cos_sin_cache.shape[1] != d:
        raise ValueError(f"shape mismatch q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError("positions and slot_mapping must be [num_tokens]")
    if cache.head_dim != d or cache.num_kv_heads != k.shape[1]:
        raise ValueError("cache layout does not match k: head_dim / num_kv_heads differ")
    if q.shape[1] % k.shape[1]:
        raise ValueError("num_q_heads must be a multiple of num_kv_heads")


def rope_kv_write_ref(q, k, v, positions, cos_sin_cache, slot_mapping, cache: KVCacheLayer):
    """RoPE (HF rotate_half) on q, k (then x H if cache.qk_hadamard); quantize k_rot, v into
    `cache` at slot_mapping (-1 skips); returns (q_rot, k_rot)."""
    check_rope(q, k, v, positions, cos_sin_cache, slot_mapping, cache)
    cs = cos_sin_cache[positions].float()
    cos, sin = cs.chunk(2, dim=-1)
    q_rot = _rope_ref(q, cos[:, None], sin[:, None])
    k_rot = _rope_ref(k, cos[:, None], sin[:, None])
    if cache.qk_hadamard:
        q_rot, k_rot = qk_hadamard_ref(q_rot), qk_hadamard_ref(k_rot)
    q_rot, k_rot = q_rot.to(q.dtype), k_rot.to(k.dtype)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    page, off = slots // cache.page_size, slots % cache.page_size
    for x, data, scale, zero in ((k_rot, cache.codes("k"), cache.k_scale, cache.k_zero),
                                 (v, cache.codes("v"), cache.v_scale, cache.v_zero)):
        if cache.bits == 16:  # stored as the cache holds it (the model's dtype on the CPU), no fp16 detour
            data[page, :, off] = x[valid].to(data.dtype)
            continue
        qd, s, z = quantize_kv_ref(x[valid], cache.bits)
        data[page, :, off] = qd.to(data.dtype)
        if s is not None:
            scale[page, :, off] = s
            zero[page, :, off] = z
    return q_rot, k_rot


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with packed heads (strides (any, D, 1)), copied only when it is not.

    The attention kernels take the token stride as an argument, so q, k and v can stay views of
    the fused qkv projection's output (saves three copies per layer).
    """
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()


@lazy_jit.helper
def hadamard_halves(x1, x2, HALF: tl.constexpr, SPLIT: tl.constexpr, TRANS: tl.constexpr = False):
    """[B, D] = (x1 | x2) halves (fp32, B >= 16) -> the halves of x H, H the normalized Sylvester
    Hadamard of D = 2 HALF: H_D = [[S, S], [S, -S]] / sqrt(D), S = H_HALF unnormalized (+-1).
    TRANS: the halves come transposed, [HALF, B] (B >= 8), and go back so: H x^T (H is symmetric).

    On fp16 tensor cores: S is exact in fp16 and the sums accumulate in fp32; the operand is
    rounded to fp16 (relative error ~3e-4, that of the fp16 q/k the kernel returns), or with
    SPLIT also its fp16 remainder is multiplied (x = hi + lo: fp32-exact, 1.3-1.4x the time). An
    fp32 ("ieee") dot ran on the CUDA cores: 5.8% of a batch-993 decode step."""
    i = tl.arange(0, HALF)[:, None]
    b = i & tl.arange(0, HALF)[None, :]
    b = b ^ (b >> 16)
    b = b ^ (b >> 8)
    b = b ^ (b >> 4)
    b = b ^ (b >> 2)
    b = b ^ (b >> 1)
    s = (1 - 2 * (b & 1)).to(tl.float16)  # (-1)^popcount(i & j)
    norm = 1.0 / tl.sqrt(2.0 * HALF)
    u = x1 + x2
    w = x1 - x2
    u_hi = u.to(tl.float16)
    w_hi = w.to(tl.float16)
    if TRANS:
        y1 = tl.dot(s, u_hi, out_dtype=tl.float32)
        y2 = tl.dot(s, w_hi, out_dtype=tl.float32)
        if SPLIT:
            y1 = tl.dot(s, (u - u_hi.to(tl.float32)).to(tl.float16), y1)
            y2 = tl.dot(s, (w - w_hi.to(tl.float32)).to(tl.float16), y2)
    else:
        y1 = tl.dot(u_hi, s, out_dtype=tl.float32)
        y2 = tl.dot(w_hi, s, out_dtype=tl.float32)
        if SPLIT:
            y1 = tl.dot((u - u_hi.to(tl.float32)).to(tl.float16), s, y1)
            y2 = tl.dot((w - w_hi.to(tl.float32)).to(tl.float16), s, y2)
    return y1 * norm, y2 * norm


@lazy_jit.helper
def _rope_tile(x_ptr, stride, pos_ptr, cs_ptr, t0, h0, T, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
               TOK: tl.constexpr):
    """Rows (token t0 + r // BLOCK_H, head h0 + r % BLOCK_H) of q or k, rotated by RoPE in fp32:
    returns (row tokens, row heads, packed output offsets, row mask, first half, second half)."""
    D = 2 * HALF
    j = tl.arange(0, HALF)[None, :]
    r = tl.arange(0, TOK * BLOCK_H)
    t = t0 + r // BLOCK_H
    h = h0 + (r % BLOCK_H)[:, None]
    m = (h < H) & (t < T)[:, None]
    pos = tl.load(pos_ptr + t, mask=t < T, other=0)[:, None]
    cos = tl.load(cs_ptr + pos * D + j).to(tl.float32)
    sin = tl.load(cs_ptr + pos * D + HALF + j).to(tl.float32)
    t64 = t.to(tl.int64)[:, None]
    x_in = t64 * stride + h * D + j
    x1 = tl.load(x_ptr + x_in, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_in + HALF, mask=m, other=0.0).to(tl.float32)
    return t, h, (t64 * H + h) * D + j, m, x1 * cos - x2 * sin, x2 * cos + x1 * sin


@lazy_jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, qo_ptr, ko_ptr,
    kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
    T, HQ, HKV, PAGE_SIZE, stride_q, stride_k, stride_v,
    HALF: tl.constexpr, BITS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    HADAMARD: tl.constexpr, TOK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False,
):
    """TOK tokens per program. Axis 1: programs 0 .. n-2 rotate BLOCK_HQ query heads each, the
    last one the keys (and writes K and V to the cache). A tile row is one (token, head), row
    r = token * BLOCK_H + head."""
    pdl_enter(PDL)
    t0 = tl.program_id(0) * TOK
    role = tl.program_id(1)
    if role < tl.num_programs(1) - 1:
        # Inputs may be row views of the fused qkv output (token stride > heads * D); outputs are packed.
        _, _, q_off, qm, a1, a2 = _rope_tile(q_ptr, stride_q, pos_ptr, cs_ptr, t0, role * BLOCK_HQ, T, HQ, HALF,
                                             BLOCK_HQ, TOK)
        if HADAMARD:
            a1, a2 = hadamard_halves(a1, a2, HALF, SPLIT)
        tl.store(qo_ptr + q_off, a1.to(qo_ptr.dtype.element_ty), mask=qm)
        tl.store(qo_ptr + q_off + HALF, a2.to(qo_ptr.dtype.element_ty), mask=qm)
    else:
        _write_kv(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, ko_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
                  t0, T, HKV, PAGE_SIZE, stride_k, stride_v, HALF, BITS, BLOCK_HKV, HADAMARD, TOK, SPLIT)


@lazy_jit.helper
def _write_kv(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, ko_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
              t0, T, HKV, PAGE_SIZE, stride_k, stride_v, HALF: tl.constexpr, BITS: tl.constexpr,
              BLOCK_HKV: tl.constexpr, HADAMARD: tl.constexpr, TOK: tl.constexpr, SPLIT: tl.constexpr):
    """The keys of TOK tokens rotated (returned in ko) and quantized into the cache with the values."""
    tk, hk, k_off, km, r1, r2, v1, v2 = _rope_kv_rows(k_ptr, v_ptr, pos_ptr, cs_ptr, t0, 0, T, HKV, stride_k, stride_v,
                                                      HALF, BLOCK_HKV, HADAMARD, TOK, SPLIT, ko_ptr.dtype.element_ty)
    tl.store(ko_ptr + k_off, r1, mask=km)
    tl.store(ko_ptr + k_off + HALF, r2, mask=km)
    slot = tl.load(slot_ptr + tk, mask=tk < T, other=-1).to(tl.int64)[:, None]
    _store_kv_rows(r1, r2, v1, v2, slot, hk, km, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, HKV, PAGE_SIZE,
                   HALF, BITS)


@lazy_jit.helper
def _rope_kv_rows(k_ptr, v_ptr, pos_ptr, cs_ptr, t0, h0, T, HKV, stride_k, stride_v, HALF: tl.constexpr,
                  BLOCK_HKV: tl.constexpr, HADAMARD: tl.constexpr, TOK: tl.constexpr, SPLIT: tl.constexpr,
                  DTYPE: tl.constexpr):
    """Rows (token, kv head) of k rotated (and x H) and rounded to DTYPE, the cache's input, with
    their v: (row tokens, row heads, packed k offsets, row mask, k halves, v halves)."""
    j = tl.arange(0, HALF)[None, :]
    tk, hk, k_off, km, b1, b2 = _rope_tile(k_ptr, stride_k, pos_ptr, cs_ptr, t0, h0, T, HKV, HALF, BLOCK_HKV, TOK)
    if HADAMARD:
        b1, b2 = hadamard_halves(b1, b2, HALF, SPLIT)
    v_in = tk.to(tl.int64)[:, None] * stride_v + hk * (2 * HALF) + j
    v1 = tl.load(v_ptr + v_in, mask=km, other=0.0)
    v2 = tl.load(v_ptr + v_in + HALF, mask=km, other=0.0)
    # k rounded to the output dtype first: the cache holds quantize(returned k_rot)
    return tk, hk, k_off, km, b1.to(DTYPE), b2.to(DTYPE), v1, v2


@lazy_jit.helper
def _store_kv_rows(r1, r2, v1, v2, slot, hk, km, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, HKV, PAGE_SIZE,
                   HALF: tl.constexpr, BITS: tl.constexpr):
    """K and V halves of rows (slot [rows, 1], kv head hk [rows, 1]) quantized into the cache:
    per row the scale / zero of its min and max; slot -1 (or a row off km) writes nothing."""
    j = tl.arange(0, HALF)[None, :]
    D = 2 * HALF
    wm = km & (slot >= 0)  # slot -1: the token is not cached
    slot = tl.maximum(slot, 0)
    row = (slot // PAGE_SIZE * HKV + hk) * PAGE_SIZE + slot % PAGE_SIZE  # [rows, 1]
    if BITS == 16:
        tl.store(kc_ptr + row * D + j, r1.to(tl.float16), mask=wm)
        tl.store(kc_ptr + row * D + HALF + j, r2.to(tl.float16), mask=wm)
        tl.store(vc_ptr + row * D + j, v1.to(tl.float16), mask=wm)
        tl.store(vc_ptr + row * D + HALF + j, v2.to(tl.float16), mask=wm)
    else:
        QMAX: tl.constexpr = 2 ** BITS - 1
        W: tl.constexpr = HALF if BITS == 4 else 2 * HALF  # bytes per token-head
        for which in tl.static_range(2):
            if which == 0:
                x1 = r1.to(tl.float32)
                x2 = r2.to(tl.float32)
                c_ptr, s_ptr, z_ptr = kc_ptr, ks_ptr, kz_ptr
            else:
                x1 = v1.to(tl.float32)
                x2 = v2.to(tl.float32)
                c_ptr, s_ptr, z_ptr = vc_ptr, vs_ptr, vz_ptr
            mn = tl.minimum(tl.min(x1, axis=1), tl.min(x2, axis=1))[:, None]
            mx = tl.maximum(tl.max(x1, axis=1), tl.max(x2, axis=1))[:, None]
            scale = ((mx - mn) / QMAX).to(tl.float16)
            zero = mn.to(tl.float16)
            sf = scale.to(tl.float32)
            safe = tl.where(sf > 0, sf, 1.0)
            zf = zero.to(tl.float32)
            c1 = ((x1 - zf) / safe + 12582912.0) - 12582912.0
            c2 = ((x2 - zf) / safe + 12582912.0) - 12582912.0
            c1 = tl.minimum(tl.maximum(c1, 0.0), QMAX).to(tl.uint8)
            c2 = tl.minimum(tl.maximum(c2, 0.0), QMAX).to(tl.uint8)
            if which == 0:
                c_off = row * W + j
                c_step = 1  # K: token-major, byte j of the token's row
            else:
                c_off = (row - row % PAGE_SIZE) * W + row % PAGE_SIZE + j * PAGE_SIZE
                c_step = PAGE_SIZE  # V: transposed per page, byte (j, o) of the page-head block
            if BITS == 4:
                tl.store(c_ptr + c_off, c1 | (c2 << 4), mask=wm)
            else:
                tl.store(c_ptr + c_off, c1, mask=wm)
                tl.store(c_ptr + c_off + HALF * c_step, c2, mask=wm)
            tl.store(s_ptr + row, scale, mask=wm)
            tl.store(z_ptr + row, zero, mask=wm)


@lazy_jit.helper
def append_kv_head(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h,
                   HKV, PAGE_SIZE, stride_k, stride_v, HALF: tl.constexpr, BITS: tl.constexpr,
                   HADAMARD: tl.constexpr, SPLIT: tl.constexpr):
    """Decode attention's own K/V write (`KVAppend`): token b's key of kv head h rotated (and x H)
    and quantized into the cache with its value, as `_write_kv` writes it. The tile has 16 rows,
    heads h .. h + 15 (the Hadamard's MMA needs 16), of which only h is written."""
    tk, hk, _, km, r1, r2, v1, v2 = _rope_kv_rows(k_ptr, v_ptr, pos_ptr, cs_ptr, b, h, b + 1, HKV, stride_k,
                                                  stride_v, HALF, 16, HADAMARD, 1, SPLIT, k_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + tk).to(tl.int64)[:, None]
    _store_kv_rows(r1, r2, v1, v2, slot, hk, km & (hk == h), kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, HKV,
                   PAGE_SIZE, HALF, BITS)


# Tokens per program: with the q/k Hadamard, 4 tokens share the +-1 matrix and make taller MMAs,
# about twice as fast on the H100 as one token (benchmarks/results/rope-probe-h100.json).
ROPE_TOKENS = {False: 1, True: 4}
ROPE_PREFILL_TOKENS = 64  # from this many tokens on, ROPE_TOKENS tokens per program (rope_options)


def rope_options(tokens: int, num_q_heads: int, qk_hadamard: bool) -> dict:
    """Tokens and query heads per program. Prefill-sized batches: ROPE_TOKENS tokens with all their
    heads. A decode step of a few sequences would then be a few programs that each walk 32 heads
    (10 us for one token on the H100): one token per program, the query heads spread over programs
    of 16 (8 without the Hadamard, which needs 16 rows per tile)."""
    if tokens >= ROPE_PREFILL_TOKENS:
        return {"TOK": ROPE_TOKENS[qk_hadamard], "HEADS": num_q_heads}
    return {"TOK": 1, "HEADS": 16 if qk_hadamard else 8}


def rope_kv_write_triton(q, k, v, positions, cos_sin_cache, slot_mapping, cache: KVCacheLayer, options=None):
    check_rope(q, k, v, positions, cos_sin_cache, slot_mapping, cache)
    q, k, v = (token_rows(x) for x in (q, k, v))
    t, hq, d = q.shape
    hkv = k.shape[1]
    if d & (d - 1):
        raise ValueError(f"the Triton rope_kv_write needs a power-of-two head_dim, got {d}")
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_rot, k_rot
    opts = {**rope_options(t, hq, cache.qk_hadamard), "num_warps": 4, "SPLIT": False, **(options or {})}
    tok = opts["TOK"]
    # The Hadamard is a tl.dot over the tile's rows, which needs at least 16 of them.
    min_heads = -(-16 // tok) if cache.qk_hadamard else 1
    block_hq = max(min_heads, triton.next_power_of_2(min(opts["HEADS"], hq)))
    meta = [cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero]
    meta = [m if m is not None else cache.k_cache for m in meta]
    _rope_kv_write_kernel[(triton.cdiv(t, tok), triton.cdiv(hq, block_hq) + 1)](
        q, k, v, positions, cos_sin_cache.contiguous(), slot_mapping, q_rot, k_rot,
        cache.k_cache, cache.v_cache, *meta, t, hq, hkv, cache.page_size, q.stride(0), k.stride(0), v.stride(0),
        HALF=d // 2, BITS=cache.bits, BLOCK_HQ=block_hq,
        BLOCK_HKV=max(min_heads, triton.next_power_of_2(hkv)), HADAMARD=cache.qk_hadamard, TOK=tok,
        SPLIT=opts["SPLIT"], num_warps=opts["num_warps"], **pdl_launch(q),
    )
    return q_rot, k_rot


rope_kv_write = dispatch(rope_kv_write_ref, rope_kv_write_triton)
