"""GEMM plans as data (qoq/kernels/gemm_plan.py) and the per-GPU tables they come from."""

import dataclasses
import itertools
import json
import os
import re

import h100_policy
import pytest
import torch

from qoq.kernels import configs, gemm_plan, int_gemm
from qoq.kernels.decode_attention import DEFAULT_PLANS, DecodePlan, decode_chains, decode_splits
from qoq.kernels.gemm_plan import MODE_NAMES, MODE_W4_G128, GemmPlan, fallback_plan, select_plan, set_range, table_plan

H100 = "nvidia-h100-80gb-hbm3"
MODES = (int_gemm.MODE_W8, int_gemm.MODE_W4_G128, int_gemm.MODE_W4_PER_CHANNEL)
KERNEL_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "qoq", "kernels")


def test_device_names_normalize_to_table_keys():
    assert configs.normalize_device_name("NVIDIA H100 80GB HBM3") == H100
    assert configs.normalize_device_name("NVIDIA H200") == "nvidia-h200"
    assert configs.load_table("no-such-gpu") is None


@pytest.mark.parametrize("mode", MODES, ids=lambda m: MODE_NAMES[m])
def test_h100_table_is_the_old_policy(mode):
    """The H100 table runs what the old if-tree ran, at every M up to where it stops depending on
    M and beyond, for every shape of the bundled model configs, SiLU*mul fusion included, except
    at the points re-tuned since (h100_tuned.json: gemv at one token, the register-operand Gluon
    plans from 17 tokens up), which run those plans."""
    table = configs.load_table(H100)
    retuned = 0
    for n, k in h100_policy.model_shapes():
        for m in itertools.chain(range(1, h100_policy.M_GRID_MAX + 1), (5000, 8192, 16384, 65536)):
            tuned = h100_policy.tuned_plan(m, n, k, mode)
            retuned += tuned is not None
            assert table_plan(table, mode, m, n, k) == (tuned or h100_policy.old_plan(m, n, k, mode)), (m, n, k)
    # the grid's points in the re-tuned ranges (Llama-3-8B's four shapes)
    ranges = h100_policy.TUNED.get(MODE_NAMES[mode], {}).values()
    assert retuned == sum(min(hi, h100_policy.M_GRID_MAX) - lo for entries in ranges for lo, hi, _ in entries) > 0


def test_h100_table_file_is_what_the_generator_writes():
    assert configs.load_table(H100) == json.loads(json.dumps(h100_policy.h100_table()))


def test_h200_table_is_tuned_over_the_h100_plans():
    """The H200 table began as the H100's and was re-tuned on an H200 by tune_kernels.py: every
    mode and shape is still there, and every plan is valid and runnable there."""
    h100, h200 = configs.load_table(H100), configs.load_table("nvidia-h200")
    assert h200 is not None and h200["gemm"].keys() == h100["gemm"].keys()
    assert all(h200["gemm"][m].keys() == h100["gemm"][m].keys() for m in h100["gemm"])
    assert "tune_kernels.py" in h200["source"] and h200["device"] == "NVIDIA H200"
    for mode in h200["gemm"].values():
        for entries in mode.values():
            assert entries[-1][0] is None and all(gemm_plan.runnable(GemmPlan.from_json(p), True, True)
                                                  for _, p in entries)
    assert {int(b) for b in h200["decode_attention"]} == {4, 8, 16}


def test_no_literal_model_shapes_in_kernels():
    """Shapes are data: no model dimension, and no test of N, K or M against a 4-digit size."""
    pattern = re.compile(r"\b(6144|14336|28672|11008|24576|57344|49152|22016|10240)\b"
                         r"|\b[NKM]\s*(==|!=|<=|>=|<|>)\s*\d{4,}")
    for root, _, files in os.walk(KERNEL_DIR):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    for i, line in enumerate(f, 1):
                        assert not pattern.search(line), f"{name}:{i}: {line.strip()}"


def test_plan_json_and_config_round_trip():
    plan = GemmPlan("ws", 64, 128, num_stages=0, stream_k=True)
    assert plan.to_json() == {"kernel": "ws", "block_m": 64, "block_n": 128, "num_stages": 0, "stream_k": True}
    assert GemmPlan.from_json(plan.to_json()) == plan
    cfg = dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, TMA=True, UNPACK=True, GROUP_M=4)
    assert GemmPlan.from_config(cfg) == GemmPlan("tma", 128, 256, num_warps=8, unpack="ahead", fuse_silu_mul=True,
                                                 group_m=4)
    assert GemmPlan.from_config(dict(BLOCK_M=16, BLOCK_N=64, num_warps=2, num_stages=4, SPLIT_K=2)).kernel == "mma_sync"


