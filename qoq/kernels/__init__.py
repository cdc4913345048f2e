"""Triton kernels of qoq, each with a plain-torch reference twin of the same signature.

Public functions dispatch through `qoq.kernels.dispatch.use_triton` (CUDA tensors -> Triton,
CPU -> reference). See docs/kernels.md for the number formats and layouts.
"""

from qoq.kernels.decode_attention import paged_decode_attention
from qoq.kernels.dispatch import use_triton
from qoq.kernels.kv_cache import (
    KVAppend,
    KVCacheLayer,
    allocate_kv_cache,
    dequantize_kv_ref,
    quantize_kv_ref,
    rope_kv_write,
)
from qoq.kernels.paged_prefill_attention import paged_prefill_attention
from qoq.kernels.prefill_attention import prefill_attention
from qoq.kernels.quant import (
    add_rmsnorm,
    add_rmsnorm_quant,
    quantize_per_token,
    rmsnorm,
    rmsnorm_quant,
    silu_mul,
    silu_mul_quant,
)
from qoq.kernels.w4a8_gemm import pack_w4, unpack_w4, w4a8_g128_gemm, w4a8_per_channel_gemm
from qoq.kernels.w8a8_gemm import w8a8_gemm

__all__ = [
    "KVAppend",
    "KVCacheLayer",
    "add_rmsnorm",
    "add_rmsnorm_quant",
    "allocate_kv_cache",
    "dequantize_kv_ref",
    "pack_w4",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_attention",
    "quantize_kv_ref",
    "quantize_per_token",
    "rmsnorm",
    "rmsnorm_quant",
    "rope_kv_write",
    "silu_mul",
    "silu_mul_quant",
    "unpack_w4",
    "use_triton",
    "w4a8_g128_gemm",
    "w4a8_per_channel_gemm",
    "w8a8_gemm",
]
