"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2) for every precision.

Precision is a property of the linear layers, which come from one factory; attention goes through
a backend object so the same model runs dense (eval, generation) and paged (serving).
q/k/v and gate/up are fused projections, as a serving engine wants them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qoq.config import ModelConfig, QuantConfig
from qoq.distributed import TPGroup, all_reduce
from qoq.kernels import silu_mul
from qoq.layers.activation import (
    QuantizedActivation, accepts_int8, num_rows, quantizes_input, silu_mul_quantized,
)
from qoq.layers.attention import AttentionBackend, CausalAttention
from qoq.layers.linear import LinearFactory, dense_linear
from qoq.layers.norm import RMSNorm
from qoq.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        prefix = f"layers.{layer_idx}.self_attn"
        self.qkv_proj = make_linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, config.attention_bias, f"{prefix}.qkv_proj"
        )
        self.o_proj = make_linear(config.q_size, config.hidden_size, False, f"{prefix}.o_proj")
        # Tensor parallel (qoq.model.tensor_parallel): config holds this rank's heads, o_proj its
        # input rows, and the partial outputs are summed over the group.
        self.tp: TPGroup | None = None

    def forward(
        self, x, positions: torch.Tensor, rotary: RotaryEmbedding, attn: AttentionBackend, norm=None
    ) -> torch.Tensor:
        """x: [B, T, hidden], or the same as int8 rows (QuantizedActivation) for a quantized qkv_proj.

        norm (RMSNorm, residual): return that norm's (int8 rows, residual sum) of the output
        instead, o_proj's GEMM doing the norm in its last program (QuantLinear.forward_norm)."""
        cfg = self.config
        batch, num_tokens = positions.shape
        rows = batch * num_tokens
        tail = self._rope_tail(x, attn, positions, rotary, rows)
        if tail is not None:  # one decode: the qkv GEMM's programs rotate q and write the new K/V
            q = self.qkv_proj.forward_rope(x, tail).view(batch, num_tokens, cfg.num_heads, cfg.head_dim)
            k = v = None
            written = {"written": True}
        else:
            q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.view(batch, num_tokens, cfg.num_heads, cfg.head_dim)
            k = k.view(batch, num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(batch, num_tokens, cfg.num_kv_heads, cfg.head_dim)
            written = {}
        if self._attention_quantizes(attn, q, rows):  # o_proj's int8 rows from attention itself
            out = attn(self.layer_idx, q, k, v, positions, rotary, quantize=True, **written)
        else:
            out = attn(self.layer_idx, q, k, v, positions, rotary, **written).reshape(batch, num_tokens, cfg.q_size)
        if norm is not None:
            return norm[0].after(self.o_proj, out, norm[1])
        return all_reduce(self.o_proj(out), self.tp)

    def _rope_tail(self, x, attn: AttentionBackend, positions: torch.Tensor, rotary: RotaryEmbedding, rows: int):
        """The backend's RopeTail where qkv_proj's GEMM can run RoPE and the KV write itself
        (QuantLinear.rotates_output: one token on a gemv plan; the engine's PagedAttention.rope_tail:
        a step of that one decode), else None."""
        ask, able = getattr(attn, "rope_tail", None), getattr(self.qkv_proj, "rotates_output", None)
        if ask is None or able is None or self.tp is not None or not able(rows, x.dtype, self.config.head_dim):
            return None
        return ask(self.layer_idx, positions, rotary, self.config.num_heads)

    def _attention_quantizes(self, attn: AttentionBackend, q: torch.Tensor, rows: int) -> bool:
        """Whether the backend hands o_proj its input as int8 rows (engine PagedAttention's
        `quantizes_output`: decode attention's last program per sequence quantizes the row), where
        o_proj takes int8 rows from a row kernel otherwise (not quantizing its input itself)."""
        ask = getattr(attn, "quantizes_output", None)
        return (ask is not None and accepts_int8(self.o_proj) and not quantizes_input(self.o_proj, rows)
                and ask(q))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory) -> None:
        super().__init__()
        prefix = f"layers.{layer_idx}.mlp"
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = make_linear(
            config.hidden_size, 2 * config.intermediate_size, False, f"{prefix}.gate_up_proj"
        )
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size, False, f"{prefix}.down_proj")
        self.tp: TPGroup | None = None  # tensor parallel: down_proj holds this rank's input rows

    def forward(self, x, norm=None) -> torch.Tensor:
        """norm (RMSNorm, residual): that norm's (int8 rows, residual sum) of the output instead,
        down_proj's GEMM doing the norm in its last program (QuantLinear.forward_norm)."""
        if norm is not None:
            return self._forward(x, norm)
        return all_reduce(self._forward(x), self.tp)

    def _forward(self, x, norm=None):
        fuses = getattr(self.gate_up_proj, "fuses_silu_mul", None)
        if accepts_int8(self.down_proj) and fuses is not None and fuses(num_rows(x)):
            # SiLU*mul in the gate/up GEMM's epilogue (W4 on Hopper at large M): the [M, 2I] gate_up
            # is never written; down_proj quantizes the [M, I] product itself.
            return self._down(self.gate_up_proj(x, silu_mul=True), norm)
        if accepts_int8(self.down_proj) and quantizes_output(self.gate_up_proj, num_rows(x), x.dtype, "silu"):
            # one token on a gemv plan: the GEMM's last program quantizes silu(gate) * up for down_proj
            return self._down(self.gate_up_proj.forward_silu(x), norm)
        gate_up = self.gate_up_proj(x)
        if accepts_int8(self.down_proj):  # SiLU*mul and the int8 quantization in one kernel
            return self._down(silu_mul_quantized(gate_up), norm)
        return self.down_proj(silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1))

    def _down(self, act, norm):
        return self.down_proj(act) if norm is None else norm[0].after(self.down_proj, act, norm[1])


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, make_linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx, make_linear)

    def forward(
        self, x: torch.Tensor | QuantizedActivation, positions: torch.Tensor, rotary: RotaryEmbedding,
        attn: AttentionBackend, residual: torch.Tensor | None = None, next_layer: "DecoderLayer | None" = None,
    ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        """-> (the MLP's output, the residual stream before it): the layer's output is their sum.

        The caller hands that pair on as (x, residual), and the next norm adds them in its own
        kernel (the residual add costs no pass of its own); residual None: x is the stream itself.
        A quantized linear after a norm gets int8 rows from the same fused kernel, or at decode
        sizes where its GEMM quantizes its own input, the norm deferred into that GEMM. At one
        token on a gemv plan (`norm_tail`) the GEMM before a norm does the norm in its last
        program instead: o_proj's output reaches gate/up as int8 rows, and with `next_layer`
        down_proj's reaches that layer's qkv so (x is then those rows and residual their sum).
        """
        rows = num_rows(x)
        qkv, gate_up = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        if isinstance(x, QuantizedActivation):  # the previous layer's down_proj ran this layer's input norm
            h = x
        elif residual is None:
            residual = x
            h = self.input_layernorm(x, accepts_int8(qkv), defer=quantizes_input(qkv, rows))
        else:
            h, residual = self.input_layernorm(x, accepts_int8(qkv), residual, defer=quantizes_input(qkv, rows))
        if self.self_attn.tp is None and norm_tail(self.self_attn.o_proj, gate_up, rows, residual.dtype):
            h, residual = self.self_attn(h, positions, rotary, attn, norm=(self.post_attention_layernorm, residual))
        else:
            h, residual = self.post_attention_layernorm(self.self_attn(h, positions, rotary, attn),
                                                        accepts_int8(gate_up), residual,
                                                        defer=quantizes_input(gate_up, rows))
        if (next_layer is not None and self.mlp.tp is None
                and norm_tail(self.mlp.down_proj, next_layer.self_attn.qkv_proj, rows, residual.dtype)):
            return self.mlp(h, norm=(next_layer.input_layernorm, residual))
        return self.mlp(h), residual


def norm_tail(producer: nn.Module, consumer: nn.Module, rows: int, dtype: torch.dtype) -> bool:
    """Whether `producer`'s GEMM runs the norm between it and the quantized `consumer` in its last
    program (QuantLinear.quantizes_output) for a batch of `rows` tokens."""
    return accepts_int8(consumer) and quantizes_output(producer, rows, dtype)


def quantizes_output(linear: nn.Module, rows: int, dtype: torch.dtype, kind: str = "norm") -> bool:
    ask = getattr(linear, "quantizes_output", None)
    return ask is not None and ask(rows, dtype, kind)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory = dense_linear) -> None:
        super().__init__()
        self.config = config
        self.quant_config = QuantConfig()  # w16a16kv16 until a quantizer or checkpoint says otherwise
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, make_linear) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head stays full precision (docs/formats.md#precisions). With tied embeddings it is the embedding
        # matrix itself, until a transform (rotation) unties them.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding.for_model(config)
        self.tp: TPGroup | None = None  # tensor parallel: embedding and head hold a vocab slice each

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, T] -> final hidden states [B, T, hidden] (before the LM head)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        attn = attn if attn is not None else CausalAttention(self.quant_config.kv_bits, self.quant_config.qk_hadamard)
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            x, residual = layer(x, positions, self.rotary, attn, residual, next_layer=following)
        return self.norm(x) if residual is None else self.norm(x, residual=residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden.to(weight.dtype), weight).float()
        if self.tp is None:
            return logits
        return self.tp.all_gather(logits)[..., : self.config.vocab_size]  # the vocab is padded to N equal slices

    def untie_lm_head(self) -> None:
        """Give the LM head its own weight (needed once the embedding is transformed)."""
        if self.lm_head is None:
            self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
            self.lm_head.to(self.embed_tokens.weight)
            self.lm_head.weight.data.copy_(self.embed_tokens.weight.data)
            self.config.tie_word_embeddings = False

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
