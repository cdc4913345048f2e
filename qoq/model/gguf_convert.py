"""Convert a llama.cpp GGUF file into a HuggingFace-style folder, once, in the user cache.

The folder (config.json, model.safetensors, tokenizer files) then loads through the ordinary
HF path, so a second start costs a safetensors mmap instead of a GGUF dequantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

GGUF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def cache_root() -> Path:
    root = os.environ.get("QOQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qoq"
    )
    return Path(root)


def converted_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows with each head's rotary pairs interleaved; HF keeps the two halves
    # of a head apart ("rotate_half"). Undo that per head.
    half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _hf_config(reader, arch: str, has_output: bool) -> dict:
    def meta(name, default=None):
        return _field(reader, f"{arch}.{name}", default)

    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    num_kv_heads = int(meta("attention.head_count_kv", num_heads))
    vocab = meta("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    rope_type = "llama3" if meta("rope.scaling.type") == "llama3" else "default"
    cfg = {
        "architectures": [GGUF_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": int(meta("attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "tie_word_embeddings": not has_output,
        "attention_bias": arch == "qwen2",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if rope_type != "default":
        cfg["rope_scaling"] = {"rope_type": rope_type, "factor": float(meta("rope.scaling.factor", 1.0))}
    return cfg


def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize every tensor of `gguf_path` to fp32 and write an HF folder; returns it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out_dir = out_dir or converted_dir(gguf_path)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError) as err:  # gguf raises ValueError for a bad magic or a truncated file
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({err}): pass a .gguf model, an HF folder "
                         "or a qoq checkpoint") from None
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; qoq reads {', '.join(GGUF_ARCHS)}"
        )
    names = {t.name for t in reader.tensors}
    config = _hf_config(reader, arch, has_output="output.weight" in names)
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor"):
        array = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
            name = f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
        else:
            continue  # e.g. precomputed rope frequencies: we compute our own
        if arch in ("llama", "mistral") and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in t.name else config["num_key_value_heads"]
            array = _unpermute_rope(array, heads)
        tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
    # Written beside the target and renamed, so an interrupted conversion is never mistaken for a
    # finished one, and two processes converting at once do not collide.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(gguf_path, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"source": str(gguf_path)})
    if (out_dir / "model.safetensors").exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
    return out_dir


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
