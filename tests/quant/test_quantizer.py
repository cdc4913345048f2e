"""Number formats: packing round trips and the protective range (docs/formats.md#progressive-w4-g128)."""

import pytest
import torch

from qoq.config import G128, PER_CHANNEL, ConfigError, Granularity, QuantConfig
from qoq.kernels import pack_w4, unpack_w4
from qoq.model.qserve_format import permute_groups, tile_qweight, unpermute_groups, untile_qweight
from qoq.quant.quantizer import (QuantFormatError, quantize_w4_g128, quantize_w4_per_channel, quantize_w8,
                                 quantize_weight)


def test_pack_unpack_round_trip():
    q4 = torch.randint(0, 16, (64, 384), dtype=torch.uint8)
    assert torch.equal(unpack_w4(pack_w4(q4)), q4)


def test_qserve_tiling_round_trip():
    q4 = torch.randint(0, 16, (96, 256), dtype=torch.uint8)
    tiled = tile_qweight(q4)
    assert tiled.dtype == torch.int8 and tiled.shape == (96, 128)
    assert torch.equal(untile_qweight(tiled), q4)
    s2 = torch.randint(-128, 127, (96, 2), dtype=torch.int8)
    assert torch.equal(unpermute_groups(permute_groups(s2)), s2)
    # QServe stores channel 8 * i + j of each 32-block at position 4 * j + i
    stored = permute_groups(torch.arange(32)[:, None])
    assert stored[0, 4 * 3 + 1].item() == 8 * 1 + 3


def _adversarial(n=48, k=256):
    w = torch.randn(n, k)
    w[0, 5] = 300.0  # one huge outlier in a row
    w[1] = -torch.rand(k) - 1  # all negative
    w[2] = torch.rand(k) + 1  # all positive
    w[3] = 0  # all zero
    w[4, :128] = 1e-4 * torch.randn(128)  # tiny group next to a normal one
    w[5] = torch.where(torch.arange(k) % 2 == 0, 119.0, -119.0)  # full range everywhere
    w[6, :128] = -1000.0  # a whole group at the negative extreme
    w[7] = torch.randn(k) * 1e-3
    return w


@pytest.mark.parametrize("make", [lambda: torch.randn(64, 384) * 0.02, _adversarial])
@pytest.mark.parametrize("clip,channel_clip", [(None, None), (0.5, None), (0.8, None), (None, 0.5), (0.7, 0.6)])
def test_protective_range_keeps_dequantized_int8(make, clip, channel_clip):
    p = quantize_w4_g128(make(), clip=clip, channel_clip=channel_clip)
    q8 = p.q4.int() * p.s2.int().repeat_interleave(128, 1) - p.sz.int().repeat_interleave(128, 1)
    assert int(q8.min()) >= -128 and int(q8.max()) <= 127
    assert int(p.q4.max()) <= 15
    assert int(p.s2.min()) >= 1 and int(p.s2.max()) <= 16
    assert int(p.sz.min()) >= 0 and int(p.sz.max()) <= 127  # the scaled zero is a valid int8
    assert (p.q4.int() * p.s2.int().repeat_interleave(128, 1)).max() <= 240  # fits a byte lane


def test_progressive_reconstruction_is_close():
    w = torch.randn(64, 256)
    err = (quantize_w4_g128(w).dequantize() - w).abs()
    assert err.mean() < 0.12 * w.abs().mean()  # 4-bit of a Gaussian: step ~ range / 15


def test_per_channel_and_w8_formats():
    w = _adversarial()
    p = quantize_w4_per_channel(w)
    assert torch.allclose(p.dequantize(), p.q4.float() * p.scale.float()[:, None] - p.szero.float()[:, None])
    step = p.scale.float()[:, None]
    assert ((p.dequantize() - w).abs() <= step / 2 + 1e-2 * step + 1e-6).all()
    p8 = quantize_w8(w)
    assert int(p8.w8.abs().max()) <= 127
    assert ((p8.dequantize() - w).abs() <= p8.scale.float()[:, None] * 0.51 + 1e-6).all()


def test_zero_padding_to_kernel_multiple():
    w = torch.randn(8, 96)
    for bits, granularity in ((4, G128), (4, PER_CHANNEL), (8, G128)):
        p = quantize_weight(w, bits, granularity)
        deq = p.dequantize()
        assert deq.shape == (8, 128)
        # exact zeros, except per-channel where the fp16 scaled zero z * s rounds (2^-11 relative)
        tol = 0 if not granularity.per_channel or bits == 8 else 1e-3 * float(w.abs().max())
        assert float(deq[:, 96:].abs().max()) <= tol


def test_granularity_is_validated_once_and_saved_as_before():
    with pytest.raises(ConfigError, match="group_size must be 128 or -1"):
        Granularity(64)
    with pytest.raises(ConfigError, match="group size '64'|group_size must be"):
        Granularity.parse("64")
    assert Granularity.parse(-1) == Granularity.parse("per-channel") == PER_CHANNEL
    assert Granularity.parse("g128") == Granularity.parse(128) == G128
    for qc in (QuantConfig("w4a8kv4", PER_CHANNEL), QuantConfig("w4a8kv8", G128)):
        saved = qc.to_dict()
        assert saved["group_size"] == qc.granularity.saved() and "granularity" not in saved
        assert QuantConfig.from_dict(saved) == qc
    with pytest.raises(ConfigError, match="Granularity"):
        QuantConfig("w4a8kv4", 128)
    with pytest.raises(QuantFormatError, match="4 or 8 bits"):
        quantize_weight(torch.randn(4, 128), 3, G128)
