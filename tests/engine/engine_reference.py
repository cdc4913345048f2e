"""An independent dense reference for the engine's quantized-cache semantics.

The engine runs prefill attention on full-precision K/V and decode attention on the quantized
cache (SPEC section 3). qoq.generate's kv_quantizer quantizes during prefill too, so this dense
backend mirrors the engine instead: prefill attends over fresh K/V, then stores quantize ->
dequantize(K/V); each decode token attends over the stored (dequantized) K/V, itself included.
"""

import torch
import torch.nn.functional as F

from qoq.kernels import dequantize_kv_ref, quantize_kv_ref


def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 16:
        return x
    return dequantize_kv_ref(*quantize_kv_ref(x, bits), bits, dtype=x.dtype)


class QuantizedDenseCache:
    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx, q, k, v, positions, rotary):
        q, k = rotary(positions, q, k)  # [1, T, H, D]
        kq, vq = fake_quant(k, self.bits), fake_quant(v, self.bits)
        if layer_idx not in self.k:  # prefill: fresh full-precision K/V, causal
            self.k[layer_idx], self.v[layer_idx] = kq, vq
            keys, values, causal = k, v, True
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], kq], 1)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], vq], 1)
            keys, values, causal = self.k[layer_idx], self.v[layer_idx], False
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).float(), keys.transpose(1, 2).float(), values.transpose(1, 2).float(),
            is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2).to(q.dtype)


@torch.inference_mode()
def greedy_reference(model, prompt_ids: list[int], max_tokens: int, bits: int, stop_ids=()) -> list[int]:
    cache = QuantizedDenseCache(bits)
    ids = torch.tensor([prompt_ids])
    positions = torch.arange(len(prompt_ids))[None]
    out: list[int] = []
    for _ in range(max_tokens):
        hidden = model(ids, positions, cache)
        token = int(model.compute_logits(hidden[:, -1]).argmax(-1))
        if token in stop_ids:
            break
        out.append(token)
        ids = torch.tensor([[token]])
        positions = positions[:, -1:] + 1
    return out


@torch.inference_mode()
def forced_logits(model, prompt_ids: list[int], output_ids: list[int], bits: int) -> torch.Tensor:
    """Reference logits [len(output_ids), V] for each output token, fed the engine's own tokens."""
    cache = QuantizedDenseCache(bits)
    ids = torch.tensor([prompt_ids])
    positions = torch.arange(len(prompt_ids))[None]
    rows = []
    for token in output_ids:
        rows.append(model.compute_logits(model(ids, positions, cache)[:, -1])[0])
        ids = torch.tensor([[token]])
        positions = positions[:, -1:] + 1
    return torch.stack(rows)
