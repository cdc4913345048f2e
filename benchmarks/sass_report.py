"""Compile a kernel for an H100 (sm_90) on a machine without a GPU and report what ptxas made of
it: registers, stack (spills), shared memory, instructions in all and in the main loop, and the
most frequent opcodes. The numbers behind the register and instruction counts in docs/kernels.md.

    python benchmarks/sass_report.py decode --bits 4 --swap 1
    python benchmarks/sass_report.py gemm --mode 2 --block-m 16 --block-n 64 --split 8
    python benchmarks/sass_report.py gemv --mode 1 --block-n 32 --unroll 4 --split 4

Pointer arguments are compiled as 16-byte aligned and the strides that the launchers pass as
multiples of 16, as the runtime JIT specializes them; without that every load of the offline
build is byte-wide and its counts say nothing about the kernel that runs. The SASS goes to --dump.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qoq.kernels import decode_attention, gemv, int_gemm, quant

SASS_LINE = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def decode_kernel(args):
    kernels = {0: decode_attention._decode_kernel, 1: decode_attention._decode_kernel_t}
    fn = (decode_attention._decode_kernel_c if args.chains > 1 else kernels[args.swap]).jitted
    code = "*fp16" if args.bits == 16 else "*u8"
    sig = dict(q_ptr="*fp16", kc_ptr=code, vc_ptr=code, ks_ptr="*fp16", kz_ptr="*fp16", vs_ptr="*fp16",
               vz_ptr="*fp16", bt_ptr="*i32", len_ptr="*i32", o_ptr="*fp16", part_ptr="*fp32", lse_ptr="*fp32",
               cnt_ptr="*i32", HQ="i32", HKV="i32", bt_stride="i32", sm_scale_log2="fp32", num_splits="i32")
    block_g = max(8 if args.swap else 16, triton.next_power_of_2(args.group))
    consts = dict(GROUP=args.group, BLOCK_G=block_g, HALF=args.head_dim // 2, PAGE=args.page, BITS=args.bits,
                  SPLIT=args.split > 1, NUM_STAGES=args.stages, BLOCK_T=args.page, FAST=True,
                  BLOCK_S=decode_attention.MAX_SPLITS, BIASED=args.bits != 16, PDL=args.pdl > 0, MIN_BLOCKS=1,
                  BIASED_V=args.biased_v > 0 and args.bits != 16)
    if args.append:  # KVAppend: q rotated and the new token's K / V written by the launch (views of a qkv row)
        sig.update(k_ptr="*fp16", v_ptr="*fp16", pos_ptr="*i64", cs_ptr="*fp32", slot_ptr="*i64", stride_q="i32",
                   stride_k="i32", stride_v="i32")
        consts.update(APPEND=True, HADAMARD=args.append > 1, FENCE=True)
    else:
        consts.update(k_ptr=None, v_ptr=None, pos_ptr=None, cs_ptr=None, slot_ptr=None, stride_q=0, stride_k=0,
                      stride_v=0, APPEND=False, HADAMARD=False, FENCE=False)
    if args.chains > 1:
        consts["CHAINS"] = args.chains
    elif args.swap:
        consts["SKEW"] = args.skew > 0
    aligned = ("HQ", "HKV", "bt_stride") + (("stride_q", "stride_k", "stride_v") if args.append else ())
    return fn, sig, consts, aligned, args.warps or max(1, args.chains)


def gemm_kernel(args):
    fn = int_gemm._int8_gemm_kernel.jitted
    sig = dict(x_ptr="*i8", w_ptr="*i8" if args.mode == int_gemm.MODE_W8 else "*u8", sx_ptr="*fp32",
               xsum_ptr="*fp32", s1_ptr="*fp16", s2_ptr="*u8", sz_ptr="*u8", y_ptr="*fp16", ws_ptr="*fp32",
               cnt_ptr="*i32", M="i32", N="i32", K="i32", stride_sg="i32")
    consts = dict(MODE=args.mode, BLOCK_M=args.block_m, BLOCK_N=args.block_n, SPLIT_K=args.split,
                  NUM_STAGES=args.stages, SWAP=True, FAST=True, UNROLL=args.unroll, PREFETCH=args.prefetch,
                  PACKED=args.mode == int_gemm.MODE_W4_G128 and args.unroll in (2, 4), PDL=args.pdl,
                  ACT=args.act, HAS_NW=args.act >= 2, ACT_BLOCK=quant.act_block(4096, args.warps or 4))
    if args.act:  # the rows quantized in the prologue (an fp16 input, its residual, norm weight, sum out)
        sig.update(xf_ptr="*fp16", r_ptr="*fp16", nw_ptr="*fp16", s_ptr="*fp16", H="i32", eps="fp32")
    else:
        consts.update(xf_ptr=None, r_ptr=None, nw_ptr=None, s_ptr=None, H=0, eps=0.0)
    return fn, sig, consts, ("N", "K", "stride_sg") + (("H",) if args.act else ()), args.warps or 4


def gemv_kernel(args):
    fn = gemv._gemv_kernel.jitted
    sig = dict(x_ptr="*i32", w_ptr="*i32", sx_ptr="*fp32", xsum_ptr="*fp32", s1_ptr="*fp16", s2_ptr="*u8",
               sz_ptr="*u8", y_ptr="*fp16", ws_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32", K="i32", stride_sg="i32")
    consts = dict(MODE=args.mode, BLOCK_N=args.block_n, SPLIT_K=args.split, UNROLL=args.unroll,
                  NUM_STAGES=args.stages, FAST=True, PDL=args.pdl, ACT=args.act, HAS_NW=args.act >= 2,
                  ACT_BLOCK=quant.act_block(4096, args.warps or 4),
                  PACKED=args.mode == int_gemm.MODE_W4_G128 and args.unroll in (2, 4))
    if args.act:  # the row quantized in the prologue into the codes buffer
        sig.update(xq_ptr="*i8", xf_ptr="*fp16", r_ptr="*fp16", nw_ptr="*fp16", s_ptr="*fp16", H="i32", eps="fp32")
    else:
        consts.update(xq_ptr=None, xf_ptr=None, r_ptr=None, nw_ptr=None, s_ptr=None, H=0, eps=0.0)
    return fn, sig, consts, ("N", "K", "stride_sg") + (("H",) if args.act else ()), args.warps or 4


def build(fn, sig, consts, aligned_ints, num_warps, maxnreg):
    names = list(fn.arg_names)
    signature = dict(sig, **{k: "constexpr" for k in consts})
    attrs = {(names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*") or k in aligned_ints}
    options = dict(num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def backward_loops(lines: list[str]) -> list[tuple[int, int]]:
    """(label line, branch line) of every backward branch in the SASS lines, in program order."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    return loops


