"""Inline PTX shared by the Triton (int_gemm.py) and Gluon (ws_gemm.py) W4A8 kernels.

The word-wide W4 unpacks: four weights per 32-bit register, one packed byte holding channel j in
its low nibble and channel 64 + j in its high nibble (`int_gemm.pack_w4`).
"""

import os

# g128: $2 packed bytes, $3 the step s2 and $4 128 - sz (one byte each, replicated) -> $0 / $1 the
# low / high nibbles' Q8' = q4 * s2 - sz. q4 * s2 + (128 - sz) = Q8' + 128 lies in 0..255 for valid
# data, so the word-wide multiply-add never carries between bytes; xor 0x80 per byte gives int8 Q8'.
G128_UNPACK_ASM = """{
.reg .b32 t, s;
and.b32 s, $3, 0xFF;
and.b32 t, $2, 0x0F0F0F0F;
mad.lo.u32 t, t, s, $4;
xor.b32 $0, t, 0x80808080;
shr.u32 t, $2, 4;
and.b32 t, t, 0x0F0F0F0F;
mad.lo.u32 t, t, s, $4;
xor.b32 $1, t, 0x80808080;
}"""

# QOQ_G128_PARAM_WORDS=1 (read at import): the g128 unpacks of the register GEMMs (int_gemm) and the
# Gluon kernel (ws_gemm) take s2 / sz as per-row 32-bit words, G128_UNPACK_WORDS_ASM, and the gemv
# kernel takes each row's s2 / sz byte out of its parameter words by one byte permute (sm_90 SASS:
# 7-13% fewer instructions in their loops, tests/kernels/test_gemm.py); off until a GPU has checked
# them bit for bit and timed them.
G128_PARAM_WORDS = os.environ.get("QOQ_G128_PARAM_WORDS", "0") == "1"

# g128 with its parameters as 32-bit words: $2 packed bytes,
# $3 the step s2 and $7 (128 - sz) * 0x01010101 (four bytes 128 - sz; $4-$6 and $8-$10 are the
# copies a pack of four 32-bit arguments brings) -> $0 / $1 as G128_UNPACK_ASM: no per-word
# masking of s2, no byte packing of per-row constants into each register.
G128_UNPACK_WORDS_ASM = """{
.reg .b32 t;
and.b32 t, $2, 0x0F0F0F0F;
mad.lo.u32 t, t, $3, $7;
xor.b32 $0, t, 0x80808080;
shr.u32 t, $2, 4;
and.b32 t, t, 0x0F0F0F0F;
mad.lo.u32 t, t, $3, $7;
xor.b32 $1, t, 0x80808080;
}"""

# Per-channel: $2 packed bytes -> $0 / $1 the low / high nibbles, the uint4 codes themselves.
PER_CHANNEL_UNPACK_ASM = """{
.reg .b32 t;
and.b32 $0, $2, 0x0F0F0F0F;
shr.u32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
}"""
