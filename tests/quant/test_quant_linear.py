"""The reference integer path equals a float64 computation of the same quantized numbers."""

import pytest
import torch

from qoq.config import G128, PER_CHANNEL
from qoq.kernels import quantize_per_token
from qoq.layers.attention import CausalAttention
from qoq.layers.quant_linear import FakeQuantLinear, make_quant_linear
from qoq.quant.quantizer import quantize_weight


@pytest.mark.parametrize("bits,granularity", [(4, G128), (4, PER_CHANNEL), (8, G128)])
@pytest.mark.parametrize("k", [256, 96])  # 96: zero-padded to the kernels' 128
def test_integer_path_equals_float64(bits, granularity, k):
    gen = torch.Generator().manual_seed(k + bits)
    w = torch.randn(48, k, generator=gen) * 0.05
    bias = torch.randn(48, generator=gen)
    x = torch.randn(2, 5, k, generator=gen) * 3
    params = quantize_weight(w, bits, granularity)
    layer = make_quant_linear(params, k, bias)
    y = layer(x)
    # float64 of the same numbers: int8 activations times their scale, dequantized weights
    x8, sx, _ = quantize_per_token(x.reshape(-1, k))
    x64 = x8.double() * sx.double()[:, None]
    w64 = params.dequantize().double()[:, :k]
    if bits == 4 and granularity.per_channel:  # the fp16 scaled zero is what the kernel subtracts
        w64 = params.q4.double()[:, :k] * params.scale.double()[:, None] - params.szero.double()[:, None]
    ref = (x64 @ w64.T).reshape(2, 5, 48) + bias.double()
    assert y.shape == (2, 5, 48)
    # the GEMM rounds its output to fp16, nothing else differs
    assert (y.double() - ref).abs().max() <= 1e-3 * ref.abs().max()
    fake = FakeQuantLinear(params.dequantize()[:, :k], bias)
    assert (fake(x).double() - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_causal_attention_sees_quantized_kv():
    from qoq.kernels import dequantize_kv_ref, quantize_kv_ref
    from qoq.layers.rotary import RotaryEmbedding
    from qoq.config import RopeScaling

    rot = RotaryEmbedding(16, 64, 10000.0, RopeScaling())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, h, 16, generator=gen) for h in (4, 2, 2))
    pos = torch.arange(6)[None]
    plain, kv4 = CausalAttention()(0, q, k, v, pos, rot), CausalAttention(kv_bits=4)(0, q, k, v, pos, rot)
    assert not torch.allclose(plain, kv4)
    qr, kr = rot(pos, q, k)
    deq = lambda t: dequantize_kv_ref(*quantize_kv_ref(t, 4), 4, dtype=t.dtype)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(1, 2), deq(kr).transpose(1, 2), deq(v).transpose(1, 2), is_causal=True, enable_gqa=True)
    assert torch.allclose(kv4, out.transpose(1, 2), atol=1e-5)



@pytest.mark.parametrize("bits,granularity", [(4, G128), (4, PER_CHANNEL), (8, G128)])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_cpu_path_with_the_kept_integer_weight_equals_the_reference_twin(bits, granularity, silu_mul):
    """The CPU forward keeps the unpacked integer weight and multiplies in exact float32 chunks:
    bit for bit the kernels' torch twins, K > 1024 (several chunks), and the kept weight follows
    the buffers when they change."""
    from qoq.kernels import quantize_per_token, w4a8_g128_gemm, w4a8_per_channel_gemm, w8a8_gemm

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(256, 2500, generator=gen) * 0.05
    lin = make_quant_linear(quantize_weight(w, bits, granularity), 2500)
    x = torch.randn(33, 2500, generator=gen) * 3

    def reference():
        x8, sx, xs = quantize_per_token(x)
        x8 = torch.nn.functional.pad(x8, (0, lin.padded_in - 2500))
        if bits == 8:
            return w8a8_gemm(x8, sx, lin.weight, lin.s, silu_mul=silu_mul)
        if not granularity.per_channel:
            return w4a8_g128_gemm(x8, sx, lin.qweight, lin.s1, lin.s2, lin.sz, 128, silu_mul=silu_mul)
        return w4a8_per_channel_gemm(x8, sx, xs, lin.qweight, lin.s1, lin.szero, silu_mul=silu_mul)

    assert torch.equal(lin(x, silu_mul=silu_mul), reference().float())
    other = make_quant_linear(quantize_weight(w.flip(0), bits, granularity), 2500)
    with torch.no_grad():
        for mine, theirs in zip(lin.buffers(), other.buffers()):
            mine.copy_(theirs)
    assert torch.equal(lin(x, silu_mul=silu_mul), reference().float())
