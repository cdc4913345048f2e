"""benchmarks/bars.py: the kernel bars checked from the benchmarks' JSON."""

import json
import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bars  # noqa: E402


def test_gemm_bars_against_bf16_and_fp8():
    summary = {"w4a8_g128/M=1": 2.6, "w4a8_g128/M=16": 2.4, "w4a8_g128/M=256": 1.5, "fp8_cublas/M=256": 1.6,
               "w4a8_per_channel/M=1024": 1.8, "fp8_cublas/M=1024": 1.7, "w8a8/M=1": 9.0}
    got = bars.gemm_bars(summary)
    assert set(got) == {"w4a8_g128/M=1", "w4a8_g128/M=16", "w4a8_g128/M=256", "w4a8_per_channel/M=1024"}
    assert got["w4a8_g128/M=1"]["met"] and not got["w4a8_g128/M=16"]["met"]
    assert got["w4a8_g128/M=256"] == {"value": round(1.5 / 1.6, 3), "bar": 0.9, "of": "fp8_cublas", "met": True}
    assert got["w4a8_per_channel/M=1024"]["met"]  # faster than FP8


def test_attention_bars_take_kv4_at_batch_64():
    records = [{"kernel": "decode_kv4", "batch": 64, "context": 1024, "bandwidth_fraction": 0.79},
               {"kernel": "decode_kv4", "batch": 64, "context": 4096, "bandwidth_fraction": 0.85},
               {"kernel": "decode_kv4", "batch": 256, "context": 1024, "bandwidth_fraction": 0.1},
               {"kernel": "decode_kv8", "batch": 64, "context": 1024, "bandwidth_fraction": 0.1}]
    got = bars.attention_bars(records)
    assert [(k, b["met"]) for k, b in got.items()] == [("decode_kv4/batch=64/context=1024", False),
                                                       ("decode_kv4/batch=64/context=4096", True)]


def test_bars_of_the_committed_h200_results(capsys):
    """The committed H200 records, as the issue's table quotes them."""
    with open(os.path.join(ROOT, "benchmarks", "results", "kernels-h200.json")) as f:
        got = bars.gemm_bars(json.load(f)["summary"])
    assert got["w4a8_per_channel/M=1"]["met"] and not got["w4a8_g128/M=256"]["met"]
    assert abs(got["w4a8_g128/M=256"]["value"] - 0.61) < 0.01
    bars.main([os.path.join(ROOT, "benchmarks", "results", "attention-h200.json")])
    assert "decode_kv4/batch=64/context=1024" in capsys.readouterr().out