@pytest.mark.parametrize("fields", [dict(kernel="reg_a", num_warps=2), dict(kernel="mma_sync", num_warps=4),
                                    dict(kernel="tma", split_k=2), dict(kernel="reg_a", unpack="ahead"),
                                    dict(kernel="tma", stream_k=True), dict(kernel="ws", block_m=96),
                                    dict(kernel="ws", unpack="ahead", w_in_registers=True), dict(kernel="ws", num_stages=1),
                                    dict(kernel="wgmma")])
def test_invalid_plans_are_refused(fields):
    with pytest.raises(ValueError, match="invalid GemmPlan"):
        GemmPlan(**dict(dict(block_m=64, block_n=128), **fields))


SHAPES = [(64, 256), (1000, 1152), (4096, 4096), (5120, 13824), (2560, 6912), (33000, 7168), (152064, 4096)]


@pytest.mark.parametrize("sms,tma,gluon", [(8, False, False), (108, False, False), (132, True, False),
                                           (132, True, True), (78, True, True)])
def test_fallback_plans_are_valid_for_any_shape(sms, tma, gluon):
    """Every size gets a plan the GPU can run, its unroll dividing every split's chunks."""
    for (n, k), m, mode in itertools.product(SHAPES, (1, 3, 9, 16, 17, 64, 65, 200, 640, 641, 1500, 9000), MODES):
        plan = fallback_plan(m, n, k, mode, sms, tma, gluon)
        assert gemm_plan.runnable(plan, tma, gluon), plan
        chunks = k // 128
        per = -(-chunks // plan.split_k)
        assert per % plan.unroll == 0 and chunks % per % plan.unroll == 0
        assert not plan.fuse_silu_mul or (mode != int_gemm.MODE_W8 and plan.unpack == "ahead")


@pytest.fixture
def fake_gpu(monkeypatch):
    """select_plan as on a CUDA device of the given table key and capabilities, without one."""
    def make(key, sms=132, tma=True, gluon=True):
        monkeypatch.setattr(configs, "device_key", lambda index: key)
        monkeypatch.setattr(gemm_plan, "device_caps", lambda index: (sms, tma, gluon))
        gemm_plan._select_cuda.cache_clear()
        return torch.device("cuda", 0)

    yield make
    gemm_plan._select_cuda.cache_clear()


def test_select_plan_reads_the_table_and_falls_back(fake_gpu):
    dev = fake_gpu(H100)
    mode = int_gemm.MODE_W4_G128
    assert select_plan(256, 28672, 4096, mode, dev) == h100_policy.old_plan(256, 28672, 4096, mode)
    assert select_plan(256, 1536, 4096, mode, dev) == fallback_plan(256, 1536, 4096, mode, 132, True, True)
    assert int_gemm.fused_silu_mul(8192, 28672, 4096, mode, dev)
    dev = fake_gpu("some-new-gpu", sms=170)  # no table: the fallback, on its SM count
    assert select_plan(1024, 4096, 4096, mode, dev) == fallback_plan(1024, 4096, 4096, mode, 170, True, True)
    dev = fake_gpu(H100, gluon=False)  # a table plan this GPU cannot run: the fallback
    plan = select_plan(8192, 4096, 4096, mode, dev)
    assert plan.kernel == "tma" and plan == fallback_plan(8192, 4096, 4096, mode, 132, True, False)


def test_untuned_gpu_or_shape_warns_once_how_to_tune(fake_gpu, caplog):
    mode = int_gemm.MODE_W4_G128
    gemm_plan._warn_untuned.cache_clear()
    dev = fake_gpu(H100)
    with caplog.at_level("WARNING", logger="qoq.kernels.gemm_plan"):
        select_plan(256, 28672, 4096, mode, dev)  # in the table: quiet
        assert not caplog.records
        for m in (1, 64, 256):
            select_plan(m, 1536, 4096, mode, dev)
        dev = fake_gpu("some-new-gpu", sms=170)
        for m in (1, 64):
            select_plan(m, 4096, 4096, mode, dev)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("benchmarks/tune_kernels.py" in m for m in messages)
    assert "w4a8_g128 1536x4096" in messages[0] and "nvidia-h100-80gb-hbm3.json" in messages[0]
    assert "this GPU" in messages[1] and "some-new-gpu.json" in messages[1]


def test_set_range_splits_and_merges():
    a, b, c = {"p": "a"}, {"p": "b"}, {"p": "c"}
    entries = [[16, a], [256, b], [None, c]]
    assert set_range(entries, 16, 64, c) == [[16, a], [64, c], [256, b], [None, c]]
    assert set_range(entries, 0, 16, b) == [[256, b], [None, c]]
    assert set_range(entries, 1024, None, a) == [[16, a], [256, b], [1024, c], [None, a]]
    assert set_range([], 64, 128, a) == [[None, a]]


def test_small_and_wide_launches_take_their_plans(monkeypatch):
    """Fewer (sequence, kv head) pairs than SMs (the CPU's nominal 8): the table's latency plan;
    at least 8 per SM: its wide plan; where it has one for the bit width, else its plan, else the
    default."""
    from qoq.kernels import decode_attention

    table = {"decode_attention": {"4": {"transposed": True}},
             "decode_attention_latency": {"4": {"transposed": True, "num_warps": 4, "min_split_blocks": 2}},
             "decode_attention_wide": {"4": {"transposed": True, "skew": True, "max_waves": 1}}}
    monkeypatch.setattr(decode_attention.configs, "device_table", lambda device: table)
    cpu = torch.device("cpu")
    assert decode_attention.decode_plan(4, cpu, 7) == DecodePlan(transposed=True, num_warps=4, min_split_blocks=2)
    assert decode_attention.decode_plan(4, cpu, 8) == decode_attention.decode_plan(4, cpu) == DecodePlan(transposed=True)
    assert decode_attention.decode_plan(4, cpu, 63) == DecodePlan(transposed=True)
    assert decode_attention.decode_plan(4, cpu, 64) == DecodePlan(transposed=True, skew=True, max_waves=1)
    assert decode_attention.decode_plan(8, cpu, 1) == decode_attention.decode_plan(8, cpu, 64) == DEFAULT_PLANS[8]


def test_decode_plans_are_data():
    table = configs.load_table(H100)
    assert {int(b): DecodePlan(**p) for b, p in table["decode_attention"].items()} == DEFAULT_PLANS
    assert DEFAULT_PLANS[4].with_options(dict(num_warps=4, NUM_STAGES=3)) == DecodePlan(
        transposed=True, num_warps=4, num_stages=3, biased=True, programs_per_sm=2)
    plan = dataclasses.replace(DEFAULT_PLANS[4], chains=1)
    # one wave of resident programs (8 one-warp programs on each of the CPU's nominal 8 SMs), or
    # three waves where the programs make between one and three
    cpu = torch.device("cpu")
    assert decode_splits(plan, 1, 8, 64, cpu) == 8
    assert decode_splits(plan, 4, 8, 64, cpu) == 2
    assert decode_splits(plan, 12, 8, 64, cpu) == 2
    # at most one split per block (batch 1, context 1,024 on the H100: 7.1 us at a page each, 8.9 at two)
    assert decode_splits(plan, 1, 8, 6, cpu) == 6
    # chains: a program of 4 counts 4 towards the wave, and each chain gets min_split_blocks blocks
    chained = dataclasses.replace(plan, chains=4)
    assert decode_splits(chained, 1, 4, 64, cpu) == 4 and decode_splits(chained, 1, 4, 8, cpu) == 2
    # and fill the wave before splits do: halved while they would overfill it (64 resident chains)
    assert [decode_chains(chained, p, cpu) for p in (8, 16, 17, 32, 33, 64)] == [4, 4, 2, 2, 1, 1]


def test_input_prologue_is_the_plans_and_decode_sized(monkeypatch):
    """A GEMM quantizes its own rows where its plan says so (`quantize_input`, which only the
    quantizing kernels take), at decode-sized M; QOQ_ACT_PROLOGUE=1 / 0 turns it on for every
    quantizing plan / off for all; int_gemm never routes the CPU there."""
    reg = GemmPlan("reg_a", 8, 64, split_k=4)
    said = dataclasses.replace(reg, quantize_input=True)
    monkeypatch.delenv("QOQ_ACT_PROLOGUE", raising=False)
    assert not gemm_plan.quantizes_input(reg, 1) and gemm_plan.quantizes_input(said, 1)
    assert GemmPlan.from_json(said.to_json()) == said and said.to_json()["quantize_input"] is True
    assert not gemm_plan.quantizes_input(said, gemm_plan.ACT_PROLOGUE_MAX_M + 1)
    with pytest.raises(ValueError, match="quantize_input"):
        GemmPlan("ws", 64, 128, num_stages=0, quantize_input=True)
    monkeypatch.setenv("QOQ_ACT_PROLOGUE", "0")
    assert not gemm_plan.quantizes_input(said, 1)
    monkeypatch.setenv("QOQ_ACT_PROLOGUE", "1")
    assert gemm_plan.quantizes_input(reg, 1) and gemm_plan.quantizes_input(reg, gemm_plan.ACT_PROLOGUE_MAX_M)
    assert not gemm_plan.quantizes_input(reg, gemm_plan.ACT_PROLOGUE_MAX_M + 1)
    assert not gemm_plan.quantizes_input(GemmPlan("ws", 64, 128, num_stages=0), 1)
    assert gemm_plan.quantizes_input(GemmPlan("gemv", 1, 32), 1)  # the CUDA-core kernel too
    assert not int_gemm.quantizes_input(1, 4096, 4096, MODE_W4_G128, torch.device("cpu"))
