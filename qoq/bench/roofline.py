"""Roofline estimate of an end-to-end generation run (the QServe protocol).

A run is one prefill of `batch x input_len` tokens (compute-bound: GEMM ops over the matrix
rate) followed by `output_len` decode steps, each bound by the larger of bytes moved (weights
once per step + the KV cache read so far) over the copy bandwidth, and GEMM + attention ops
over the matrix rate. Ceilings are measured on the device in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

from qoq.config import ModelConfig, QuantConfig


@dataclass
class Ceilings:
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written
    bf16_ops_per_s: float
    int8_ops_per_s: float


def linear_params(cfg: ModelConfig) -> int:
    per_layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
    per_layer += 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer


def weight_bytes(cfg: ModelConfig, quant: QuantConfig) -> float:
    linear = linear_params(cfg) * quant.weight_bits / 8
    if quant.grouped_w4:
        linear += linear_params(cfg) / quant.granularity.group_size * 2  # int8 step + int8 scaled zero per group
    lm_head = cfg.vocab_size * cfg.hidden_size * 2  # fp16, read every step (embedding lookups are tiny)
    return linear + lm_head


def kv_bytes_per_token(cfg: ModelConfig, quant: QuantConfig) -> float:
    payload = 2 * cfg.num_layers * cfg.kv_size * quant.kv_bits / 8
    scales = 0 if quant.kv_bits == 16 else 2 * cfg.num_layers * cfg.num_kv_heads * 4  # fp16 scale + zero
    return payload + scales


def run_seconds(cfg: ModelConfig, quant: QuantConfig, batch: int, input_len: int, output_len: int,
                ceil: Ceilings) -> float:
    rate = ceil.int8_ops_per_s if quant.act_bits == 8 else ceil.bf16_ops_per_s
    gemm_ops_per_token = 2 * (linear_params(cfg) + cfg.vocab_size * cfg.hidden_size)
    attn_ops = lambda ctx: 4 * cfg.num_layers * cfg.q_size * ctx  # noqa: E731 - QK^T and PV per token
    prefill = batch * (input_len * gemm_ops_per_token + attn_ops(input_len) * input_len / 2) / rate
    prefill = max(prefill, weight_bytes(cfg, quant) / ceil.copy_bytes_per_s)
    decode = 0.0
    kv_tok = kv_bytes_per_token(cfg, quant)
    for step in range(output_len):
        ctx = input_len + step
        # The copy ceiling counts bytes read + written, i.e. total DRAM traffic: a read-only stream
        # moves its bytes at the same rate.
        bytes_time = (weight_bytes(cfg, quant) + batch * ctx * kv_tok) / ceil.copy_bytes_per_s
        ops_time = batch * (gemm_ops_per_token + attn_ops(ctx)) / rate
        decode += max(bytes_time, ops_time)
    return prefill + decode


def roofline_tokens_per_s(cfg: ModelConfig, quant: QuantConfig, batch: int, input_len: int,
                          output_len: int, ceil: Ceilings) -> float:
    return batch * output_len / run_seconds(cfg, quant, batch, input_len, output_len, ceil)
