import dataclasses

import pytest
import torch
from conftest import requires_cuda
from helpers import as_fused_qkv_views, cos_sin_cache, rel_err, sass_report

from qoq.kernels import dispatch
from qoq.kernels.decode_attention import (
    DecodePlan,
    gather_kv_ref,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from qoq.kernels.kv_cache import KVAppend, allocate_kv_cache, quantize_kv_ref, rope_kv_write_ref, rope_kv_write_triton
from qoq.kernels.paged_prefill_attention import (
    paged_prefill_attention_ref,
    paged_prefill_attention_triton,
    prefill_work,
    prefill_work_capacity,
)
from qoq.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton


def random_cache(num_pages, hkv, d, page, bits, device, gen):
    cache = allocate_kv_cache(1, num_pages, hkv, d, page_size=page, bits=bits, device=device)[0]
    for which in ("k", "v"):
        x = torch.randn(num_pages, hkv, page, d, generator=gen)
        data, scale, zero = quantize_kv_ref(x, bits)
        cache.codes(which).copy_(data)
        if scale is not None:
            getattr(cache, f"{which}_scale").copy_(scale)
            getattr(cache, f"{which}_zero").copy_(zero)
    return cache


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("page,num_splits,options", [
    (16, None, None),  # one page per iteration
    (16, 1, dict(BLOCK_T=32)), (16, 3, dict(BLOCK_T=32)), (16, 1, dict(BLOCK_T=64)),  # whole pages per iteration
    (32, 2, dict(BLOCK_T=16)), (32, 1, dict(BLOCK_T=16, NUM_STAGES=3)),  # part of a page per iteration
    # K codes as exact values instead of the default 1024 + code with the bias taken off per row
    (16, None, dict(BIASED=False)), (16, 3, dict(BLOCK_T=32, BIASED=False)), (32, 2, dict(BLOCK_T=16, BIASED=False)),
    # both kernels at every precision: rows = query heads (SWAP off) or rows = tokens (SWAP on)
    (16, None, dict(SWAP=False)), (16, 3, dict(BLOCK_T=32, SWAP=True)), (32, 2, dict(BLOCK_T=16, SWAP=True)),
    (16, 1, dict(BLOCK_T=64, SWAP=True)), (16, None, dict(SWAP=True, BIASED=False)),
    # V codes kept as 1024 + code too, each page's bias taken off the accumulator before its MMA
    (16, None, dict(SWAP=True, BIASED_V=True)), (32, 2, dict(BLOCK_T=16, SWAP=True, BIASED_V=True)),
    (16, 3, dict(BLOCK_T=32, SWAP=False, BIASED_V=True)),
    # the transposed kernel with the next block's scores computed alongside this one's softmax
    (16, None, dict(SWAP=True, SKEW=True)), (32, 2, dict(BLOCK_T=16, SWAP=True, SKEW=True, BIASED_V=True))])
def test_decode_matches_ref(bits, page, num_splits, options, device, gen, poison):
    b, hq, hkv, d = 3, 8, 2, 32
    pages = 64 // page
    cache = random_cache(b * pages, hkv, d, page, bits, device, gen)
    block_tables = torch.randperm(b * pages, generator=gen).reshape(b, pages).int().to(device)
    lens = torch.tensor([5, 64, 33], dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    ref = paged_decode_attention_ref(q, cache, block_tables, lens, d ** -0.5)
    for _ in range(2):  # split-K merges in the launch: its arrival counters must be reset each time
        out = paged_decode_attention_triton(q, cache, block_tables, lens, d ** -0.5,
                                            num_splits=num_splits, options=options)
        assert rel_err(out, ref) < 3e-3  # P and q go through fp16 into the MMA
    assert all(int(c.abs().sum()) == 0 for c in dispatch._ARRIVAL_COUNTERS.values())


@pytest.mark.parametrize("swap", [True, False])
def test_decode_split_merge_of_short_contexts(swap, device, gen, poison):
    """A launch split for the longest context (8 splits) over shorter ones: the merge reads only
    the splits that hold pages (7, crossing its unrolled chunks; 1), every other split is empty."""
    b, hq, hkv, d, page = 3, 8, 2, 32, 16
    cache = random_cache(24, hkv, d, page, 4, device, gen)
    bt = torch.randperm(24, generator=gen).reshape(b, 8).int().to(device)
    lens = torch.tensor([100, 7, 128], dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    ref = paged_decode_attention_ref(q, cache, bt, lens, d ** -0.5)
    for _ in range(2):
        out = paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, num_splits=8,
                                            options=dict(BLOCK_T=16, SWAP=swap))
        assert rel_err(out, ref) < 3e-3
    # at least 3 blocks per split (the plan's min_split_blocks): 3 + 3 + 1 splits of the 7-block
    # context, 3 + 3 + 2 of the 8-block one, the rest empty
    plan = DecodePlan(transposed=swap, biased=True, min_split_blocks=3)
    for _ in range(2):
        out = paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, num_splits=8, plan=plan,
                                            options=dict(BLOCK_T=16))
        assert rel_err(out, ref) < 3e-3
    assert all(int(c.abs().sum()) == 0 for c in dispatch._ARRIVAL_COUNTERS.values())


@pytest.mark.parametrize("swap", [True, False])
def test_decode_at_a_small_batch_with_more_warps(swap, device, gen, poison):
    """A latency plan's several warps per program (batch 1: the step waits on one program), split
    or not: the twin's result."""
    plan = DecodePlan(transposed=swap, biased=True, num_warps=4)
    b, hq, hkv, d, page = 1, 8, 2, 32, 16
    cache = random_cache(8, hkv, d, page, 4, device, gen)
    bt = torch.randperm(8, generator=gen).reshape(b, 8).int().to(device)
    lens = torch.tensor([117], dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    ref = paged_decode_attention_ref(q, cache, bt, lens, d ** -0.5)
    for splits in (1, 2, 8):
        out = paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, num_splits=splits, plan=plan)
        assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("chains,page,num_splits,options", [
    (2, 16, 1, None), (2, 16, 3, None), (4, 16, 1, dict(BIASED_V=True)), (4, 16, 2, dict(BIASED=False)),
    (2, 32, 8, dict(BLOCK_T=16, NUM_STAGES=3)),  # half a page per block
    (8, 16, 1, None)])  # a chain per block of the longest context
def test_decode_chains_match_ref(bits, chains, page, num_splits, options, device, gen, poison):
    """Several chains (a warp each) per program, merged in the program: contexts of fewer blocks
    than chains (chains without a token), of a ragged last step, and launches split for the
    longest context, whose short sequences leave whole splits and chains empty."""
    b, hq, hkv, d = 4, 8, 2, 32
    pages = 128 // page
    cache = random_cache(b * pages, hkv, d, page, bits, device, gen)
    bt = torch.randperm(b * pages, generator=gen).reshape(b, pages).int().to(device)
    lens = torch.tensor([5, 128, 33, 97], dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    ref = paged_decode_attention_ref(q, cache, bt, lens, d ** -0.5)
    plan = DecodePlan(transposed=True, biased=True, chains=chains)
    options = options and {**options, "CHAINS": chains}  # options name the whole variant
    for _ in range(2):
        out = paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, num_splits=num_splits, plan=plan,
                                            options=options)
        assert rel_err(out, ref) < 3e-3
    assert all(int(c.abs().sum()) == 0 for c in dispatch._ARRIVAL_COUNTERS.values())


def _append_case(bits, hadamard, b, hkv, hq, d, page, pages, lens, device, gen):
    """Two copies of a random cache, a decode step's unrotated q / k / v as views of one qkv
    tensor, and its KVAppend (the new token at position len - 1; the last row's slot -1: a padded
    row, whose cache stays as it was)."""
    cache = dataclasses.replace(random_cache(b * pages, hkv, d, page, bits, device, gen), qk_hadamard=hadamard)
    twin = dataclasses.replace(cache, **{f.name: getattr(cache, f.name).clone() for f in dataclasses.fields(cache)
                                         if isinstance(getattr(cache, f.name), torch.Tensor)})
    bt = torch.randperm(b * pages, generator=gen).reshape(b, pages).int().to(device)
    lens = torch.tensor(lens, dtype=torch.int32, device=device)
    pos = (lens - 1).long()
    slots = bt.long().gather(1, (pos // page)[:, None])[:, 0] * page + pos % page
    slots[-1] = -1
    q, k, v = as_fused_qkv_views(*(torch.randn(b, h, d, generator=gen).half().to(device) for h in (hq, hkv, hkv)))
    return cache, twin, bt, lens, q, KVAppend(k, v, pos, cos_sin_cache(int(lens.max()), d).to(device), slots)


@pytest.mark.parametrize("bits,hadamard,plan", [
    (4, False, DecodePlan(transposed=True, biased=True)), (4, True, DecodePlan(transposed=True, biased=True)),
    (4, True, DecodePlan(transposed=True, biased=True, chains=4)), (8, True, DecodePlan(biased=True)),
    (8, False, DecodePlan(transposed=True, biased=True, chains=2)), (16, True, DecodePlan(num_warps=2))])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_append_is_rope_kv_write_then_decode(bits, hadamard, plan, num_splits, device, gen, poison):
    """KVAppend: the launch rotates q itself and the program holding each context's last token
    writes its key and value before reading it: the cache bytes that rope_kv_write writes, and
    the output of attention over them (row kernel, transposed, chained; split or not)."""
    b, hq, hkv, d, page = 4, 8, 2, 32, 16
    cache, twin, bt, lens, q, app = _append_case(bits, hadamard, b, hkv, hq, d, page, 4, [5, 64, 33, 17], device, gen)
    q_rot, _ = rope_kv_write_triton(q, app.k, app.v, app.positions, app.cos_sin_cache, app.slot_mapping, twin)
    want = paged_decode_attention_triton(q_rot, twin, bt, lens, d ** -0.5, num_splits=num_splits, plan=plan)
    ref = paged_decode_attention_ref(q_rot, twin, bt, lens, d ** -0.5)
    out = paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, num_splits=num_splits, plan=plan, append=app)
    for f in ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero"):
        if getattr(cache, f) is not None:
            assert torch.equal(getattr(cache, f), getattr(twin, f)), f
    assert torch.equal(out, want) and rel_err(out, ref) < 3e-3


def test_decode_append_ref_is_rope_kv_write_ref_then_decode(device, gen):
    """The twin of the fused launch: rope_kv_write_ref, then attention over the rotated q."""
    cache, twin, bt, lens, q, app = _append_case(4, True, 3, 2, 4, 32, 16, 4, [9, 40, 64], device, gen)
    out = paged_decode_attention_ref(q, cache, bt, lens, 0.2, append=app)
    q_rot, _ = rope_kv_write_ref(q, app.k, app.v, app.positions, app.cos_sin_cache, app.slot_mapping, twin)
    assert torch.equal(out, paged_decode_attention_ref(q_rot, twin, bt, lens, 0.2))
    assert torch.equal(cache.k_cache, twin.k_cache) and torch.equal(cache.v_scale, twin.v_scale)


@pytest.mark.parametrize("plan,bits", [(DecodePlan(chains=2), 4), (DecodePlan(transposed=True, chains=2), 16),
                                       (DecodePlan(transposed=True, chains=2, skew=True), 4),
                                       (DecodePlan(transposed=True, chains=2, block_t=32), 4)])
def test_decode_chains_reject_what_they_cannot_run(plan, bits, device, gen):
    cache = random_cache(2, 2, 32, 16, bits, device, gen)
    q = torch.randn(1, 4, 32, generator=gen).half().to(device)
    bt = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([20], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="chains run the transposed kernel"):
        paged_decode_attention_triton(q, cache, bt, lens, 0.2, plan=plan)


@pytest.mark.parametrize("hq,swap", [(2, True), (2, False), (16, True), (16, False)])
def test_decode_group_sizes(hq, swap, device, gen, poison):
    """GQA groups of 1 (MHA, Llama-2-7B) and 8 (Llama-2-70B), which pad to the MMA differently:
    group rows to 16 (SWAP off) or group columns to 8 (SWAP on)."""
    b, hkv, d, page = 2, 2, 32, 16
    cache = random_cache(8, hkv, d, page, 4, device, gen)
    bt = torch.randperm(8, generator=gen).reshape(b, 4).int().to(device)
    lens = torch.tensor([50, 23], dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    ref = paged_decode_attention_ref(q, cache, bt, lens, d ** -0.5)
    out = paged_decode_attention_triton(q, cache, bt, lens, d ** -0.5, num_splits=2, options=dict(SWAP=swap))
    assert rel_err(out, ref) < 3e-3


def test_decode_ref_matches_float64_loop(device, gen):
    """Independent check: per-sequence, per-head float64 softmax attention over gathered KV."""
    b, hq, hkv, d, page = 2, 4, 2, 32, 16
    cache = random_cache(6, hkv, d, page, 4, device, gen)
    bt = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, generator=gen).half().to(device)
    k, v = gather_kv_ref(cache, bt, "k", torch.float64), gather_kv_ref(cache, bt, "v", torch.float64)
    ref = paged_decode_attention_ref(q, cache, bt, lens, 0.2)
    for i in range(b):
        for h in range(hq):
            kk, vv = k[i, h // 2, : lens[i]], v[i, h // 2, : lens[i]]
            p = torch.softmax(kk @ q[i, h].double() * 0.2, dim=0)
            assert rel_err(ref[i, h], p @ vv) < 2e-3


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_prefill_matches_ref(hq, hkv, fused, device, gen, poison):
    cu = torch.tensor([0, 5, 5, 40, 57], dtype=torch.int32, device=device)
    t, d = 57, 32
    q = torch.randn(t, hq, d, generator=gen).half().to(device)
    k = torch.randn(t, hkv, d, generator=gen).half().to(device)
    v = torch.randn(t, hkv, d, generator=gen).half().to(device)
    ref = prefill_attention_ref(q, k, v, cu, d ** -0.5)
    args = as_fused_qkv_views(q, k, v) if fused else (q, k, v)  # strided views: read in place
    assert rel_err(prefill_attention_triton(*args, cu, d ** -0.5), ref) < 3e-3
    # independent: torch SDPA per sequence (causal), float64
    for s, e in ((0, 5), (5, 40), (40, 57)):
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(hq // hkv, 0), vs.repeat_interleave(hq // hkv, 0)
        exp = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                               scale=d ** -0.5)
        assert rel_err(ref[s:e], exp.transpose(0, 1)) < 1e-3


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_prefill_and_decode_fill_one_output_in_place(impl, device, gen):
    """A mixed step: prefill rows then decode rows of one buffer (out=), no concatenation."""
    prefill = prefill_attention_triton if impl == "triton" else prefill_attention_ref
    decode = paged_decode_attention_triton if impl == "triton" else paged_decode_attention_ref
    hq, hkv, d, page = 4, 2, 32, 16
    cu = torch.tensor([0, 9, 30], dtype=torch.int32, device=device)
    q = torch.randn(32, hq, d, generator=gen).half().to(device)  # 30 prefill rows, then 2 decodes
    k, v = (torch.randn(30, hkv, d, generator=gen).half().to(device) for _ in range(2))
    cache = random_cache(4, hkv, d, page, 4, device, gen)
    bt = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 7], dtype=torch.int32, device=device)
    out = torch.full_like(q, float("nan"))
    assert prefill(q[:30], k, v, cu, d ** -0.5, 21, out=out[:30]).data_ptr() == out.data_ptr()
    decode(q[30:], cache, bt, lens, d ** -0.5, out=out[30:])
    assert torch.equal(out[:30], prefill(q[:30], k, v, cu, d ** -0.5, 21))
    assert torch.equal(out[30:], decode(q[30:], cache, bt, lens, d ** -0.5))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        decode(q[30:], cache, bt, lens, d ** -0.5, out=out[30:, :2])


@requires_cuda
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("options", [None, dict(BIASED=False), dict(SWAP=False), dict(SWAP=True),
                                     dict(SWAP=True, BIASED_V=True), dict(SWAP=False, BIASED_V=True),
                                     dict(SWAP=True, SKEW=True)])
def test_decode_real_shapes_gpu(bits, options, gen, poison):
    q, cache, bt, lens, ref = _real_shape_case(bits, gen)
    assert rel_err(paged_decode_attention_triton(q, cache, bt, lens, 128 ** -0.5, options=options), ref) < 3e-3


def _real_shape_case(bits, gen):
    """Llama-3-8B's heads at batch 16, random contexts up to 4,096: (q, cache, block tables,
    lengths, the twin's output)."""
    b, hq, hkv, d, page, ctx = 16, 32, 8, 128, 64, 4096
    pages = ctx // page
    cache = random_cache(b * pages, hkv, d, page, bits, "cuda", gen)
    bt = torch.randperm(b * pages, generator=gen).reshape(b, pages).int().cuda()
    lens = torch.randint(1, ctx + 1, (b,), generator=gen).int().cuda()
    q = torch.randn(b, hq, d, generator=gen).half().cuda()
    return q, cache, bt, lens, paged_decode_attention_ref(q, cache, bt, lens, d ** -0.5)


@requires_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("chains,num_splits", [(2, None), (2, 3), (4, None)])
def test_decode_chains_real_shapes_gpu(bits, chains, num_splits, gen, poison):
    q, cache, bt, lens, ref = _real_shape_case(bits, gen)
    plan = DecodePlan(transposed=True, biased=True, chains=chains)
    out = paged_decode_attention_triton(q, cache, bt, lens, 128 ** -0.5, num_splits=num_splits, plan=plan)
    assert rel_err(out, ref) < 3e-3


@requires_cuda
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_decode_append_real_shapes_gpu(bits, gen, poison):
    """KVAppend at Llama-3-8B's heads with the q/k Hadamard, contexts up to 4,096: the cache bytes
    of rope_kv_write and attention over them, with the table's plans."""
    lens = torch.randint(1, 4097, (16,), generator=gen).tolist()
    cache, twin, bt, lens, q, app = _append_case(bits, True, 16, 8, 32, 128, 64, 64, lens, "cuda", gen)
    q_rot, _ = rope_kv_write_triton(q, app.k, app.v, app.positions, app.cos_sin_cache, app.slot_mapping, twin)
    want = paged_decode_attention_triton(q_rot, twin, bt, lens, 128 ** -0.5)
    out = paged_decode_attention_triton(q, cache, bt, lens, 128 ** -0.5, append=app)
    for which in ("k", "v"):  # codes within one step (the Hadamard's MMA may round k differently)
        a, b = cache.codes(which), twin.codes(which)
        if bits == 16:
            assert rel_err(a.float(), b.float()) < 1e-3
            continue
        a, b = a.int(), b.int()
        if bits == 4:
            a, b = torch.stack([a & 15, a >> 4]), torch.stack([b & 15, b >> 4])
        assert (a - b).abs().max() <= 1
    assert rel_err(out, want) < 1e-3 and rel_err(out, paged_decode_attention_ref(q_rot, twin, bt, lens, 128 ** -0.5)) < 3e-3


@requires_cuda
def test_prefill_real_shapes_gpu(gen, poison):
    cu = torch.tensor([0, 1000, 3048], dtype=torch.int32).cuda()
    q, k, v = (torch.randn(3048, h, 128, generator=gen).half().cuda() for h in (32, 8, 8))
    ref = prefill_attention_ref(q, k, v, cu, 128 ** -0.5)
    assert rel_err(prefill_attention_triton(q, k, v, cu, 128 ** -0.5), ref) < 3e-3


def test_transposed_decode_kernel_needs_fewer_registers_sm90():
    """Why the KV4 default is the transposed kernel: on sm_90 it fits 12 one-warp programs per SM
    (<= 168 registers) where the row kernel fits 8, without spilling."""
    swap, row = sass_report("decode", "--bits", "4", "--swap", "1"), sass_report("decode", "--bits", "4", "--swap", "0")
    assert int(swap["stack"]) == 0 and int(swap["registers"]) <= 168 < int(row["registers"])
    assert int(swap["loop_instructions"]) < int(row["loop_instructions"])


def test_biased_v_drops_the_v_unpack_subtractions_sm90():
    """DecodePlan.biased_v: the V codes' four fp16 subtractions per word leave the transposed
    KV4 kernel's page loop (sm_90: 1103 -> 1027 instructions, 128 HADD2 -> 0, a column sum of P
    added) at the same registers, so the same 12 programs per SM."""
    base = sass_report("decode", "--bits", "4", "--swap", "1")
    biased = sass_report("decode", "--bits", "4", "--swap", "1", "--biased-v", "1")
    assert int(biased["stack"]) == 0 and int(biased["registers"]) <= 168
    assert int(biased["loop_instructions"]) <= int(base["loop_instructions"]) - 60


def test_decode_chains_keep_a_warps_loop_sm90():
    """DecodePlan.chains: each warp of a chained program runs the one-warp transposed kernel's
    page loop (within a few instructions: the chain's block index), nothing spilled, at most 255
    registers (8 warps per SM: 4 programs of two chains)."""
    one = sass_report("decode", "--bits", "4", "--swap", "1")
    two = sass_report("decode", "--bits", "4", "--chains", "2")
    assert int(two["stack"]) == 0 and int(two["registers"]) <= 255
    assert abs(int(two["loop_instructions"]) - int(one["loop_instructions"])) <= 40


# -- paged prefill: chunks that read their context (and themselves) from the pages ---------------


def _paged_prefill_case(b_q_lens, kv_lens, hq, hkv, d, page, bits, device, gen):
    max_pages = max(-(-n // page) for n in kv_lens)
    cache = random_cache(len(kv_lens) * max_pages, hkv, d, page, bits, device, gen)
    bt = torch.randperm(len(kv_lens) * max_pages, generator=gen).reshape(len(kv_lens), max_pages).int().to(device)
    cu = torch.tensor([0, *torch.tensor(b_q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).half().to(device)
    return q, cache, bt, cu, torch.tensor(kv_lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("hq,hkv,rows", [(4, 2, 16), (3, 1, 16), (2, 2, 32), (8, 2, 64)])
def test_paged_prefill_matches_ref(bits, hq, hkv, rows, device, gen, poison):
    # chunks with and without earlier context, an empty one, a one-token one, a partial last page
    q_lens, kv_lens = [5, 0, 37, 1, 16], [5, 3, 60, 20, 16]
    q, cache, bt, cu, lens = _paged_prefill_case(q_lens, kv_lens, hq, hkv, 32, 16, bits, device, gen)
    ref = paged_prefill_attention_ref(q, cache, bt, cu, lens, 32 ** -0.5)
    out = paged_prefill_attention_triton(q, cache, bt, cu, lens, 32 ** -0.5, options=dict(ROWS=rows))
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("bits", [4, 16])
def test_paged_prefill_work_list_matches_ref(bits, device, gen, poison):
    """A mixed step as one launch whose grid depends on its capacity only (what a CUDA graph holds):
    prefill chunks, decode rows as one-token chunks over their context, and chunks of no tokens
    (a graph's padding sequences); the list's unused programs do nothing."""
    q_lens, kv_lens = [37, 1, 1, 0, 16, 1, 0], [60, 20, 45, 7, 16, 33, 1]
    hq, hkv, rows = 8, 2, 16
    q, cache, bt, cu, lens = _paged_prefill_case(q_lens, kv_lens, hq, hkv, 32, 16, bits, device, gen)
    cuda = device == "cuda"
    opts = dict(ROWS=rows)
    capacity = prefill_work_capacity(sum(q_lens), len(q_lens), hq // hkv, cuda, opts)
    work = prefill_work(q_lens, hq // hkv, cuda, capacity, opts).to(device)
    assert (work[:, 0] >= 0).sum() == sum(-(-n // (rows // 4)) for n in q_lens) < capacity
    ref = paged_prefill_attention_ref(q, cache, bt, cu, lens, 32 ** -0.5)
    out = paged_prefill_attention_triton(q, cache, bt, cu, lens, 32 ** -0.5, options=opts, work=work)
    assert rel_err(out, ref) < 3e-3
    with pytest.raises(ValueError, match="do not fit"):
        prefill_work(q_lens, hq // hkv, cuda, 3, opts)


@pytest.mark.parametrize("seed", range(20))
def test_prefill_work_capacity_bounds_any_step(seed):
    g = torch.Generator().manual_seed(seed)
    num_tokens, max_seqs = int(torch.randint(1, 600, (1,), generator=g)), int(torch.randint(1, 100, (1,), generator=g))
    cuts = sorted(torch.randint(0, num_tokens + 1, (min(max_seqs, num_tokens) - 1,), generator=g).tolist())
    q_lens = [b - a for a, b in zip([0, *cuts], [*cuts, num_tokens])]
    for group, cuda in ((4, True), (1, False), (8, True)):
        capacity = prefill_work_capacity(num_tokens, max_seqs, group, cuda)
        assert prefill_work(q_lens, group, cuda, capacity).shape == (capacity, 2)


def test_paged_prefill_ref_against_float64_and_the_fresh_kernel(device, gen):
    """Independent: float64 softmax per query over the gathered, dequantized cache; and with no
    earlier context over a KV16 cache, the same bits as prefill_attention_ref on the same K/V."""
    hq, hkv, d, page = 4, 2, 32, 16
    q, cache, bt, cu, lens = _paged_prefill_case([7, 20], [30, 20], hq, hkv, d, page, 4, device, gen)
    ref = paged_prefill_attention_ref(q, cache, bt, cu, lens, 0.3)
    k, v = gather_kv_ref(cache, bt, "k", torch.float64), gather_kv_ref(cache, bt, "v", torch.float64)
    for b, (start, q_len, kv_len) in enumerate(((0, 7, 30), (7, 20, 20))):
        for i in range(q_len):
            pos = kv_len - q_len + i
            for h in range(hq):
                kk, vv = k[b, h // 2, : pos + 1], v[b, h // 2, : pos + 1]
                p = torch.softmax(kk @ q[start + i, h].double() * 0.3, dim=0)
                assert rel_err(ref[start + i, h], p @ vv) < 2e-3
    q16, cache16, bt16, cu16, lens16 = _paged_prefill_case([9, 30], [9, 30], hq, hkv, d, page, 16, device, gen)
    keys, values = (gather_kv_ref(cache16, bt16, w, torch.float16) for w in ("k", "v"))
    fresh_k = torch.cat([keys[0, :, :9], keys[1, :, :30]], 1).transpose(0, 1)
    fresh_v = torch.cat([values[0, :, :9], values[1, :, :30]], 1).transpose(0, 1)
    assert torch.equal(paged_prefill_attention_ref(q16, cache16, bt16, cu16, lens16, 0.3),
                       prefill_attention_ref(q16, fresh_k, fresh_v, cu16, 0.3))


@requires_cuda
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_paged_prefill_real_shapes_gpu(bits, gen, poison):
    """Llama-3-8B heads, 64-token pages: a 1024-token chunk after 3072 cached tokens, a whole
    prompt, and a short tail."""
    q, cache, bt, cu, lens = _paged_prefill_case([1024, 2000, 77], [4096, 2000, 1101], 32, 8, 128, 64, bits,
                                                 "cuda", gen)
    ref = paged_prefill_attention_ref(q, cache, bt, cu, lens, 128 ** -0.5)
    assert rel_err(paged_prefill_attention_triton(q, cache, bt, cu, lens, 128 ** -0.5), ref) < 3e-3
    work = prefill_work([1024, 2000, 77], 4, True, prefill_work_capacity(3101, 8, 4, True)).cuda()
    assert rel_err(paged_prefill_attention_triton(q, cache, bt, cu, lens, 128 ** -0.5, work=work), ref) < 3e-3
