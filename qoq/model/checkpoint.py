"""Packed checkpoints: qoq's own format and QServe's model-zoo layout (docs/checkpoint-format.md).

qoq format: a folder with config.json (HF style), quant_config.json, model.safetensors holding
the model's state dict (QuantLinear buffers: 4-bit weights packed two per byte in the kernels'
layout, int8 group scales and scaled zeros, fp16 channel scales; embeddings, head, norms fp16)
and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qoq.config import ConfigError, ModelConfig, QuantConfig
from qoq.layers.formats import W4ChannelParams, W4G128Params, W8Params, padded_k
from qoq.layers.quant_linear import QuantLinear, W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear
from qoq.layers.rotary import RotaryEmbedding
from qoq.model.llama import LlamaModel
from qoq.model.weights import hf_config_dict, iter_safetensors, read_config

FORMAT_NAME = "qoq-packed"
FORMAT_VERSION = 1
QUANT_CONFIG_FILE = "quant_config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message says what to do."""


def stored_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as the checkpoint stores it: quantized buffers and integers as they are,
    every other float tensor fp16, all on the CPU and contiguous."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        keep = name.rsplit(".", 1)[-1] in QUANT_BUFFERS or not t.is_floating_point()
        out[name] = t.contiguous() if keep else t.to(torch.float16).contiguous()
    return out


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless told to replace it, and never replace a folder
    that is not a qoq checkpoint (a mistyped --out must not delete someone's files)."""
    if not out.exists():
        return
    if out.is_file():
        raise CheckpointError(f"{out} is a file: choose a folder for the checkpoint")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if not (out / QUANT_CONFIG_FILE).exists():
        raise CheckpointError(f"{out} exists and is not a qoq checkpoint (no {QUANT_CONFIG_FILE}); refusing to "
                              "replace it: choose another --out")


class CheckpointWriter:
    """Writes a checkpoint into a hidden temporary folder beside `out`, shard by shard, and moves
    it into place only when `finish` has written everything: an interrupted run (Ctrl-C, a crash)
    leaves no folder that would load as if it were complete. Use it as a context manager: leaving
    the block with an exception removes the temporary folder."""

    def __init__(self, out: str | Path, overwrite: bool = False) -> None:
        self.out = Path(out)
        check_output_dir(self.out, overwrite)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0

    def write(self, state: dict[str, torch.Tensor], shard: str) -> None:
        tensors = stored_tensors(state)
        save_file(tensors, str(self.tmp / shard), metadata={"format": FORMAT_NAME})
        self.weight_map.update(dict.fromkeys(tensors, shard))
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, config: ModelConfig, qc: QuantConfig, tokenizer=None, extra: dict[str, dict] | None = None) -> Path:
        shards = sorted(set(self.weight_map.values()))
        if len(shards) > 1:
            index = {"metadata": {"total_size": self.bytes_written, "format": FORMAT_NAME}, "weight_map": self.weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (self.tmp / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **qc.to_dict()}
        (self.tmp / QUANT_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        for name, data in (extra or {}).items():
            (self.tmp / name).write_text(json.dumps(data, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def save_checkpoint(model: LlamaModel, out_dir: str | Path, tokenizer=None, overwrite: bool = True) -> Path:
    """Write a quantized model (integer QuantLinears) as a qoq packed checkpoint (one shard)."""
    fake = [n for n, m in model.named_modules() if hasattr(m, "act_bits")]
    if fake:
        raise CheckpointError(f"{fake[0]} is a float simulation (fake quant / non-progressive RTN): "
                              "only integer-quantized models can be packed; quantize without --fake-quant")
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise CheckpointError("the model has no quantized linears: run qoq.quant.pipeline.quantize_model first")
    with CheckpointWriter(out_dir, overwrite) as writer:
        writer.write(model.state_dict(), "model.safetensors")
        return writer.finish(model.config, model.quant_config, tokenizer)


QUANT_BUFFERS = {"qweight", "s1", "s2", "sz", "szero", "s"}  # kept in their stored dtypes


def read_quant_config(folder: Path) -> QuantConfig:
    try:
        data = json.loads((folder / QUANT_CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / QUANT_CONFIG_FILE} is not valid JSON: {err}") from err
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder / QUANT_CONFIG_FILE}: format {data.get('format')!r} is not {FORMAT_NAME!r}")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format v{data['format_version']} is newer than this qoq "
                              f"(v{FORMAT_VERSION}); upgrade qoq")
    try:
        return QuantConfig.from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{folder / QUANT_CONFIG_FILE}: {err}") from err


def quant_linear_factory(qc: QuantConfig):
    """A LinearFactory building empty QuantLinears of the checkpoint's format (to assign into)."""

    def make(in_features: int, out_features: int, bias: bool, name: str):
        kp = padded_k(in_features)
        b = torch.zeros(out_features) if bias else None
        q4 = torch.zeros(out_features, kp, dtype=torch.uint8)
        packed = torch.zeros(out_features, kp // 2, dtype=torch.uint8)
        one = torch.ones(out_features, dtype=torch.float16)
        if qc.weight_bits == 8:
            return W8A8Linear(in_features, W8Params(torch.zeros(out_features, kp, dtype=torch.int8), one), b)
        if qc.granularity.per_channel:
            return W4A8PerChannelLinear(in_features, W4ChannelParams(q4, one, one * 0), b, packed=packed)
        g = torch.ones(out_features, kp // qc.granularity.group_size, dtype=torch.int8)
        return W4A8G128Linear(in_features, W4G128Params(q4, one, g, g * 0), b, packed=packed)

    return make


def validate_quant_tensors(model: LlamaModel) -> None:
    """Reject values no valid quantization produces (they would silently wrap in the kernel)."""
    for name, mod in model.named_modules():
        if isinstance(mod, W4A8G128Linear):
            s2, sz = mod.s2.int(), mod.sz.int()
            if int(s2.min()) < 1 or int(s2.max()) > 16 or int(sz.min()) < 0 or int(sz.max()) > 15 * 16:
                raise CheckpointError(f"{name}: group scales must be 1..16 and scaled zeros 0..240; the "
                                      "checkpoint is corrupt or not QoQ-progressive: re-run qoq quantize")
        for key in ("s1", "szero", "s"):
            t = getattr(mod, key, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name}.{key} has non-finite values: the checkpoint is corrupt")


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> LlamaModel:
    """A qoq packed checkpoint folder -> LlamaModel with QuantLinears (errors say what is wrong)."""
    folder = Path(folder)
    config, qc = read_config(folder), read_quant_config(folder)
    state = dict(iter_safetensors(folder))
    model = assemble_model(config, qc, state, dtype, device, where=str(folder))
    validate_quant_tensors(model)
    return model


def assemble_model(config: ModelConfig, qc: QuantConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                   device, where: str) -> LlamaModel:
    """Build on the meta device with empty QuantLinears, check names and shapes, assign tensors."""
    with torch.device("meta"):
        model = LlamaModel(config, quant_linear_factory(qc))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: checkpoint does not match its config ({qc.precision}, {qc.granularity}): "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    out = {}
    for name, t in state.items():
        ref = expected[name]
        if tuple(t.shape) != tuple(ref.shape) or (name.rsplit(".", 1)[-1] in QUANT_BUFFERS and t.dtype != ref.dtype):
            raise CheckpointError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, expected {ref.dtype} "
                                  f"{tuple(ref.shape)}: the checkpoint is corrupt or from another model")
        keep = name.rsplit(".", 1)[-1] in QUANT_BUFFERS or not t.is_floating_point()
        out[name] = t.to(device) if keep else t.to(device=device, dtype=dtype)
    model.load_state_dict(out, assign=True)
    model.rotary = RotaryEmbedding.for_model(config).to(device)
    model.quant_config = qc
    return model.eval()
