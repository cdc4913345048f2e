"""The QoQ pipeline (docs/quantization.md): fold norms, rotate, then per decoder layer SmoothAttention,
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

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from qoq.config import G128, Granularity, QuantConfig
from qoq.layers.quant_linear import FakeQuantLinear, make_quant_linear
from qoq.model.llama import DecoderLayer, LlamaModel
from qoq.quant import smooth as smoothing
from qoq.quant.calibrate import CalibConfig, calibration_tokens, capture_layer, embed, RowSample
from qoq.quant.clip import gram, search_clip
from qoq.quant.gptq import gptq_round
from qoq.quant.quantizer import fake_quantize_weight, fake_w4_group_rtn, quantize_weight
from qoq.quant.reorder import reorder_down_proj, reorder_o_proj
from qoq.kernels.kv_cache import check_hadamard_dim
from qoq.quant.rotation import (fold_final_norm, fold_layer_norms, rotate_globals, rotate_layer,
                                rotate_layer_values, rotation_matrix)
from qoq.quant.smooth_attention import apply_smooth_attention, smooth_attention_scales

STEPS = ("rotation", "smooth_attention", "qk_hadamard", "v_rotation", "smooth", "reorder", "clip", "gptq")
log = logging.getLogger(__name__)


@dataclass
class QoQOptions:
    precision: str = "w4a8kv4"
    granularity: Granularity = G128  # g128 (progressive) or per channel; ignored for 8-bit weights
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
        qc = QuantConfig(self.precision, self.granularity)
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


class ModelLayers:
    """The decoder layers of a model in memory: a layer goes to the compute device to be
    quantized and comes back to the model's device."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model

    def __len__(self) -> int:
        return len(self.model.layers)

    def load(self, index: int, device: torch.device) -> DecoderLayer:
        return self.model.layers[index].to(device)

    def store(self, index: int, layer: DecoderLayer) -> None:
        self.model.layers[index] = layer.to(self.model.device)


