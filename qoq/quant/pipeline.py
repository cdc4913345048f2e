"""The QoQ pipeline (SPEC section 2): fold norms, rotate, then per decoder layer SmoothAttention,
smoothing of o_proj / down_proj inputs, reordering (g128), clipping, and quantized linears whose
integer codes are optionally chosen by GPTQ-style error-compensating rounding (qoq/quant/gptq.py)
under the scales QoQ chose.

Every step is a flag of QoQOptions, so the ablation ladder is a list of options.

Rotation can also be "auto": the model is quantized both ways and the variant whose logits on
calibration windows are closer to the float model's (mean KL divergence per token) is kept. The
rotation helps per-token INT8 activations but spreads each weight row's 4-bit error over every
input channel; on models whose activation energy sits in a few channels (massive activations,
damped by small RMSNorm weights) that costs more than it saves, so the choice is measured per
model instead of assumed (docs/accuracy.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from qoq.config import QuantConfig
from qoq.layers.quant_linear import FakeQuantLinear, make_quant_linear
from qoq.model.llama import DecoderLayer, LlamaModel
from qoq.quant import smooth as smoothing
from qoq.quant.calibrate import CalibConfig, calibration_tokens, capture_layer, embed, subsample_rows
from qoq.quant.clip import gram, search_clip
from qoq.quant.gptq import gptq_round
from qoq.quant.quantizer import fake_quantize_weight, fake_w4_group_rtn, quantize_weight
from qoq.quant.reorder import reorder_down_proj, reorder_o_proj
from qoq.kernels.kv_cache import check_hadamard_dim
from qoq.quant.rotation import fold_norms, rotate_model, rotate_values
from qoq.quant.smooth_attention import apply_smooth_attention, smooth_attention_scales

STEPS = ("rotation", "smooth_attention", "qk_hadamard", "v_rotation", "smooth", "reorder", "clip", "gptq")
log = logging.getLogger(__name__)


@dataclass
class QoQOptions:
    precision: str = "w4a8kv4"
    group_size: int = 128  # 128 (progressive) or -1 (per-channel); ignored for 8-bit weights
    rotation: bool | str = True  # True, False or "auto" (quantize both ways, keep the closer one)
    # SmoothAttention on the keys; None: only where qk_hadamard is off (with the Hadamard it cost
    # 0.28 ppl on SmolLM2, docs/accuracy.md)
    smooth_attention: bool | None = None
    qk_hadamard: bool = True  # runtime Hadamard on q/k after RoPE for a quantized KV cache (QuantConfig.qk_hadamard)
    v_rotation: bool = False  # offline per-head Hadamard of v_proj outputs / o_proj inputs (no gain measured)
    smooth: bool = True
    reorder: bool = True  # g128 only
    clip: bool = True
    gptq: bool = True  # GPTQ rounding of the integer codes under QoQ's scales (same packed format; docs/accuracy.md)
    smooth_block_inputs: bool = False  # also smooth qkv / gate_up inputs into the norms (no gain measured)
    progressive: bool = True  # off (g128): plain per-group RTN, float simulation only
    fake_quant: bool = False  # FakeQuantLinear (float simulation) instead of the integer path
    smooth_attention_alpha: float = 0.5
    search_tokens: int = 1024  # calibration tokens the smoothing search scores on
    clip_tokens: int = 4096  # tokens of the Gram matrices that price clipping candidates
    gptq_tokens: int = 16384  # tokens of the Gram matrices GPTQ rounds against
    gptq_damp: float = 0.01  # dampening of H, a fraction of its mean diagonal
    gptq_act_order: bool = True  # round columns by decreasing input energy (diag H), not stored order
    auto_rotation_seqs: int = 8  # calibration windows that score the two variants of rotation "auto"
    seed: int = 0
    progress: bool = True
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        if self.smooth_attention is None:
            self.smooth_attention = not self.qk_hadamard

    @classmethod
    def rtn(cls, **kw) -> "QoQOptions":
        """No QoQ step at all: round-to-nearest weights in the precision's format."""
        return cls(**{**{s: False for s in STEPS}, **kw})

    def quant_config(self, rotation_name: str = "") -> QuantConfig:
        qc = QuantConfig(self.precision, self.group_size if self.group_size == -1 else 128)
        qc.steps = {s: bool(getattr(self, s)) for s in STEPS}
        qc.steps["progressive"] = self.progressive
        if self.gptq:
            qc.steps["gptq_act_order"] = self.gptq_act_order
        qc.rotation = rotation_name
        qc.qk_hadamard = bool(self.qk_hadamard) and qc.kv_bits < 16
        return qc


