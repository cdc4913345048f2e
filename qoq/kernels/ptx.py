"""Inline PTX shared by the Triton (int_gemm.py) and Gluon (ws_gemm.py) W4A8 kernels.

The word-wide W4 unpacks: four weights per 32-bit register, one packed byte holding channel j in
its low nibble and channel 64 + j in its high nibble (`int_gemm.pack_w4`).
"""

# g128: $2 packed bytes, $3 the row's step s2 and $7 its (128 - sz) * 0x01010101 (four bytes
# 128 - sz), both per-row 32-bit words ($4-$6 and $8-$10 are the copies a pack of four 32-bit
# arguments brings) -> $0 / $1 the low / high nibbles' Q8' = q4 * s2 - sz. q4 * s2 + (128 - sz) =
# Q8' + 128 lies in 0..255 for valid data, so the word-wide multiply-add never carries between
# bytes; xor 0x80 per byte gives int8 Q8'.
G128_UNPACK_ASM = """{
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
