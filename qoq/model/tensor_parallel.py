"""Megatron-style tensor parallelism for LlamaModel, every precision (docs/parallel.md).

Per decoder layer, one all-reduce after attention and one after the MLP:
- qkv_proj and gate_up_proj split by output rows (column parallel): each rank holds whole query
  heads and the whole KV heads they read, and matching gate and up rows, so RoPE, the q/k
  Hadamard, attention, the KV cache and SiLU*mul run on local data.
- o_proj and down_proj split by input columns (row parallel): each rank quantizes its slice of
  the activation per token with its own scale, multiplies its columns and scales the partial sum
  by its own x_scale and the (whole) channel scales; the float partial outputs are summed.
  sum_r x_scale_r * s * (x8_r . W_r) is the layer's output with finer activation scales; the
  per-channel W4 zero term szero * x_sum splits the same way, x_sum_r being the slice's sum.
- The vocabulary: the embedding looks up the ids it holds (VocabParallelEmbedding) and sums;
  the LM head computes its logits slice and LlamaModel.compute_logits gathers the slices.

One checkpoint serves every group size: `shard_tensor` maps each stored tensor to this rank's
slice, so `load_checkpoint_shard` reads a qoq checkpoint a decoder layer at a time and keeps only
its slice, and `shard_model` does the same to a model already in memory (both through
`assemble`, as do the benchmarks' random weights).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qoq.config import ConfigError, ModelConfig, QuantConfig
from qoq.distributed import TPGroup
from qoq.layers.linear import LinearFactory, dense_linear
from qoq.layers.parallel import VocabParallelEmbedding, slice_input_columns
from qoq.layers.rotary import RotaryEmbedding
from qoq.model.checkpoint import (QUANT_BUFFERS, CheckpointError, quant_linear_factory, read_quant_config,
                                  validate_quant_tensors)
from qoq.model.llama import LlamaModel
from qoq.model.qserve_format import qserve_parts
from qoq.model.weights import ShardedWeights, read_config

COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world_size` holds. KV heads split when there are at least as many as
    ranks; otherwise each is replicated on the world_size / num_kv_heads ranks whose query heads
    read it."""

    config: ModelConfig
    rank: int
    world_size: int
    group_size: int | None = None  # W4 g128: input splits must cut at multiples of this

    def __post_init__(self) -> None:
        cfg, n = self.config, self.world_size
        if cfg.num_heads % n:
            raise ConfigError(f"{cfg.num_heads} attention heads do not split over {n} ranks: choose a "
                              "tensor-parallel size that divides the head count")
        if (cfg.num_kv_heads % n) if cfg.num_kv_heads >= n else (n % cfg.num_kv_heads):
            raise ConfigError(f"{cfg.num_kv_heads} KV heads and {n} ranks: one must divide the other")
        if cfg.intermediate_size % n:
            raise ConfigError(f"intermediate size {cfg.intermediate_size} does not split over {n} ranks")
        g = self.group_size
        for name, size in (("o_proj", cfg.q_size), ("down_proj", cfg.intermediate_size)):
            if g and (size // n) % g:
                raise ConfigError(f"{name}'s {size} inputs over {n} ranks are {size // n} a rank, not a multiple "
                                  f"of the W4 group size {g}: use fewer ranks or a per-channel checkpoint")

    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.world_size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.world_size)

    @property
    def first_kv_head(self) -> int:
        return self.rank * self.num_heads // self.config.num_queries_per_kv

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.world_size

    @property
    def vocab_rows(self) -> int:
        """Embedding / head rows a rank holds: the vocabulary padded to world_size equal slices."""
        return -(-self.config.vocab_size // self.world_size)

    def local_config(self) -> ModelConfig:
        """The config of this rank's attention and MLP: its heads and intermediate slice."""
        return dataclasses.replace(self.config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate_size)

    def qkv_rows(self) -> torch.Tensor:
        """Rows of the fused [q | k | v] weight this rank holds: its q heads, then its KV heads' k and v."""
        cfg, d = self.config, self.config.head_dim
        q0, kv0 = self.rank * self.num_heads * d, self.first_kv_head * d
        q = torch.arange(q0, q0 + self.num_heads * d)
        k = cfg.q_size + torch.arange(kv0, kv0 + self.num_kv_heads * d)
        return torch.cat([q, k, k + cfg.kv_size])

    def gate_up_rows(self) -> torch.Tensor:
        i, width = self.config.intermediate_size, self.intermediate_size
        gate = torch.arange(self.rank * width, (self.rank + 1) * width)
        return torch.cat([gate, gate + i])

    def input_columns(self, projection: str) -> tuple[int, int, int]:
        """(k0, k1, in_features) of a row-parallel projection's slice."""
        size = self.config.q_size if projection == "o_proj" else self.config.intermediate_size
        width = size // self.world_size
        return self.rank * width, (self.rank + 1) * width, size


def plan_for(config: ModelConfig, quant: QuantConfig, tp: TPGroup) -> ShardPlan:
    return ShardPlan(config, tp.rank, tp.world_size, quant.granularity.group_size if quant.grouped_w4 else None)


def shard_tensor(name: str, t: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    """This rank's slice of the model tensor `name` (a LlamaModel state-dict name)."""
    module, _, buffer = name.rpartition(".")
    projection = module.rpartition(".")[2]
    if name in VOCAB_PARALLEL:
        start = plan.rank * plan.vocab_rows
        rows = t[start: start + plan.vocab_rows]
        return F.pad(rows, (0, 0, 0, plan.vocab_rows - rows.shape[0])).contiguous()
    if projection in COLUMN_PARALLEL:
        rows = plan.qkv_rows() if projection == "qkv_proj" else plan.gate_up_rows()
        return t.index_select(0, rows.to(t.device)).contiguous()
    if projection in ROW_PARALLEL:
        k0, k1, size = plan.input_columns(projection)
        return slice_input_columns(buffer, t, k0, k1, size, plan.group_size or 128)
    return t  # norms: whole on every rank


def sharded_skeleton(config: ModelConfig, quant: QuantConfig, tp: TPGroup, make_linear: LinearFactory) -> LlamaModel:
    """The model rank tp.rank runs, its linears built by make_linear at their local sizes, on the
    current device (meta, to assign into)."""
    plan = plan_for(config, quant, tp)
    local = plan.local_config()

    def make(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        projection = name.rpartition(".")[2]
        if projection == "qkv_proj":
            out_features = local.q_size + 2 * local.kv_size
        elif projection == "gate_up_proj":
            out_features = 2 * local.intermediate_size
        elif projection in ROW_PARALLEL:
            assert not bias, "a row-parallel bias would be added once per rank"
            in_features = local.q_size if projection == "o_proj" else local.intermediate_size
        return make_linear(in_features, out_features, bias, name)

    model = LlamaModel(config, make)
    model.quant_config = quant
    model.tp = tp
    model.embed_tokens = VocabParallelEmbedding(plan.vocab_rows, config.hidden_size, plan.rank * plan.vocab_rows, tp)
    if model.lm_head is not None:
        model.lm_head = nn.Linear(config.hidden_size, plan.vocab_rows, bias=False)
    for layer in model.layers:
        layer.self_attn.config = local
        layer.self_attn.tp = layer.mlp.tp = tp
        layer.mlp.intermediate_size = local.intermediate_size
    return model


def local_config(model: LlamaModel) -> ModelConfig:
    """The heads and sizes this rank runs (its KV cache holds local_config(model).num_kv_heads
    heads); the whole config without a group."""
    return model.layers[0].self_attn.config if model.layers else model.config


def _linear_factory(quant: QuantConfig) -> LinearFactory:
    return dense_linear if quant.weight_bits == 16 else quant_linear_factory(quant)


def _assign(model: LlamaModel, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing {missing[:4]}, unexpected {unexpected[:4]} for its config")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: {name}'s slice is {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(state, assign=True)


def assemble(config: ModelConfig, quant: QuantConfig, tp: TPGroup | None, parts: Iterable[dict[str, torch.Tensor]],
             where: str, device: str | torch.device = "cpu",
             place: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> LlamaModel:
    """Rank tp.rank's model (the whole model for tp None) from `parts`: batches of whole tensors
    by state-dict name (the embedding / norm / head, a decoder layer), each sliced for the rank as
    it comes and then dropped, so memory holds the result plus one batch. `place(name, slice)`
    moves or casts a slice (once it is small); the rotary cache goes to `device`."""
    with torch.device("meta"):
        if tp is None:
            model = LlamaModel(config, _linear_factory(quant))
            model.quant_config = quant
        else:
            model = sharded_skeleton(config, quant, tp, _linear_factory(quant))
    plan = None if tp is None else plan_for(config, quant, tp)
    state = {}
    for part in parts:
        for name, t in part.items():
            t = t if plan is None else shard_tensor(name, t, plan)
            state[name] = t if place is None else place(name, t)
    _assign(model, state, where)
    model.rotary = RotaryEmbedding.for_model(config).to(device)
    return model.eval()


def shard_model(model: LlamaModel, tp: TPGroup | None) -> LlamaModel:
    """A new model holding this rank's slice of `model` (which is left as it is); `model` itself
    for no group. Every rank must pass the same model."""
    if tp is None:
        return model
    return assemble(model.config, model.quant_config, tp, [model.state_dict()], "shard_model", model.device)


def load_checkpoint_shard(folder: str | Path, tp: TPGroup, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> LlamaModel:
    """Rank tp.rank's slice of a qoq packed checkpoint, read a decoder layer at a time: host
    memory holds this rank's slice plus one layer of the whole model, never the whole model."""
    folder = Path(folder)
    config, quant = read_config(folder), read_quant_config(folder)
    weights = ShardedWeights(folder)
    names = weights.names()
    batches = [[n for n in names if not n.startswith("layers.")]]
    batches += [[n for n in names if n.startswith(f"layers.{i}.")] for i in range(config.num_layers)]

    model = assemble(config, quant, tp, (weights.get_many(batch) for batch in batches), str(folder), device,
                     _placer(dtype, device))
    validate_quant_tensors(model)
    return model


def _placer(dtype: torch.dtype, device) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A slice to the device: float tensors in `dtype`, quantized buffers (codes, scales) as stored."""
    def place(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = not t.is_floating_point() or name.rpartition(".")[2] in QUANT_BUFFERS
        return t.to(device) if keep else t.to(device=device, dtype=dtype)
    return place


def load_qserve_shard(folder: str | Path, tp: TPGroup, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> LlamaModel:
    """Rank tp.rank's slice of a QServe model-zoo checkpoint, converted and sliced a decoder layer
    at a time."""
    config, quant, parts = qserve_parts(folder)
    model = assemble(config, quant, tp, parts, str(folder), device, _placer(dtype, device))
    validate_quant_tensors(model)
    return model


def load_hf_shard(folder: str | Path, tp: TPGroup, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> LlamaModel:
    """Rank tp.rank's slice of a HF safetensors folder (a float model), read a decoder layer at a
    time as load_checkpoint_shard reads a qoq checkpoint: never the whole model in host memory."""
    folder = Path(folder)
    config = read_config(folder)
    weights = ShardedWeights(folder)
    parts = itertools.chain([weights.global_state(config)],
                            (weights.layer_state(config, i) for i in range(config.num_layers)))

    return assemble(config, QuantConfig(), tp, parts, str(folder), device, _placer(dtype, device))