@dataclass
class RotationDecision:
    """What rotation "auto" measured: mean KL(fp || quantized) per token on calibration windows."""

    rotated: bool
    kl_rotated: float
    kl_unrotated: float
    tokens: int

    def __str__(self) -> str:
        return (f"rotation auto: {'rotate' if self.rotated else 'no rotation'} (calibration KL to fp "
                f"{self.kl_rotated:.4f} rotated vs {self.kl_unrotated:.4f} unrotated, {self.tokens} tokens)")


def quantize_model(model: LlamaModel, tokenizer=None, options: QoQOptions | None = None,
                   calib_tokens: torch.Tensor | None = None) -> LlamaModel:
    """Quantize `model` in place with QoQ; returns it with `model.quant_config` set.

    With rotation "auto" the decision is logged and kept as `model.rotation_decision`."""
    opts = options or QoQOptions()
    if opts.rotation not in (True, False, "auto"):
        raise ValueError(f"rotation must be True, False or 'auto', got {opts.rotation!r}")
    qc = opts.quant_config()
    if qc.weight_bits >= 16:
        raise ValueError("precision w16a16kv16 has nothing to quantize: choose w4a8kv4, w4a8kv8, w8a8kv8 or w8a8kv4")
    if opts.gptq and qc.weight_bits == 4 and qc.group_size > 0 and not opts.progressive:
        raise ValueError("gptq rounds the integer codes of the progressive (or per-channel / W8) formats; "
                         "the non-progressive g128 float simulation has none")
    if qc.qk_hadamard:
        try:
            check_hadamard_dim(model.config.head_dim)
        except ValueError as e:
            raise ValueError(f"{e} (or pass QoQOptions(qk_hadamard=False))") from None
    if calib_tokens is None:
        calib_tokens = calibration_tokens(tokenizer, opts.calib)
    if opts.rotation == "auto":
        return _quantize_auto_rotation(model, opts, calib_tokens)
    if opts.rotation:
        fold_norms(model)
        qc.rotation = rotate_model(model, opts.seed)
    if opts.v_rotation and qc.kv_bits < 16:
        rotate_values(model)
    if not (opts.smooth_attention or opts.smooth or opts.reorder or opts.clip or opts.gptq):
        return _round_to_nearest(model, opts, qc)  # RTN needs no calibration activations
    x = embed(model, calib_tokens)
    desc = f"QoQ {qc.precision} g{qc.group_size}{' + GPTQ' if opts.gptq else ''}"
    layers = tqdm(model.layers, desc=desc, unit="layer", disable=not opts.progress)
    for layer in layers:
        x = _quantize_layer(model, layer, x, opts, qc)
    model.quant_config = qc
    return model


@torch.no_grad()
def calibration_kl(reference: LlamaModel, model: LlamaModel, tokens: torch.Tensor) -> float:
    """Mean per-token KL(reference || model) of next-token distributions, one window at a time."""
    total, count = 0.0, 0
    for window in tokens.to(reference.device):
        ref = torch.log_softmax(reference.compute_logits(reference(window[None])).double(), -1)
        out = torch.log_softmax(model.compute_logits(model(window[None])).double(), -1)
        total += (ref.exp() * (ref - out)).sum().item()
        count += window.numel()
    return total / count


def _quantize_auto_rotation(model: LlamaModel, opts: QoQOptions, calib_tokens: torch.Tensor) -> LlamaModel:
    """Quantize a copy with rotation and `model` without; keep the one closer to the fp model."""
    reference = copy.deepcopy(model)
    score = calib_tokens[: max(1, opts.auto_rotation_seqs)]
    rotated = quantize_model(copy.deepcopy(model), None, dataclasses.replace(opts, rotation=True), calib_tokens)
    kl_rot = calibration_kl(reference, rotated, score)
    quantize_model(model, None, dataclasses.replace(opts, rotation=False), calib_tokens)
    kl_plain = calibration_kl(reference, model, score)
    decision = RotationDecision(kl_rot < kl_plain, kl_rot, kl_plain, score.numel())
    if decision.rotated:
        # In place: the caller's object becomes the rotated variant. Replace the whole state, not
        # update it: an attribute the unrotated model holds outside _modules (lm_head = None while
        # tied) would otherwise shadow the rotated model's untied head.
        state = rotated.__dict__
        model.__dict__.clear()
        model.__dict__.update(state)
    model.quant_config.steps["rotation_auto"] = True
    model.rotation_decision = decision
    log.info("%s", decision)
    if opts.progress:
        tqdm.write(str(decision))
    return model


def _round_to_nearest(model: LlamaModel, opts: QoQOptions, qc: QuantConfig) -> LlamaModel:
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, _quantized_linear(getattr(parent, name), None, opts, qc))
    model.quant_config = qc
    return model


