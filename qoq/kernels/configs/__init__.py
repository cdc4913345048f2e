"""Per-GPU kernel tables: `<device>.json` beside this file, written by benchmarks/tune_kernels.py.

A table holds the GEMM plans per (mode, N x K) and M range (`gemm_plan.py`) and the decode
attention plans per KV bit width (`decode_attention.py`). The file name is the normalized CUDA
device name (`device_key`): "NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3.json. A GPU without
a table, or a shape a table lacks, gets the shape-agnostic fallback plans.
"""

from __future__ import annotations

import functools
import json
import os
import re

import torch

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def normalize_device_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def device_key(device_index: int) -> str:
    return normalize_device_name(torch.cuda.get_device_name(device_index))


def table_path(key: str, config_dir: str | None = None) -> str:
    return os.path.join(config_dir or CONFIG_DIR, f"{key}.json")


@functools.lru_cache(maxsize=None)
def load_table(key: str) -> dict | None:
    """The table of device `key`, or None when this tree has none for it."""
    path = table_path(key)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def device_table(device: torch.device) -> dict | None:
    """The table of a CUDA device (None on the CPU or without one)."""
    if device.type != "cuda":
        return None
    return load_table(device_key(device.index if device.index is not None else torch.cuda.current_device()))


def dump_table(table: dict, path: str) -> None:
    """One line per M range: the table stays diffable when a tuner rewrites a few."""
    lines = ["{"]
    plans = ("decode_attention", "decode_attention_latency", "decode_attention_wide")
    meta = [k for k in table if k != "gemm" and k not in plans]
    for k in meta:
        lines.append(f"  {json.dumps(k)}: {json.dumps(table[k])},")
    lines.append('  "gemm": {')
    modes = list(table["gemm"])
    for i, mode in enumerate(modes):
        lines.append(f"    {json.dumps(mode)}: {{")
        shapes = list(table["gemm"][mode])
        for j, shape in enumerate(shapes):
            lines.append(f"      {json.dumps(shape)}: [")
            entries = table["gemm"][mode][shape]
            for e, entry in enumerate(entries):
                lines.append(f"        {json.dumps(entry)}{',' if e < len(entries) - 1 else ''}")
            lines.append(f"      ]{',' if j < len(shapes) - 1 else ''}")
        lines.append(f"    }}{',' if i < len(modes) - 1 else ''}")
    lines.append("  },")
    kept = [k for k in plans if k in table or k == "decode_attention"]
    for i, k in enumerate(kept):
        lines.append(f'  {json.dumps(k)}: {json.dumps(table.get(k, {}))}{"," if i < len(kept) - 1 else ""}')
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
