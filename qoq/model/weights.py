"""HuggingFace model folders as tensors: config.json <-> ModelConfig, safetensors shards read by
name, and the renaming between HF's tensor names and ours (q/k/v and gate/up fused).

The loader, the checkpoint readers and `qoq quantize` (layer by layer from the shards) all read
folders through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from qoq.config import ConfigError, ModelConfig


class LoadError(ValueError):
    """A model path or file that qoq cannot load; the message says what to do."""


def read_config(folder: Path) -> ModelConfig:
    try:
        data = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{folder / 'config.json'} is not valid JSON: {err}") from err
    try:
        return ModelConfig.from_hf(data)
    except (ConfigError, KeyError) as err:
        raise LoadError(f"{folder}: {err}") from err


def hf_config_dict(config: ModelConfig) -> dict:
    """The HF config.json of `config` (what read_config reads back)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.architecture]
    rope = config.rope_scaling
    out = {
        "architectures": [arch], "model_type": config.architecture, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids,
    }
    if rope.rope_type != "default":
        out["rope_scaling"] = {"rope_type": rope.rope_type, "factor": rope.factor,
                               "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
                               "original_max_position_embeddings": rope.original_max_position_embeddings}
    return out


def shard_files(folder: Path) -> list[str]:
    """The *.safetensors shards of `folder` (from its index when it has one), checked to lie inside it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise LoadError(f"{index} is not a valid safetensors index ({err})") from err
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if pickles:
            raise LoadError(f"{folder} holds only pickle weights ({pickles[0]}...), which qoq does not load (they can "
                            "run code): convert them to safetensors first, e.g. with transformers' "
                            "save_pretrained(..., safe_serialization=True)")
        raise LoadError(f"{folder} has no *.safetensors weights")
    root = folder.resolve()
    for file in files:
        if root not in (folder / file).resolve().parents:
            raise LoadError(f"{folder}: the safetensors index names {file!r}, outside the model folder")
    return files


def iter_safetensors(folder: Path):
    """Yield (name, tensor) over every *.safetensors shard of `folder`."""
    files = shard_files(folder)
    for file in tqdm(files, desc="loading weights", unit="shard", disable=len(files) < 2):
        try:
            with safe_open(str(folder / file), framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise LoadError(f"{folder / file}: cannot read safetensors ({err})") from err


class ShardedWeights:
    """A folder's safetensors tensors by name, read on demand: one decoder layer at a time never
    needs the whole model in host memory. Each read opens the shards it needs and closes them
    again, so the memory-mapped pages of layers already read do not stay mapped (and counted in
    the process's resident memory) until the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._where: dict[str, str] = {}
        for file in shard_files(folder):
            with self._shard(file) as shard:
                self._where.update(dict.fromkeys(shard.keys(), file))

    def _shard(self, file: str):
        try:
            return safe_open(str(self.folder / file), framework="pt")
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise LoadError(f"{self.folder / file}: cannot read safetensors ({err})") from err

    def names(self) -> list[str]:
        return list(self._where)

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self._where]
        if missing:
            raise LoadError(f"{self.folder}: no tensor {missing[0]!r} in its safetensors shards")
        out: dict[str, torch.Tensor] = {}
        for file in sorted({self._where[n] for n in names}):
            with self._shard(file) as shard:
                out.update({n: shard.get_tensor(n) for n in names if self._where[n] == file})
        return out

    def layer_state(self, config: ModelConfig, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer `index` under our names (layers.{index}. ..., q/k/v and gate/up fused)."""
        prefix = f"model.layers.{index}."
        names = [n for n in self._where if n.startswith(prefix)]
        if not names:
            raise LoadError(f"{self.folder}: no tensors for decoder layer {index} ({prefix}*)")
        return hf_to_qoq_state_dict(self.get_many(names).items(), config)

    def global_state(self, config: ModelConfig) -> dict[str, torch.Tensor]:
        """The embedding, the final norm and (untied) the LM head under our names."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not config.tie_word_embeddings:
            names.append("lm_head.weight")
        return hf_to_qoq_state_dict(self.get_many(names).items(), config)


def hf_to_qoq_state_dict(hf_tensors, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to ours and fuse q/k/v and gate/up."""
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in hf_tensors:
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "rotary_emb" in name:
            continue
        for fused, members in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
            hit = next((m for m in members if f".{m}." in name), None)
            if hit:
                key = name.replace(hit, fused)
                parts.setdefault(key, {})[hit] = tensor
                break
        else:
            state[name] = tensor
    order = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for key, pieces in parts.items():
        members = order["qkv_proj" if "qkv_proj" in key else "gate_up_proj"]
        missing = [m for m in members if m not in pieces]
        if missing:
            raise LoadError(f"checkpoint lacks {', '.join(key.replace(key.split('.')[-2], m) for m in missing)}")
        state[key] = torch.cat([pieces[m] for m in members], dim=0)
    return state


def qoq_to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_qoq_state_dict for a float model: HF names, q/k/v and gate/up split."""
    out: dict[str, torch.Tensor] = {}
    splits = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), (config.q_size, config.kv_size, config.kv_size)),
              "gate_up_proj": (("gate_proj", "up_proj"), (config.intermediate_size, config.intermediate_size))}
    for name, tensor in state.items():
        if name.startswith("rotary"):
            continue
        fused = next((f for f in splits if f".{f}." in name), None)
        hf = name if name == "lm_head.weight" else f"model.{name}"
        if fused is None:
            out[hf] = tensor
            continue
        members, sizes = splits[fused]
        for member, part in zip(members, tensor.split(list(sizes), dim=0)):
            out[hf.replace(fused, member)] = part.contiguous()
    return out
