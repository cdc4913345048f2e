"""Perplexity of the bundled model under FP, RTN, QoQ and the QoQ ablation ladder.

Writes benchmarks/results/accuracy-smollm2-135m.json (a list of records, rewritten after each
one so a partial run keeps its numbers) and prints a markdown table for docs/accuracy.md.

    .venv/bin/python benchmarks/accuracy.py                 # everything (~30-40 min on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --only "QoQ W4A8KV4 g128, rotation auto"   # one row, merged
    .venv/bin/python benchmarks/accuracy.py --only "+ rotation" --eval-tokens 4096 --out /tmp/quick.json

--only replaces those rows in --out and keeps the others: give a quick run (fewer --eval-tokens)
its own --out so the stored table stays on one token count.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from qoq.config import PER_CHANNEL
from qoq.data.corpus import load_corpus
from qoq.eval.perplexity import perplexity, tokenize_corpus
from qoq.model.loader import load_model
from qoq.quant.calibrate import CalibConfig, calibration_tokens
from qoq.quant.pipeline import STEPS, QoQOptions, quantize_model

OUT = Path(__file__).parent / "results" / "accuracy-smollm2-135m.json"


def ladder() -> list[tuple[str, QoQOptions | None]]:
    """(method, options) in report order; None = the unquantized model."""
    rungs, on = [], {}
    rungs.append(("RTN W4A8KV4 g128 (float scales, simulated)", QoQOptions.rtn(progressive=False)))
    rungs.append(("+ progressive (integer path)", QoQOptions.rtn()))
    for step, label in zip(("smooth_attention", "rotation", "smooth", "reorder", "clip"),
                           ("+ SmoothAttention", "+ rotation", "+ smoothing", "+ reordering", "+ clipping = QoQ g128")):
        on[step] = True
        rungs.append((label, QoQOptions.rtn(**on)))
    return rungs


CALIB_64 = "QoQ W4A8KV4 g128 (defaults), 64 calibration sequences as qoq quantize"
CALIB_SEQS = {CALIB_64: 64}  # rows that calibrate on their own number of sequences


def configs() -> list[tuple[str, QoQOptions | None]]:
    # Each round's rows pin the options that later rounds turned on, so they still reproduce what
    # they measured: gptq (session 3) and qk_hadamard (session 4) are off in the rows before them.
    old = {"gptq": False, "qk_hadamard": False}
    pre_h = {"qk_hadamard": False}
    return [
        ("FP (fp32 reference)", None),
        ("RTN W4A8KV4 per-channel", QoQOptions.rtn(granularity=PER_CHANNEL)),
        ("QoQ W4A8KV4 per-channel", QoQOptions(granularity=PER_CHANNEL, **old)),
        *ladder(),
        ("RTN W8A8KV8", QoQOptions.rtn(precision="w8a8kv8")),
        ("QoQ W8A8KV8", QoQOptions(precision="w8a8kv8", reorder=False, **old)),
        ("QoQ W4A8KV8 g128", QoQOptions(precision="w4a8kv8", **old)),
        ("QoQ W4A8KV4 g128 without rotation", QoQOptions(rotation=False, **old)),
        ("QoQ W4A8KV4 g128, rotation auto", QoQOptions(rotation="auto", **old)),
        # GPTQ rounding of the integer codes under the scales QoQ chose (qoq/quant/gptq.py)
        ("QoQ W4A8KV4 g128 + GPTQ (rotated)", QoQOptions(gptq=True, **pre_h)),
        ("QoQ W4A8KV4 per-channel + GPTQ", QoQOptions(granularity=PER_CHANNEL, gptq=True, **pre_h)),
        ("QoQ W4A8KV8 g128 + GPTQ", QoQOptions(precision="w4a8kv8", gptq=True, **pre_h)),
        ("QoQ W8A8KV8 + GPTQ", QoQOptions(precision="w8a8kv8", reorder=False, gptq=True, **pre_h)),
        ("QoQ W4A8KV4 g128 without rotation + GPTQ", QoQOptions(rotation=False, gptq=True, **pre_h)),
        ("QoQ W4A8KV4 g128, rotation auto + GPTQ", QoQOptions(rotation="auto", gptq=True, **pre_h)),
        # The runtime Hadamard on q/k after RoPE (QuantConfig.qk_hadamard), with and without
        # SmoothAttention and the offline V rotation; the defaults are GPTQ + qk Hadamard alone
        ("QoQ W4A8KV4 g128 + GPTQ + qk Hadamard", QoQOptions(smooth_attention=True)),
        ("QoQ W4A8KV4 per-channel + GPTQ + qk Hadamard", QoQOptions(granularity=PER_CHANNEL, smooth_attention=True)),
        ("QoQ W4A8KV4 g128 + GPTQ + qk Hadamard, no SmoothAttention (defaults)", QoQOptions()),
        ("QoQ W4A8KV4 g128 + GPTQ + qk Hadamard + V rotation", QoQOptions(smooth_attention=True, v_rotation=True)),
        ("QoQ W4A8KV4 g128 + GPTQ + qk Hadamard + V rotation, no SmoothAttention", QoQOptions(v_rotation=True)),
        ("QoQ W4A8KV4 per-channel + GPTQ + qk Hadamard, no SmoothAttention (defaults)", QoQOptions(granularity=PER_CHANNEL)),
        ("QoQ W4A8KV8 g128 + GPTQ + qk Hadamard, no SmoothAttention (defaults)", QoQOptions(precision="w4a8kv8")),
        # `qoq quantize` calibrates on 64 sequences by default (the other rows: --calib-seqs, 32)
        (CALIB_64, QoQOptions()),
    ]


def run_one(base, tokenizer, ids, calib, method, opts, args) -> dict:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if opts is not None:
        opts.calib = CalibConfig(num_seqs=CALIB_SEQS.get(method, args.calib_seqs), seq_len=args.calib_seq_len)
        if method in CALIB_SEQS:
            calib = calibration_tokens(tokenizer, opts.calib)
        opts.progress = False
        quantize_model(model, tokenizer, opts, calib_tokens=calib)
    t1 = time.perf_counter()
    result = perplexity(model, ids, seq_len=args.seq_len, max_tokens=args.eval_tokens, progress=False)
    qc = model.quant_config
    decision = getattr(model, "rotation_decision", None)
    record = {
        "method": method, "precision": qc.precision,
        "group_size": qc.granularity.saved() if qc.weight_bits == 4 else None,
        "ppl": round(result.ppl, 4), "tokens": result.tokens,
        "steps": {s: bool(qc.steps.get(s, False)) for s in (*STEPS, "progressive")} if opts else {},
        "integer_path": bool(opts is not None and (opts.progressive or not qc.grouped_w4)),
        "quantize_seconds": round(t1 - t0, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
        "run": {"model": "SmolLM2-135M-Instruct (bundled, fp32 CPU)", "corpus_split": "eval", "seq_len": args.seq_len,
                "calib": f"{CALIB_SEQS.get(method, args.calib_seqs)} x {args.calib_seq_len} tokens of the calib split",
                "rotation": qc.rotation, "torch": torch.__version__, "cpus": os.cpu_count(),
                "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")},
    }
    if opts is not None and opts.gptq:
        record["gptq"] = {"act_order": opts.gptq_act_order, "damp": opts.gptq_damp, "tokens": opts.gptq_tokens}
    if decision is not None:
        record["rotation_decision"] = {"rotated": decision.rotated, "kl_rotated": round(decision.kl_rotated, 5),
                                       "kl_unrotated": round(decision.kl_unrotated, 5), "tokens": decision.tokens}
    return record


def markdown(records: list[dict]) -> str:
    fp = next((r["ppl"] for r in records if r["precision"] == "w16a16kv16"), None)
    lines = ["| method | precision | group | ppl | vs FP | tokens |", "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        delta = f"{100 * (r['ppl'] / fp - 1):+.1f}%" if fp else ""
        g = {None: "-", -1: "channel", 128: "128"}[r["group_size"]]
        lines.append(f"| {r['method']} | {r['precision']} | {g} | {r['ppl']:.2f} | {delta} | {r['tokens']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--only", action="append",
                   help="run only these methods (repeatable); their records in --out are replaced, the others kept")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--resume", action="store_true", help="keep the records already in --out, run the rest")
    args = p.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model()
    ids = tokenize_corpus(tokenizer, load_corpus("eval"))
    calib = calibration_tokens(tokenizer, CalibConfig(num_seqs=args.calib_seqs, seq_len=args.calib_seq_len))
    keep = (args.resume or args.only) and args.out.exists()
    records = json.loads(args.out.read_text()) if keep else []
    done = {r["method"] for r in records} if args.resume else set()
    order = [m for m, _ in configs()]
    for method, opts in configs():
        if (args.only and method not in args.only) or method in done:
            continue
        records = [r for r in records if r["method"] != method]
        new = run_one(base, tokenizer, ids, calib, method, opts, args)
        records.append(new)
        records.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        print(json.dumps({k: new[k] for k in ("method", "ppl", "quantize_seconds", "eval_seconds")}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=2) + "\n")
    print(markdown(records))


if __name__ == "__main__":
    main()
