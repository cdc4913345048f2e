"""`qoq quantize` on a model folder, one decoder layer at a time: models larger than host or
GPU memory quantize on one GPU.

Each layer is read from the memory-mapped safetensors shards (the next one on a background
thread while the current one is quantized), quantized on the device, and written out as its
own shard of the packed checkpoint before the next layer is read, so host and GPU memory at peak
do not grow with the number of layers. The embedding, final norm and LM head stay on the device
throughout (the calibration tokens are embedded once; rotation folds into them) and are written
last. The checkpoint appears under its final name only once complete (CheckpointWriter).
"""

from __future__ import annotations

import concurrent.futures
import resource
import time
from pathlib import Path

import torch

from qoq.config import ModelConfig
from qoq.model.llama import DecoderLayer
from qoq.model.checkpoint import QUANT_CONFIG_FILE, CheckpointWriter
from qoq.model.loader import build_layer, build_skeleton
from qoq.model.qserve_format import is_qserve_checkpoint
from qoq.model.weights import LoadError, ShardedWeights, read_config
from qoq.quant.pipeline import QoQOptions, StepTimes, describe, quantize_model

REPORT_FILE = "quantize_report.json"


def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class StreamingLayers:
    """A layer store (quant.pipeline) over a folder's shards: `load` reads a layer (prefetching
    the next), `store` writes the quantized layer as its own shard and keeps nothing."""

    def __init__(self, weights: ShardedWeights, config: ModelConfig, writer: CheckpointWriter) -> None:
        self.weights, self.config, self.writer = weights, config, writer
        self.num_shards = config.num_layers + 1  # a shard per layer, one for the embedding / head
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qoq-prefetch")
        self._next: tuple[int, concurrent.futures.Future] | None = None

    def __len__(self) -> int:
        return self.config.num_layers

    def _read(self, index: int) -> concurrent.futures.Future:
        return self._pool.submit(self.weights.layer_state, self.config, index)

    def load(self, index: int, device: torch.device) -> DecoderLayer:
        pending = self._next[1] if self._next and self._next[0] == index else self._read(index)
        self._next = (index + 1, self._read(index + 1)) if index + 1 < len(self) else None
        return build_layer(self.config, index, pending.result(), torch.float32, device)

    def store(self, index: int, layer: DecoderLayer) -> None:
        state = {f"layers.{index}.{k}": v for k, v in layer.state_dict().items()}
        self.writer.write(state, _shard_name(index, self.num_shards))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def layer_memory_bytes(config: ModelConfig, calib_tokens: int) -> int:
    """A rough upper estimate of the device memory one layer's quantization needs: the layer in
    fp32 (and its largest projection again, as float64, for the rotation), the calibration
    activations the layer's linears see, and the search / GPTQ working set of its largest
    projection. The embedding and head (fp32) come on top."""
    h, inter, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    params = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
    largest = 2 * inter * h
    acts = calib_tokens * (4 * h + q + inter + kv) * 4
    search = 6 * largest * 4 + 4 * max(h, inter) ** 2 * 8
    globals_ = 2 * config.vocab_size * h * 4
    return params * 4 + largest * 8 + acts + search + globals_


def _check_device_memory(config: ModelConfig, calib_tokens: int, device: torch.device) -> None:
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = layer_memory_bytes(config, calib_tokens)
    if need > free:
        raise ValueError(f"quantizing one layer of this model needs about {need / 2**30:.1f} GiB of GPU memory with "
                         f"{calib_tokens} calibration tokens; {free / 2**30:.1f} GiB are free on {device}: free the "
                         "GPU, or lower --calib-seqs / --calib-seq-len")


def check_source(folder: Path) -> ModelConfig:
    """Reject what cannot be quantized before any long work: an already quantized checkpoint, a
    QServe folder, pickle-only weights, an unsupported architecture."""
    if (folder / QUANT_CONFIG_FILE).exists():
        raise LoadError(f"{folder} is already a qoq quantized checkpoint: pass the original model")
    if is_qserve_checkpoint(folder):
        raise LoadError(f"{folder} is an already quantized QServe checkpoint: pass the original model")
    return read_config(folder)


def _peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@torch.no_grad()
def quantize_folder(folder: Path, out: Path, options: QoQOptions, calib_tokens: torch.Tensor, tokenizer,
                    device: torch.device, overwrite: bool = False) -> dict:
    """Quantize the model in `folder` layer by layer on `device` into a packed checkpoint at
    `out`. Returns the report that is also written into the checkpoint (REPORT_FILE)."""
    t0 = time.perf_counter()
    config = check_source(folder)
    if options.rotation == "auto":
        raise ValueError("--rotation auto quantizes the model twice in memory and compares them; quantizing "
                         "layer by layer supports --rotation on (default) or --no-rotation")
    _check_device_memory(config, calib_tokens.numel(), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights = ShardedWeights(folder)
    model = build_skeleton(config, weights.global_state(config), torch.float32, device)
    times = StepTimes(device)
    with CheckpointWriter(out, overwrite) as writer:
        layers = StreamingLayers(weights, config, writer)
        try:
            quantize_model(model, tokenizer, options, calib_tokens, device=device, layers=layers, times=times)
        finally:
            layers.close()
        with times("store"):
            writer.write({k: v for k, v in model.state_dict().items() if not k.startswith("layers.")},
                         _shard_name(config.num_layers, layers.num_shards))
        report = {
            "model": str(folder), "precision": model.quant_config.precision,
            "group_size": model.quant_config.granularity.saved(), "rotation": model.quant_config.rotation,
            "layers": config.num_layers, "calib_tokens": int(calib_tokens.numel()),
            "calib_shape": list(calib_tokens.shape), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
            "step_seconds": {k: round(v, 1) for k, v in times.total.items()},
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "peak_host_gib": round(_peak_host_gib(), 2),
            "checkpoint_gib": round(writer.bytes_written / 2**30, 2),
            "options": describe(options),
        }
        writer.finish(config, model.quant_config, tokenizer, extra={REPORT_FILE: report})
    return report