class StepTimes:
    """Seconds spent per QoQ step (device work included: a CUDA device is synchronized at each
    step's end, which costs little next to the steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: dict[str, float] = {}
        self.last: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.total[step] = self.total.get(step, 0.0) + dt
            self.last[step] = self.last.get(step, 0.0) + dt

    def layer_done(self) -> str:
        text = " ".join(f"{k} {v:.1f}s" for k, v in self.last.items())
        self.last = {}
        return text


def quantize_model(model: LlamaModel, tokenizer=None, options: QoQOptions | None = None,
                   calib_tokens: torch.Tensor | None = None, *, device: str | torch.device | None = None,
                   layers: ModelLayers | None = None, times: StepTimes | None = None) -> LlamaModel:
    """Quantize `model` in place with QoQ; returns it with `model.quant_config` set.

    Layers are quantized one at a time on `device` (default: the model's), taken from and given
    back to `layers` (default: the model's own; a streaming store reads them from disk and writes
    each packed layer out, so a model larger than memory never is in memory). The embedding and
    LM head stay in `model`. With rotation "auto" the decision is logged and kept as
    `model.rotation_decision`."""
    opts = options or QoQOptions()
    device = torch.device(device) if device is not None else model.device
    if opts.rotation not in (True, False, "auto"):
        raise ValueError(f"rotation must be True, False or 'auto', got {opts.rotation!r}")
    qc = opts.quant_config()
    if qc.weight_bits >= 16:
        raise ValueError("precision w16a16kv16 has nothing to quantize: choose w4a8kv4, w4a8kv8, w8a8kv8 or w8a8kv4")
    if opts.gptq and qc.grouped_w4 and not opts.progressive:
        raise ValueError("gptq rounds the integer codes of the progressive (or per-channel / W8) formats; "
                         "the non-progressive g128 float simulation has none")
    if qc.qk_hadamard:
        try:
            check_hadamard_dim(model.config.head_dim)
        except ValueError as e:
            raise ValueError(f"{e} (or pass QoQOptions(qk_hadamard=False))") from None
    needs_calibration = opts.smooth_attention or opts.smooth or opts.reorder or opts.clip or opts.gptq
    if calib_tokens is None and (needs_calibration or opts.rotation == "auto"):
        calib_tokens = calibration_tokens(tokenizer, opts.calib)
    if opts.rotation == "auto":
        if layers is not None:
            raise ValueError("rotation 'auto' quantizes the model twice in memory: load the model, or pass "
                             "--rotation on / --no-rotation to quantize layer by layer")
        return _quantize_auto_rotation(model, opts, calib_tokens)
    layers = layers if layers is not None else ModelLayers(model)
    times = times or StepTimes(device)
    rotation = None
    if opts.rotation:
        rotation, qc.rotation = rotation_matrix(model.config.hidden_size, opts.seed)
        rotation = rotation.to(device)
        fold_final_norm(model)
        rotate_globals(model, rotation)
    x = embed(model, calib_tokens).to(device) if needs_calibration else None
    desc = f"QoQ {qc.precision} {qc.granularity}{' + GPTQ' if opts.gptq else ''}"
    bar = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not opts.progress)
    for index in bar:
        with times("load"):
            layer = layers.load(index, device)
            if rotation is not None:
                fold_layer_norms(layer)
                rotate_layer(layer, rotation)
            if opts.v_rotation and qc.kv_bits < 16:
                rotate_layer_values(layer, model.config)
        if x is None:
            _round_to_nearest(layer, opts, qc, times)
        else:
            x = _quantize_layer(model, layer, x, opts, qc, times)
        with times("store"):
            layers.store(index, layer)
        bar.set_postfix_str(times.layer_done(), refresh=False)
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


def _round_to_nearest(layer: DecoderLayer, opts: QoQOptions, qc: QuantConfig, times: StepTimes) -> None:
    with times("quantize"):
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, _quantized_linear(getattr(parent, name), None, opts, qc, times))


def _fake_weight_fn(opts: QoQOptions, qc: QuantConfig):
    if qc.grouped_w4 and not opts.progressive:
        return lambda w: fake_w4_group_rtn(w, qc.granularity.group_size)
    return lambda w: fake_quantize_weight(w, qc.weight_bits, qc.granularity)


@torch.no_grad()
def _quantize_layer(model: LlamaModel, layer: DecoderLayer, x: torch.Tensor, opts: QoQOptions,
                    qc: QuantConfig, times: StepTimes) -> torch.Tensor:
    cfg, attn, mlp = model.config, layer.self_attn, layer.mlp
    with times("capture"):
        sample = RowSample(x.shape[0] * x.shape[1], _sample_size(opts), opts.seed, x.device)
        acts = capture_layer(layer, x, model.rotary, opts.calib.chunk_seqs, sample)
    if opts.smooth_attention and qc.kv_bits < 16:
        with times("smooth_attention"):
            apply_smooth_attention(attn, smooth_attention_scales(acts.keys, opts.smooth_attention_alpha), cfg)
    o_in, down_in, qkv_in, gate_up_in = acts.o_in, acts.down_in, acts.qkv_in, acts.gate_up_in
    o_amax, down_amax, output = acts.o_amax, acts.down_amax, acts.output
    del acts
    fake_w = _fake_weight_fn(opts, qc)
    search = opts.search_tokens
    with times("smooth"):
        if opts.smooth and opts.smooth_block_inputs:
            _smooth_block_input(layer.input_layernorm, attn.qkv_proj, qkv_in, sample.first(qkv_in, search), fake_w)
            _smooth_block_input(layer.post_attention_layernorm, mlp.gate_up_proj, gate_up_in,
                                sample.first(gate_up_in, search), fake_w)
        if opts.smooth:  # the inputs are divided in place: the rows are this function's own
            res = smoothing.search_o_proj(sample.first(o_in, search), attn, cfg, fake_w)
            if res.alpha is not None:
                smoothing.apply_o_proj_smoothing(attn, res.scale, cfg)
                scale = smoothing.o_input_scale(res.scale, cfg)
                o_in.div_(scale)
                o_amax = o_amax / scale  # exact: dividing by s > 0 keeps the order of |x|
            res = smoothing.search_down_proj(sample.first(down_in, search), mlp, fake_w)
            if res.alpha is not None:
                smoothing.apply_down_smoothing(mlp, res.scale)
                down_in.div_(res.scale)
                down_amax = down_amax / res.scale
    if opts.reorder and qc.grouped_w4:
        with times("reorder"):
            o_in = o_in[:, reorder_o_proj(attn, o_amax, cfg)]
            down_in = down_in[:, reorder_down_proj(mlp, down_amax)]
    targets = [(attn, "qkv_proj", qkv_in), (attn, "o_proj", o_in),
               (mlp, "gate_up_proj", gate_up_in), (mlp, "down_proj", down_in)]
    del qkv_in, o_in, gate_up_in, down_in
    while targets:  # drop each input as soon as its linear is done (the MLP's are the largest)
        parent, name, inputs = targets.pop(0)
        setattr(parent, name, _quantized_linear(getattr(parent, name), inputs, opts, qc, times, sample))
        del inputs
    return output


def _sample_size(opts: QoQOptions) -> int:
    """Rows of each linear's input that the enabled searches use (each takes a prefix)."""
    return max(opts.search_tokens if opts.smooth else 0, opts.clip_tokens if opts.clip else 0,
               opts.gptq_tokens if opts.gptq else 0)


def _smooth_block_input(norm, linear, x: torch.Tensor, search_x: torch.Tensor, fake_w) -> None:
    """AWQ/SmoothQuant-style scale on a block input, folded into its RMSNorm weight (x is
    divided in place)."""
    res = smoothing.search_smoothing(search_x, linear.weight, fake_w)
    if res.alpha is not None:
        smoothing.apply_norm_smoothing(norm, linear, res.scale)
        x.div_(res.scale)


def _grams(inputs: torch.Tensor, sample: RowSample, opts: QoQOptions, times: StepTimes):
    """(the clip search's Gram matrix, GPTQ's): X^T X over the sample's first `clip_tokens` and
    `gptq_tokens` rows. The clip rows are the first of GPTQ's, so GPTQ's Gram adds the rest to
    the clip Gram instead of starting over."""
    clip_n = min(opts.clip_tokens, sample.size) if opts.clip else 0
    gptq_n = min(opts.gptq_tokens, sample.size) if opts.gptq else 0
    with times("gram"):
        c = gram(sample.first(inputs, clip_n)) if clip_n else None
        if not gptq_n:
            return c, None
        if gptq_n <= clip_n:
            return c, (c if gptq_n == clip_n else gram(sample.first(inputs, gptq_n)))
        rest = gram(sample.between(inputs, clip_n, gptq_n))
        return c, (rest if c is None else rest.add_(c))


def _quantized_linear(linear: nn.Module, inputs: torch.Tensor | None, opts: QoQOptions, qc: QuantConfig,
                      times: StepTimes, sample: RowSample | None = None) -> nn.Module:
    w = linear.weight.float()
    clip = None
    c, h = _grams(inputs, sample, opts, times) if inputs is not None else (None, None)
    if opts.clip and c is not None:
        with times("clip"):
            clip = search_clip(w, c, qc.weight_bits, qc.granularity)
    if qc.grouped_w4 and not opts.progressive:
        return FakeQuantLinear(fake_w4_group_rtn(w, qc.granularity.group_size).to(linear.weight.dtype), linear.bias)
    params = quantize_weight(w, qc.weight_bits, qc.granularity, clip)
    if h is not None:
        with times("gptq"):
            params = gptq_round(w, h, params, opts.gptq_damp, act_order=opts.gptq_act_order)
    if opts.fake_quant:
        deq = params.dequantize()[:, : w.shape[1]].to(linear.weight.dtype)
        return FakeQuantLinear(deq, linear.bias)
    return make_quant_linear(params, linear.in_features, linear.bias).to(linear.weight.device)


def describe(options: QoQOptions) -> dict:
    """The options as plain data (for benchmark records)."""
    d = dataclasses.asdict(options)
    d.pop("progress", None)
    del d["granularity"]
    d["group_size"] = options.granularity.saved()  # as checkpoints store it
    return d