def _fake_weight_fn(opts: QoQOptions, qc: QuantConfig):
    if qc.weight_bits == 4 and qc.group_size > 0 and not opts.progressive:
        return lambda w: fake_w4_group_rtn(w, qc.group_size)
    return lambda w: fake_quantize_weight(w, qc.weight_bits, qc.group_size)


@torch.no_grad()
def _quantize_layer(model: LlamaModel, layer: DecoderLayer, x: torch.Tensor, opts: QoQOptions,
                    qc: QuantConfig) -> torch.Tensor:
    cfg, attn, mlp = model.config, layer.self_attn, layer.mlp
    acts = capture_layer(layer, x, model.rotary, opts.calib.chunk_seqs)
    if opts.smooth_attention and qc.kv_bits < 16:
        apply_smooth_attention(attn, smooth_attention_scales(acts.keys, opts.smooth_attention_alpha), cfg)
    o_in, down_in, qkv_in, gate_up_in = acts.o_in, acts.down_in, acts.qkv_in, acts.gate_up_in
    fake_w = _fake_weight_fn(opts, qc)
    if opts.smooth and opts.smooth_block_inputs:
        qkv_in = _smooth_block_input(layer.input_layernorm, attn.qkv_proj, qkv_in, opts, fake_w)
        gate_up_in = _smooth_block_input(layer.post_attention_layernorm, mlp.gate_up_proj, gate_up_in, opts, fake_w)
    if opts.smooth:
        res = smoothing.search_o_proj(subsample_rows(o_in, opts.search_tokens, opts.seed), attn, cfg, fake_w)
        if res.alpha is not None:
            smoothing.apply_o_proj_smoothing(attn, res.scale, cfg)
            o_in = o_in / smoothing.o_input_scale(res.scale, cfg)
        res = smoothing.search_down_proj(subsample_rows(down_in, opts.search_tokens, opts.seed), mlp, fake_w)
        if res.alpha is not None:
            smoothing.apply_down_smoothing(mlp, res.scale)
            down_in = down_in / res.scale
    if opts.reorder and qc.weight_bits == 4 and qc.group_size > 0:
        o_in = o_in[:, reorder_o_proj(attn, o_in.abs().amax(0), cfg)]
        down_in = down_in[:, reorder_down_proj(mlp, down_in.abs().amax(0))]
    targets = [(attn, "qkv_proj", qkv_in), (attn, "o_proj", o_in),
               (mlp, "gate_up_proj", gate_up_in), (mlp, "down_proj", down_in)]
    for parent, name, inputs in targets:
        setattr(parent, name, _quantized_linear(getattr(parent, name), inputs, opts, qc))
    return acts.output


def _smooth_block_input(norm, linear, x: torch.Tensor, opts: QoQOptions, fake_w) -> torch.Tensor:
    """AWQ/SmoothQuant-style scale on a block input, folded into its RMSNorm weight."""
    res = smoothing.search_smoothing(subsample_rows(x, opts.search_tokens, opts.seed), linear.weight, fake_w)
    if res.alpha is None:
        return x
    smoothing.apply_norm_smoothing(norm, linear, res.scale)
    return x / res.scale


def _quantized_linear(linear: nn.Linear, inputs: torch.Tensor, opts: QoQOptions, qc: QuantConfig) -> nn.Module:
    w = linear.weight.float()
    clip = None
    c = gram(subsample_rows(inputs, opts.clip_tokens, opts.seed)) if opts.clip else None
    if opts.clip:
        clip = search_clip(w, c, qc.weight_bits, qc.group_size)
    if qc.weight_bits == 4 and qc.group_size > 0 and not opts.progressive:
        return FakeQuantLinear(fake_w4_group_rtn(w, qc.group_size).to(linear.weight.dtype), linear.bias)
    params = quantize_weight(w, qc.weight_bits, qc.group_size, clip)
    if opts.gptq:
        h = c if c is not None and opts.gptq_tokens == opts.clip_tokens else \
            gram(subsample_rows(inputs, opts.gptq_tokens, opts.seed))
        params = gptq_round(w, h, params, opts.gptq_damp, act_order=opts.gptq_act_order)
    if opts.fake_quant:
        deq = params.dequantize()[:, : w.shape[1]].to(linear.weight.dtype)
        return FakeQuantLinear(deq, linear.bias)
    return make_quant_linear(params, linear.in_features, linear.bias).to(linear.weight.device)


def describe(options: QoQOptions) -> dict:
    """The options as plain data (for benchmark records)."""
    d = dataclasses.asdict(options)
    d.pop("progress", None)
    return d
