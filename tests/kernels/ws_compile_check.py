"""Compile qoq's Gluon GEMM (qoq/kernels/ws_gemm.py) for an H100 (sm_90) on this machine, with no
GPU, and print what each build holds, one JSON line per case: `[mode, zero, gated, bm, bn, stream, reg_a]` in
argv[1] (a JSON list; `--sass` after it adds the consumer loop's SASS instruction count). Run in its own process by test_gemm.py: a pytest session that has run Triton
kernels under TRITON_INTERPRET=1 leaves the interpreter's patches on `triton.language`, which break
a real compilation afterwards."""

import json
import os
import subprocess
import sys
import tempfile

import torch
import triton

from qoq.kernels import ws_gemm
from qoq.kernels.gemm_plan import GemmPlan


def compiled(mode: int, zero: bool, gated: bool, bm: int, bn: int, stream: bool = False, reg_a: bool = False):
    """The case's kernel, compiled for sm_90."""
    m, n, k = 300, 512, 1024
    x8, sx = torch.empty(m, k, dtype=torch.int8), torch.empty(m)
    w = torch.empty(n, k, dtype=torch.int8) if mode == 0 else torch.empty(n, k // 2, dtype=torch.uint8)
    s1 = torch.empty(n, dtype=torch.float16)
    s2 = torch.empty(n, k // 128, dtype=torch.uint8) if mode == 1 else None
    sz = s2 if mode == 1 else (s1 if zero else None)
    y = torch.empty(m, n // 2 if gated else n, dtype=torch.float16)
    return ws_gemm.compile_sm90(x8, w, sx, sx if zero else None, s1, s2, sz, y, mode,
                                GemmPlan("ws", bm, bn, num_stages=0, stream_k=stream, w_in_registers=reg_a), zero, gated)


def build(*case) -> dict:
    kernel = compiled(*case)
    ptx = kernel.asm["ptx"]
    return {"int8_wgmma": "wgmma.mma_async" in ptx and ".s8.s8" in ptx, "setmaxnreg": "setmaxnreg" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "fence": "fence.proxy.async" in ptx,
            "atomics": "atom.global.gpu.acq_rel.add" in ptx,
            "serialized": serialized(ptx),
            "shared": kernel.metadata.shared}


def serialized(ptx: str) -> bool:
    """Whether ptxas reports serializing the wgmma instructions (C7512: each one waited for before
    the next), which the kernel's schedule is written to avoid."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    return "C7512" in run.stdout + run.stderr


def mma_loop(case: list) -> int:
    """SASS instructions of the build's consumer loop (benchmarks/sass_report.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import sass_report

    return sass_report.mma_loop_instructions(sass_report.disassemble(compiled(*case))[1])


if __name__ == "__main__":
    sass = "--sass" in sys.argv[2:]  # also the consumer loop's SASS instruction count
    for case in json.loads(sys.argv[1]):
        print(json.dumps({"case": case, **build(*case), **({"mma_loop": mma_loop(case)} if sass else {})}), flush=True)
