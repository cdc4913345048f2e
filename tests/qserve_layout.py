"""A quantized model written in QServe's model-zoo layout (tests of the QServe reader)."""

import json

import torch
from safetensors.torch import save_file

from qoq.kernels import unpack_w4
from qoq.model.qserve_format import permute_groups, tile_qweight
from qoq.model.weights import hf_config_dict


def write_qserve(model, folder):
    """Our quantized tiny model written in QServe's model-zoo layout (unfused HF names)."""
    cfg = model.config
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight.half(), "lm_head.weight": model.lm_head.weight.half()}
    splits = {"self_attn.qkv_proj": (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)),
              "self_attn.o_proj": (("o_proj", cfg.hidden_size),),
              "mlp.gate_up_proj": (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)),
              "mlp.down_proj": (("down_proj", cfg.hidden_size),)}
    for i, layer in enumerate(model.layers):
        for fused, parts in splits.items():
            mod = layer.get_submodule(fused)
            codes, start = unpack_w4(mod.qweight), 0
            for hf, n in parts:
                p = f"model.layers.{i}.{fused.split('.')[0]}.{hf}"
                rows = slice(start, start + n)
                tensors[f"{p}.qweight"] = tile_qweight(codes[rows])
                tensors[f"{p}.s1_scales"] = mod.s1[rows].clone()
                if hasattr(mod, "s2"):
                    tensors[f"{p}.s2_scales"] = permute_groups(mod.s2[rows])
                    tensors[f"{p}.s2_zeros"] = permute_groups((-mod.sz[rows].int()).to(torch.int8))
                else:
                    tensors[f"{p}.s1_szeros"] = mod.szero[rows].clone()
                start += n
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
