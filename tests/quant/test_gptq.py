"""GPTQ rounding: same scales and packed format as RTN, lower output error, exact integer path."""

import dataclasses

import pytest
import torch

from qoq.config import G128, PER_CHANNEL
from qoq.kernels import quantize_per_token, unpack_w4
from qoq.layers.formats import W4ChannelParams, W4G128Params, W8Params
from qoq.layers.quant_linear import W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear, make_quant_linear
from qoq.model.checkpoint import save_checkpoint
from qoq.model.loader import load_any_weights
from qoq.quant.calibrate import CalibConfig
from qoq.quant.clip import gram, search_clip
from qoq.quant.gptq import codes_of, gptq_round
from qoq.quant.pipeline import QoQOptions, quantize_model
from qoq.quant.quantizer import quantize_weight
import qoq.cli
from quant_helpers import tiny_model, write_hf_folder


def _correlated(n=64, k=320, m=1024, seed=0):
    """A weight with a few outliers and inputs with correlated channels of uneven scale."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 1.5 * torch.randn(k, k, generator=gen) / k ** 0.5
    x = (torch.randn(m, k, generator=gen) * torch.rand(k, generator=gen).add(0.2)) @ mix
    w = torch.randn(n, k, generator=gen) * 0.05
    w[torch.randint(0, n, (8,), generator=gen), torch.randint(0, k, (8,), generator=gen)] *= 8
    return w, x


def _scales(p):
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name not in ("q4", "w8")}


def _output_error(x, w, params):
    return torch.linalg.norm(x @ (params.dequantize()[:, : w.shape[1]] - w).T).item()


FORMATS = [(4, G128), (4, PER_CHANNEL), (8, G128)]


@pytest.mark.parametrize("bits,granularity", FORMATS)
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_codes_in_range_with_the_same_scales(bits, granularity, clipped, act_order):
    w, x = _correlated()
    c = gram(x)
    clip = search_clip(w, c, bits, granularity) if clipped else None
    rtn = quantize_weight(w, bits, granularity, clip)
    q = gptq_round(w, c, rtn, act_order=act_order)
    assert type(q) is type(rtn)
    for name, t in _scales(rtn).items():  # every scale and zero is RTN's, bit for bit
        other = getattr(q, name)
        if isinstance(t, torch.Tensor):
            assert other.dtype == t.dtype and torch.equal(other, t), name
        else:
            assert other == t, name
    codes, ref = codes_of(q), codes_of(rtn)
    assert codes.dtype == ref.dtype and codes.shape == ref.shape
    assert not torch.equal(codes, ref)  # GPTQ did move codes
    assert torch.equal(codes[:, 320:], ref[:, 320:])  # zero padding (320 -> 384) keeps the code of 0
    if isinstance(q, W8Params):
        assert int(codes.min()) >= -127 and int(codes.max()) <= 127
    else:
        assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    if isinstance(q, W4G128Params):  # Q8' = q4 * s2 - sz stays in int8, as the kernel needs
        q8 = (codes.int().view(64, -1, 128) * q.s2.int()[..., None] - q.sz.int()[..., None])
        assert int(q8.abs().max()) <= 127
        assert (q.dequantize()[:, 320:] == 0).all()
        # the packed format takes it unchanged
        layer = make_quant_linear(q, 320, None)
        assert isinstance(layer, W4A8G128Linear)
    if isinstance(q, W4ChannelParams):
        assert isinstance(make_quant_linear(q, 320, None), W4A8PerChannelLinear)


@pytest.mark.parametrize("bits,granularity", FORMATS)
def test_lower_output_error_than_rtn_with_the_same_scales(bits, granularity):
    w, x = _correlated(seed=3)
    c = gram(x)
    for clip in (None, search_clip(w, c, bits, granularity)):
        rtn = quantize_weight(w, bits, granularity, clip)
        err_rtn = _output_error(x, w, rtn)
        err_gptq = _output_error(x, w, gptq_round(w, c, rtn))
        assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("bits,granularity", FORMATS)
def test_identity_gram_gives_round_to_nearest(bits, granularity):
    """With H = I no column's error can be compensated: each weight goes to its nearest value on the
    grid of the fixed scales (RTN's code is on that grid, so never closer; they differ only where
    RTN's double rounding Q8 -> q4 or the fp16 scaled zero moves a tie)."""
    w, _ = _correlated()
    rtn = quantize_weight(w, bits, granularity)
    q = gptq_round(w, torch.eye(384), rtn, damp=0.0)
    err_q, err_rtn = ((p.dequantize()[:, :320] - w).abs() for p in (q, rtn))
    assert (err_q <= err_rtn + 1e-6).all()
    assert (codes_of(q) != codes_of(rtn)).float().mean() < 0.05


@pytest.mark.parametrize("bits,granularity", FORMATS)
def test_integer_path_of_gptq_weights_equals_float64(bits, granularity):
    w, x = _correlated(n=48, k=256, seed=5)
    params = gptq_round(w, gram(x), quantize_weight(w, bits, granularity))
    bias = torch.randn(48, generator=torch.Generator().manual_seed(1))
    layer = make_quant_linear(params, 256, bias)
    xs = x[:10] * 3
    y = layer(xs)
    x8, sx, _ = quantize_per_token(xs)
    x64 = x8.double() * sx.double()[:, None]
    w64 = params.dequantize().double()
    if bits == 4 and granularity.per_channel:  # the fp16 scaled zero is what the kernel subtracts
        w64 = params.q4.double() * params.scale.double()[:, None] - params.szero.double()[:, None]
    ref = x64 @ w64.T + bias.double()
    assert (y.double() - ref).abs().max() <= 1e-3 * ref.abs().max()


def _codes(mod):
    return mod.weight if isinstance(mod, W8A8Linear) else unpack_w4(mod.qweight)


def _float64_weight(mod):
    """The weight a QuantLinear's buffers encode, in float64 (as the kernels' twins apply it)."""
    if isinstance(mod, W8A8Linear):
        return mod.weight.double() * mod.s.double()[:, None]
    q4 = unpack_w4(mod.qweight).double()
    if isinstance(mod, W4A8PerChannelLinear):
        return q4 * mod.s1.double()[:, None] - mod.szero.double()[:, None]
    g = mod.group_size
    q8 = q4 * mod.s2.double().repeat_interleave(g, 1) - mod.sz.double().repeat_interleave(g, 1)
    return q8 * mod.s1.double()[:, None]


def _tiny_quantized(**kw):
    model = tiny_model(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, dtype=torch.float32)
    calib = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = QoQOptions(progress=False, search_tokens=64, calib=CalibConfig(num_seqs=4, seq_len=32, chunk_seqs=2), **kw)
    return quantize_model(model, None, opts, calib_tokens=calib)


@pytest.mark.parametrize("precision,granularity", [("w4a8kv4", G128), ("w4a8kv8", PER_CHANNEL), ("w8a8kv8", G128)])
def test_gptq_model_integer_path_and_checkpoint(tmp_path, precision, granularity):
    model = _tiny_quantized(precision=precision, granularity=granularity, gptq=True)
    plain = _tiny_quantized(precision=precision, granularity=granularity, gptq=False)
    assert model.quant_config.steps["gptq"] is True and plain.quant_config.steps["gptq"] is False
    kinds = (W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    plain_linears = dict(plain.named_modules())
    moved = 0
    for name, mod in linears.items():  # same scales as without GPTQ, other codes
        ref = plain_linears[name]
        for key in ("s1", "s2", "sz", "szero"):
            if hasattr(ref, key):
                assert torch.equal(getattr(mod, key), getattr(ref, key)), (name, key)
        moved += int(not torch.equal(_codes(mod), _codes(ref)))
    assert moved == len(linears)
    # the integer path of each GPTQ linear equals float64 of its numbers
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(2))
    for mod in (model.layers[0].self_attn.o_proj, model.layers[1].mlp.down_proj):
        xs = x[:, : mod.in_features]
        x8, sx, _ = quantize_per_token(xs)
        ref = (x8.double() * sx.double()[:, None]) @ _float64_weight(mod)[:, : mod.in_features].T
        assert (mod(xs).double() - ref).abs().max() <= 1e-3 * ref.abs().max()
    # the option round-trips through the checkpoint's quant config; logits unchanged
    save_checkpoint(model, tmp_path)
    loaded = load_any_weights(tmp_path)
    assert loaded.quant_config.steps["gptq"] is True
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in model.parameters():  # what the checkpoint stores: fp16 embeddings, head and norms
            p.copy_(p.half().float())
        assert torch.allclose(loaded.compute_logits(loaded(tokens)), model.compute_logits(model(tokens)), atol=1e-5)


def test_gptq_rejects_the_float_simulation():
    with pytest.raises(ValueError, match="gptq"):
        _tiny_quantized(progressive=False, gptq=True)


@pytest.mark.parametrize("flag,expected", [(["--gptq"], True), (["--no-gptq"], False), ([], QoQOptions.gptq)])
def test_cli_gptq_flag_reaches_the_options_and_the_checkpoint(tmp_path, monkeypatch, flag, expected):
    """`qoq quantize --gptq/--no-gptq` in process, on a tiny model's HF folder."""
    import json

    import qoq.model.loader
    import qoq.quant.calibrate

    tiny = tiny_model(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, dtype=torch.float32)
    folder = write_hf_folder(tiny, tmp_path / "hf")
    calib = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(qoq.model.loader, "load_tokenizer", lambda folder: None)
    monkeypatch.setattr(qoq.quant.calibrate, "calibration_tokens", lambda tok, cfg, text=None: calib)
    out = tmp_path / "q"
    argv = ["quantize", str(folder), "--out", str(out), "--no-rotation", "--device", "cpu", *flag]
    assert qoq.cli.main(argv) == 0
    steps = json.loads((out / "quant_config.json").read_text())["steps"]
    assert steps["gptq"] is expected
    report = json.loads((out / "quantize_report.json").read_text())
    assert ("gptq" in report["step_seconds"]) is expected
