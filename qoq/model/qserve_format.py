"""QServe model-zoo checkpoints (mit-han-lab/qserve), read into qoq's packed model.

Their layout, per HF-named linear (q/k/v/o_proj, gate/up/down_proj, unfused):
- `qweight` int8 [N, K/2]: uint4 codes tiled for their Ampere MMA ("compute-aware reordering"):
  the [N, K] codes seen as [N/32, 2, 2, 8, K/32, 2, 4, 4] = (a, b, c, d, e, f, g, h) are stored in
  the order (a, e, d, g, f, c, h) with b as the nibble (b = 0 low, b = 1 high).
- `s1_scales` fp16 [N]: the per-channel scale (g128: level-1 int8 step; per-channel: uint4 step).
- g128: `s2_scales` int8 [K/128, N] and `s2_zeros` int8 [K/128, N] holding -(z * s2); within each
  block of 32 output channels, channel 8 * i + j is stored at position 4 * j + i.
- per-channel: `s1_szeros` fp16 [N] = z * s.
- embeddings and lm_head plain; norms are not read (QServe folds them: weights are ones).
There is no quant config file: the format is recognised by `*.qweight` tensors, the group size
by `s2_scales`, and the KV cache is 4-bit as QServe serves these models (KV8 with kv_bits=8).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from qoq.config import G128, PER_CHANNEL, Granularity, QuantConfig
from qoq.kernels import pack_w4
from qoq.layers.formats import pad_k
from qoq.model.checkpoint import QUANT_CONFIG_FILE, CheckpointError, assemble_model, validate_quant_tensors
from qoq.model.llama import LlamaModel
from qoq.model.weights import ShardedWeights, read_config

_TILE = (2, 2, 8, 2, 4, 4)  # (b, c, d) over N blocks of 32, (f, g, h) over K blocks of 32
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def is_qserve_checkpoint(folder: Path) -> bool:
    files = sorted(folder.glob("*.safetensors"))
    if not files or (folder / QUANT_CONFIG_FILE).exists():
        return False
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            return any(k.endswith(".qweight") for k in f.keys())
    except Exception:  # unreadable: let the HF path report the corrupt file
        return False


def untile_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """QServe's tiled int8 [N, K/2] -> uint4 codes uint8 [N, K]."""
    n, kh = qweight.shape
    if n % 32 or (2 * kh) % 32:
        raise CheckpointError(f"QServe qweight {tuple(qweight.shape)}: N and K must be multiples of 32")
    b = qweight.view(torch.uint8).reshape(n // 32, 2 * kh // 32, 8, 4, 2, 2, 4)  # (a, e, d, g, f, c, h)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1)  # (a, e, d, g, f, c, h, b)
    return codes.permute(0, 7, 5, 2, 1, 4, 3, 6).reshape(n, 2 * kh)


def tile_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `untile_qweight` (to write test checkpoints in QServe's layout)."""
    n, k = codes.shape
    t = codes.to(torch.uint8).reshape(n // 32, *_TILE[:3], k // 32, *_TILE[3:])  # (a, b, c, d, e, f, g, h)
    t = t.permute(0, 4, 3, 6, 5, 2, 7, 1)  # (a, e, d, g, f, c, h, b)
    return (t[..., 0] | (t[..., 1] << 4)).reshape(n, k // 2).view(torch.int8)


def unpermute_groups(t: torch.Tensor) -> torch.Tensor:
    """[G, N] in QServe's within-32 order -> [N, G] natural order."""
    g, n = t.shape
    return t.reshape(g, n // 32, 8, 4).transpose(-2, -1).reshape(g, n).T.contiguous()


def permute_groups(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpermute_groups`: [N, G] -> stored [G, N]."""
    n, g = t.shape
    return t.T.reshape(g, n // 32, 4, 8).transpose(-2, -1).reshape(g, n).contiguous()


def _linear_tensors(raw: dict, prefix: str, granularity: Granularity) -> dict[str, torch.Tensor]:
    """One HF-named QServe linear -> (codes [N, K], s1, s2 [N, G], sz [N, G] | szero [N], bias)."""
    try:
        out = {"codes": untile_qweight(raw[f"{prefix}.qweight"]), "s1": raw[f"{prefix}.s1_scales"].half()}
        if not granularity.per_channel:
            out["s2"] = unpermute_groups(raw[f"{prefix}.s2_scales"])
            out["sz"] = -unpermute_groups(raw[f"{prefix}.s2_zeros"]).int()
        else:
            out["szero"] = raw[f"{prefix}.s1_szeros"].half()
    except KeyError as err:
        raise CheckpointError(f"QServe checkpoint lacks {err.args[0]}") from err
    if f"{prefix}.bias" in raw:
        out["bias"] = raw[f"{prefix}.bias"]
    return out


def _fused_state(raw: dict, layer: int, fused: str, members, granularity: Granularity) -> dict[str, torch.Tensor]:
    block = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
    parts = [_linear_tensors(raw, f"layers.{layer}.{block}.{m}", granularity) for m in members]
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    name = f"layers.{layer}.{block}.{fused}"
    state = {f"{name}.qweight": pack_w4(pad_k(cat["codes"])), f"{name}.s1": cat["s1"]}
    if not granularity.per_channel:
        state[f"{name}.s2"], state[f"{name}.sz"] = cat["s2"].to(torch.int8), cat["sz"].to(torch.int8)
    else:
        state[f"{name}.szero"] = cat["szero"]
    if "bias" in cat:
        state[f"{name}.bias"] = cat["bias"].float()
    return state


def qserve_parts(folder: str | Path, kv_bits: int = 4):
    """(config, quant config, parts): a QServe checkpoint as batches of qoq-named tensors (the
    embedding / head / final norm, then each decoder layer), read from the shards a batch at a
    time, so a caller that slices them (tensor parallel) never holds the whole model."""
    folder = Path(folder)
    config = read_config(folder)
    weights = ShardedWeights(folder)
    names = weights.names()
    granularity = G128 if any(k.endswith(".s2_scales") for k in names) else PER_CHANNEL
    qc = QuantConfig(f"w4a8kv{kv_bits}", granularity, rotation="qserve (baked into the weights)")
    ones = torch.ones(config.hidden_size)

    def read(wanted: list[str]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("model."): v for k, v in weights.get_many(wanted).items()}

    def parts():
        wanted = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
        for name in wanted:
            if name not in names:
                raise CheckpointError(f"QServe checkpoint {folder} lacks {name.removeprefix('model.')}")
        yield {**read(wanted), "norm.weight": ones}
        for i in range(config.num_layers):
            raw = read([n for n in names if n.startswith(f"model.layers.{i}.")])
            state = {f"layers.{i}.input_layernorm.weight": ones, f"layers.{i}.post_attention_layernorm.weight": ones}
            for fused, members in (*_FUSED.items(), ("o_proj", ("o_proj",)), ("down_proj", ("down_proj",))):
                state.update(_fused_state(raw, i, fused, members, granularity))
            yield state

    return config, qc, parts()


def load_qserve_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu", kv_bits: int = 4) -> LlamaModel:
    config, qc, parts = qserve_parts(folder, kv_bits)
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        state.update(part)
    model = assemble_model(config, qc, state, dtype, device, where=str(folder))
    validate_quant_tensors(model)
    return model
