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
from qoq.layers.activation import accepts_int8, num_rows, quantizes_input, silu_mul_quantized
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
        self, x, positions: torch.Tensor, rotary: RotaryEmbedding, attn: AttentionBackend
    ) -> torch.Tensor:
        """x: [B, T, hidden], or the same as int8 rows (QuantizedActivation) for a quantized qkv_proj."""
        cfg = self.config
        batch, num_tokens = positions.shape
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(batch, num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.view(batch, num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(batch, num_tokens, cfg.num_kv_heads, cfg.head_dim)
        out = attn(self.layer_idx, q, k, v, positions, rotary)
        return all_reduce(self.o_proj(out.reshape(batch, num_tokens, cfg.q_size)), self.tp)


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

    def forward(self, x) -> torch.Tensor:
        return all_reduce(self._forward(x), self.tp)

    def _forward(self, x) -> torch.Tensor:
        fuses = getattr(self.gate_up_proj, "fuses_silu_mul", None)
        if accepts_int8(self.down_proj) and fuses is not None and fuses(num_rows(x)):
            # SiLU*mul in the gate/up GEMM's epilogue (W4 on Hopper at large M): the [M, 2I] gate_up
            # is never written; down_proj quantizes the [M, I] product itself.
            return self.down_proj(self.gate_up_proj(x, silu_mul=True))
        gate_up = self.gate_up_proj(x)
        if accepts_int8(self.down_proj):  # SiLU*mul and the int8 quantization in one kernel
            return self.down_proj(silu_mul_quantized(gate_up))
        return self.down_proj(silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, make_linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx, make_linear)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, attn: AttentionBackend,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the MLP's output, the residual stream before it): the layer's output is their sum.

        The caller hands that pair on as (x, residual), and the next norm adds them in its own
        kernel (the residual add costs no pass of its own); residual None: x is the stream itself.
        A quantized linear after a norm gets int8 rows from the same fused kernel, or at decode
        sizes where its GEMM quantizes its own input, the norm deferred into that GEMM.
        """
        rows = x.numel() // x.shape[-1]
        qkv, gate_up = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        if residual is None:
            residual = x
            h = self.input_layernorm(x, accepts_int8(qkv), defer=quantizes_input(qkv, rows))
        else:
            h, residual = self.input_layernorm(x, accepts_int8(qkv), residual, defer=quantizes_input(qkv, rows))
        h, residual = self.post_attention_layernorm(self.self_attn(h, positions, rotary, attn), accepts_int8(gate_up),
                                                    residual, defer=quantizes_input(gate_up, rows))
        return self.mlp(h), residual


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
        for layer in self.layers:
            x, residual = layer(x, positions, self.rotary, attn, residual)
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
