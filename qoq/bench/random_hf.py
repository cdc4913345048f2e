"""A HuggingFace-style model folder with random weights, for measuring on machines with no
network: `qoq quantize` and `qoq serve` take it exactly as they take a downloaded model.

The folder holds config.json, bf16 safetensors shards (one per decoder layer, one for the
embedding / norm / head) with an index, and a synthetic word-level tokenizer of the config's
vocabulary size (qoq/bench/synthetic_tokenizer.py), so text in, token ids and text out all work. A
matching calibration text is `random_text`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from qoq.bench.random_model import bundled_config
from qoq.bench.synthetic_tokenizer import synthetic_tokenizer
from qoq.config import ModelConfig
from qoq.model.llama import DecoderLayer
from qoq.model.weights import hf_config_dict, qoq_to_hf_state_dict

_W_STD = 0.02


def random_text(num_words: int, vocab_size: int, seed: int = 0) -> str:
    """Words of the synthetic vocabulary (never t0, its unknown word), for calibration."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"t{i}" for i in torch.randint(1, vocab_size, (num_words,), generator=gen).tolist())


def _random_layer_state(config: ModelConfig, index: int, device: str, dtype: torch.dtype) -> dict:
    with torch.device("meta"):
        layer = DecoderLayer(config, index, lambda i, o, b, name: torch.nn.Linear(i, o, bias=b))
    state = {}
    for name, p in layer.state_dict().items():
        if name.endswith("norm.weight"):
            t = 1 + 0.5 * torch.rand(p.shape, device=device)
        else:
            t = torch.randn(p.shape, device=device) * _W_STD
        state[f"layers.{index}.{name}"] = t.to(dtype)
    return state


def write_random_hf_folder(config: ModelConfig | str, folder: str | Path, num_layers: int | None = None,
                           device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a random model of `config` (a bundled config name or a ModelConfig) to `folder`,
    a layer at a time (host memory stays at one layer), optionally with only `num_layers`."""
    if isinstance(config, str):
        config = bundled_config(config)
    if num_layers is not None:
        config.num_layers = num_layers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    total = config.num_layers + 1
    weight_map: dict[str, str] = {}

    def write(state: dict, index: int) -> None:
        file = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        hf = qoq_to_hf_state_dict(state, config)
        save_file({k: v.cpu().contiguous() for k, v in hf.items()}, str(folder / file))
        weight_map.update(dict.fromkeys(hf, file))

    globals_ = {"embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size, device=device).to(dtype),
                "norm.weight": (1 + 0.5 * torch.rand(config.hidden_size, device=device)).to(dtype)}
    if not config.tie_word_embeddings:
        globals_["lm_head.weight"] = (torch.randn(config.vocab_size, config.hidden_size, device=device)
                                      * _W_STD).to(dtype)
    write(globals_, config.num_layers)
    del globals_
    for i in tqdm(range(config.num_layers), desc=f"random {config.architecture} folder", unit="layer"):
        write(_random_layer_state(config, i, device, dtype), i)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_config = hf_config_dict(config)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    # No model_type: transformers' AutoTokenizer would pick the family's own tokenizer class (e.g.
    # Qwen2Tokenizer) over the synthetic one; `architectures` still names the model for qoq.
    hf_config.pop("model_type")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    eos = config.eos_token_ids[0] if config.eos_token_ids else 0
    synthetic_tokenizer(config.vocab_size, eos, folder)
    return folder


def truncated_view(folder: str | Path, out: str | Path, num_layers: int) -> Path:
    """A folder that reads as the first `num_layers` layers of `folder` (hard links to its
    shards, no copy): one generated model measures several depths."""
    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keep = {k: f for k, f in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    for file in set(keep.values()):
        if not (out / file).exists():
            (out / file).hardlink_to(folder / file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": num_layers}, indent=2))
    for f in folder.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    for f in folder.glob("special_tokens_map.json"):
        (out / f.name).write_bytes(f.read_bytes())
    return out
