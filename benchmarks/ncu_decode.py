"""One decode-attention launch for `ncu` (the case and options from the command line).

    ncu -k regex:_decode_kernel -c 1 --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/ncu_decode.py --batch 1024 --context 1280 --bits 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import D, HQ, PAGE, random_cache  # noqa: E402

from qoq.kernels.decode_attention import paged_decode_attention_triton  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=1024)
p.add_argument("--context", type=int, default=1280)
p.add_argument("--bits", type=int, default=4)
p.add_argument("--options", type=json.loads, default=None)
args = p.parse_args()
gen = torch.Generator(device="cuda").manual_seed(0)
pages = args.context // PAGE
cache = random_cache(args.batch * pages, args.bits, gen)
bt = torch.randperm(args.batch * pages, device="cuda", generator=gen).reshape(args.batch, pages).int()
lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
q = torch.randn(args.batch, HQ, D, device="cuda", dtype=torch.float16, generator=gen)
for _ in range(2):
    paged_decode_attention_triton(q, cache, bt, lens, D ** -0.5, options=args.options)
torch.cuda.synchronize()