def mma_loop_instructions(sass: str) -> int:
    """Instructions in the innermost loop (a backward branch's span holding no other) that issues
    the most wgmma (IGMMA / HGMMA) instructions: a warp-specialized kernel's consumer steady state."""
    lines = sass.splitlines()
    loops = backward_loops(lines)
    best = (0, 0)
    for a, b in loops:
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops):
            continue  # holds an inner loop
        ops = [mm.group(1) for mm in map(SASS_LINE.match, lines[a:b + 1]) if mm]
        best = max(best, (sum("GMMA" in op for op in ops), -len(ops)))
    return -best[1]


def disassemble(kernel) -> tuple[str, str]:
    """(resource usage, SASS) of a compiled kernel, by the CUDA tools Triton ships."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True, check=True).stdout
    return usage, sass


def report(kernel, dump: str | None) -> dict:
    usage, sass = disassemble(kernel)
    if dump:
        with open(dump, "w") as f:
            f.write(sass)
    lines = sass.splitlines()
    ops = [m.group(1) for m in map(SASS_LINE.match, lines) if m]
    # the main loop: the first backward branch's span (the software-pipelined steady state)
    loops = backward_loops(lines)
    loop = sum(1 for x in lines[loops[0][0]:loops[0][1] + 1] if SASS_LINE.match(x)) if loops else 0
    # programmatic dependent launch: what the kernel does with memory before it waits
    ptx = kernel.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    before = ptx[:wait] if wait >= 0 else ""
    memory_ops = [line for line in before.splitlines() if ".global" in line
                  and re.match(r"\s*(?:@%p\d+\s+)?(?:ld|st|atom|red|cp\.async)\.", line)]
    launch = ptx.find("griddepcontrol.launch_dependents")
    return {"pdl_wait": wait >= 0, "memory_before_pdl_wait": len(memory_ops),
            "pdl_signal_after_wait": wait >= 0 and launch > wait,
            "prefetch_before_pdl_wait": before.count("prefetch.global.L2"),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "shared": kernel.metadata.shared, "instructions": len(ops), "loop_instructions": loop,
            "top": collections.Counter(op.split(".")[0] for op in ops).most_common(12)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kernel", choices=["decode", "gemm", "gemv"])
    p.add_argument("--bits", type=int, default=4, help="decode: 4, 8 or 16")
    p.add_argument("--swap", type=int, default=1, help="decode: 1 the transposed kernel, 0 the row kernel")
    p.add_argument("--group", type=int, default=4, help="decode: query heads per kv head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--mode", type=int, default=int_gemm.MODE_W4_PER_CHANNEL, help="gemm: 0 W8, 1 g128, 2 per-channel")
    p.add_argument("--block-m", type=int, default=16)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--unroll", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=0, help="gemm: chunks of L2 prefetch ahead")
    p.add_argument("--pdl", type=int, default=0, help="gemm: weight chunks prefetched before the PDL wait; decode: > 0 builds "
                   "the PDL entry (0: no PDL)")
    p.add_argument("--act", type=int, default=0, help="gemm: the input prologue (0 none, 1 plain, 2 RMSNorm, 3 add + RMSNorm)")
    p.add_argument("--split", type=int, default=2, help="split-K programs (decode: more than 1 compiles the merge)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--biased-v", type=int, default=0, help="decode: 1 V codes kept as 1024 + code (BIASED_V)")
    p.add_argument("--skew", type=int, default=0, help="decode: 1 the next block's scores alongside this one's softmax (SKEW)")
    p.add_argument("--chains", type=int, default=1, help="decode: > 1 the chained kernel (_decode_kernel_c), a warp each")
    p.add_argument("--append", type=int, default=0, help="decode: 1 the launch that writes the new K / V (KVAppend), "
                   "2 with the q/k Hadamard")
    p.add_argument("--warps", type=int, default=0, help="0: the launcher's default")
    p.add_argument("--maxnreg", type=int, default=0)
    p.add_argument("--dump", help="write the SASS here")
    args = p.parse_args()
    fn, sig, consts, aligned, warps = dict(decode=decode_kernel, gemm=gemm_kernel, gemv=gemv_kernel)[args.kernel](args)
    for key, value in report(build(fn, sig, consts, aligned, warps, args.maxnreg), args.dump).items():
        print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
