"""benchmarks/tune_kernels.py on the CPU: candidate generation, and a tiny tuning run under the
interpreter that writes a table the plan lookup then reads."""

import concurrent.futures
import json
import os
import shutil
import sys
import time

import pytest
import torch

from qoq.kernels import gemm_plan
from qoq.kernels.decode_attention import DecodePlan
from qoq.kernels.quant import ACT_ADD_RMSNORM, ACT_PLAIN
from qoq.kernels.gemm_plan import MODE_W4_G128, MODE_W4_PER_CHANNEL, MODE_W8, GemmPlan, table_plan

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
tune_kernels = pytest.importorskip("tune_kernels")


def test_linear_shapes_of_a_model_config(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "qoq", "configs", "llama-3-8b.json")
    want = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down_proj", 4096, 14336)]
    assert tune_kernels.linear_shapes(path) == want
    shutil.copy(path, tmp_path / "config.json")  # a model folder (HF or a qoq checkpoint)
    assert tune_kernels.linear_shapes(str(tmp_path)) == want


@pytest.mark.parametrize("caps", [(132, True, True), (132, True, False), (108, False, False)])
@pytest.mark.parametrize("mode", [MODE_W8, MODE_W4_G128, MODE_W4_PER_CHANNEL])
def test_candidates_are_bounded_valid_and_runnable(caps, mode):
    current = GemmPlan("reg_a", 16, 64, split_k=2)
    for n, k in [(6144, 4096), (4096, 14336), (28672, 4096), (1000, 1152)]:
        for m in (1, 16, 64, 128, 256, 512, 1024, 4096):
            plans = tune_kernels.candidates(mode, m, n, k, *caps, current=current if m == 16 else None, limit=8)
            assert 1 <= len(plans) <= 8 and len(set(plans)) == len(plans)
            assert all(gemm_plan.runnable(p, caps[1], caps[2]) for p in plans)
            assert all(not p.fuse_silu_mul or (mode != MODE_W8 and p.unpack == "ahead") for p in plans)
            if m == 16:
                assert plans[0] == current  # the table's plan is always among those timed


def test_other_gpus_tables_plans_are_candidates(tmp_path, monkeypatch):
    """A point's plans in the tree's other GPU tables are timed right after the table's own (a
    table tuned before a kernel existed still meets it), and the tables are read from the tree."""
    mine = GemmPlan("reg_a", 16, 64, split_k=2)
    theirs = GemmPlan("ws", 64, 128, num_stages=0, w_in_registers=True)
    plans = tune_kernels.candidates(MODE_W4_G128, 256, 4096, 4096, 132, True, True, mine, limit=3, others=[theirs, mine])
    assert plans[:2] == [mine, theirs] and len(plans) == 3
    for name, plan in (("gpu-a", mine), ("gpu-b", theirs)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"gemm": {"w4a8_g128": {"64x512": [[None, plan.to_json()]]}}}))
    siblings = tune_kernels.sibling_tables(str(tmp_path / "gpu-a.json"), str(tmp_path))
    assert [table_plan(t, MODE_W4_G128, 256, 64, 512) for t in siblings] == [theirs]
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    timed = []
    real = tune_kernels.tune_point

    def record(mode, m, n, k, plans, *args):
        timed.extend(plans)
        return real(mode, m, n, k, plans, *args)

    monkeypatch.setattr(tune_kernels, "tune_point", record)
    tune_kernels.tune({"gemm": {}}, [MODE_W4_G128], [("tiny", 64, 512)], [256], "cpu", (8, False, False),
                      tune_kernels.cpu_timer, 600, None, limit=2, log=lambda s: None,
                      siblings=[{"gemm": {"w4a8_g128": {"64x512": [[None, mine.to_json()]]}}}])
    assert timed[0] == mine  # no table plan of its own: the sibling's comes first


def test_decode_candidates_search_tiles_splits_and_then_pipeline_knobs():
    """At decode-sized M the search spans tile widths, warp counts and split-K (no Hopper
    large-M kernels), and the best plan's refinements vary one pipeline knob each."""
    plans = tune_kernels.candidates(MODE_W4_G128, 1, 4096, 4096, 132, True, True, None, limit=40)
    assert {p.kernel for p in plans} == {"reg_a", "mma_sync", "gemv"}
    assert {p.block_n for p in plans} >= {32, 64, 128} and {p.split_k for p in plans} >= {1, 2, 4, 8}
    assert all(p.block_m == (1 if p.kernel == "gemv" else 8) and gemm_plan.runnable(p, True, True) for p in plans)
    assert "gemv" not in {p.kernel for p in tune_kernels.candidates(MODE_W4_G128, 8, 4096, 4096, 132, True, True)}
    gemv = next(p for p in plans if p.kernel == "gemv")
    assert not any(p.prefetch for p in tune_kernels.refinements(gemv, 4096, tma=True))  # no L2 prefetch option
    base = GemmPlan("reg_a", 8, 64, num_stages=3, split_k=4, unroll=4)
    more = tune_kernels.refinements(base, 4096, tma=True)
    assert base not in more and len(set(more)) == len(more)
    changed = [{f for f in ("num_stages", "unroll", "prefetch", "pdl_chunks") if getattr(p, f) != getattr(base, f)}
               for p in more]
    assert all(len(c) == 1 for c in changed)
    assert {"prefetch", "pdl_chunks"} <= set().union(*changed)
    assert not any(p.prefetch or p.pdl_chunks != 4 for p in tune_kernels.refinements(base, 4096, tma=False))
    assert GemmPlan.from_json(GemmPlan("reg_a", 8, 64, pdl_chunks=16).to_json()).pdl_chunks == 16
    with pytest.raises(ValueError):
        GemmPlan("tma", 64, 64, pdl_chunks=8)  # the register kernels' field


def test_tuning_run_writes_a_table(tmp_path, monkeypatch):
    """Two M points of one tiny shape on the CPU: every candidate is checked against the twin and
    timed, the best takes its M range, the rest of the table is kept."""
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    start = {"device": "cpu", "gemm": {"w4a8_g128": {"9x9": [[None, {"kernel": "reg_a", "block_m": 64,
                                                                     "block_n": 64}]]}},
             "decode_attention": {}}
    out = tmp_path / "table.json"
    table, results = tune_kernels.tune(start, [MODE_W4_G128], [("tiny", 64, 512)], [1, 16], "cpu",
                                       (8, False, False), tune_kernels.cpu_timer, 600, str(out), limit=3,
                                       log=lambda s: None, decode_limit=3)
    assert [p["M"] for p in results] == [1, 16] and all("best" in p for p in results)
    assert all("ms" in r for p in results for r in p["records"])
    assert all(len(p["records"]) > 3 for p in results)  # decode-sized M: the best one's refinements too
    written = json.loads(out.read_text())
    assert written == table and "9x9" in written["gemm"]["w4a8_g128"]
    entries = written["gemm"]["w4a8_g128"]["64x512"]
    assert entries[-1][0] is None and len(entries) <= 2
    assert table_plan(written, MODE_W4_G128, 1, 64, 512) == GemmPlan.from_json(results[0]["best"]["plan"])
    assert table_plan(written, MODE_W4_G128, 100, 64, 512) == GemmPlan.from_json(results[1]["best"]["plan"])


def test_decode_points_try_the_fastest_plans_quantizing_their_own_input(monkeypatch):
    """At decode-sized M the fastest quantizing plans are timed again with quantize_input (checked
    against the row twin and the GEMM twin first); where one is fastest (a fake clock here) the
    table's plan says so, and the engine's GEMM then quantizes its rows itself."""
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    monkeypatch.delenv("QOQ_ACT_PROLOGUE", raising=False)
    real = tune_kernels.tune_point

    def faster_with_prologue(mode, m, n, k, plans, *args):
        records = real(mode, m, n, k, plans, *args)
        for rec in records:
            assert "ms" in rec, rec  # every one ran and matched its twins
            rec["ms"] = 0.5 if rec["plan"].get("quantize_input") else 1.0 + len(rec["plan"]) * 1e-3
        return records

    monkeypatch.setattr(tune_kernels, "tune_point", faster_with_prologue)
    # gate/up: the norm of x + residual; down_proj's rows always come quantized (no variants)
    table, results = tune_kernels.tune({"gemm": {}}, [MODE_W4_G128], [("gate_up", 64, 512), ("down_proj", 32, 512)],
                                       [1, 16], "cpu", (8, False, False), tune_kernels.cpu_timer, 600, None, limit=2,
                                       log=lambda s: None, decode_limit=2)
    variants = [r for r in results[0]["records"] if r["plan"].get("quantize_input")]
    assert 1 <= len(variants) <= tune_kernels.ACT_VARIANTS
    best = table_plan(table, MODE_W4_G128, 1, 64, 512)
    assert best.quantize_input and gemm_plan.quantizes_input(best, 1)
    assert not any(r["plan"].get("quantize_input") for r in results[1]["records"])  # M = 16: above the prologue's M
    assert results[2]["shape"] == "down_proj" and not any(r["plan"].get("quantize_input") for r in results[2]["records"])


def test_tuning_a_few_small_m_keeps_the_plans_above_them(monkeypatch):
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    above = {"kernel": "reg_a", "block_m": 64, "block_n": 64, "split_k": 2}
    start = {"gemm": {"w4a8_g128": {"64x512": [[None, above]]}}}
    table, results = tune_kernels.tune(start, [MODE_W4_G128], [("tiny", 64, 512)], [1], "cpu",
                                       (8, False, False), tune_kernels.cpu_timer, 600, None, limit=2,
                                       log=lambda s: None, decode_limit=2)
    assert "best" in results[0]
    assert table_plan(table, MODE_W4_G128, 1, 64, 512) == GemmPlan.from_json(results[0]["best"]["plan"])
    assert table_plan(table, MODE_W4_G128, 2, 64, 512) == GemmPlan.from_json(above)


def test_tuning_some_m_sets_only_their_buckets(monkeypatch):
    """A run over M = 256 alone takes (128, 256] (the protocol's M below it), not every M up to 256:
    the decode plans below and the plans above keep their places."""
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    small = {"kernel": "reg_a", "block_m": 16, "block_n": 64, "split_k": 2}
    above = {"kernel": "reg_a", "block_m": 64, "block_n": 64, "split_k": 2}
    start = {"gemm": {"w4a8_g128": {"64x512": [[16, small], [None, above]]}}}
    table, results = tune_kernels.tune(start, [MODE_W4_G128], [("tiny", 64, 512)], [256], "cpu",
                                       (8, False, False), tune_kernels.cpu_timer, 600, None, limit=2,
                                       log=lambda s: None, decode_limit=2)
    best = GemmPlan.from_json(results[0]["best"]["plan"])
    assert [table_plan(table, MODE_W4_G128, m, 64, 512) for m in (1, 16, 128, 129, 256, 257)] == \
        [GemmPlan.from_json(small)] * 2 + [GemmPlan.from_json(above), best, best, GemmPlan.from_json(above)]


def test_tuning_stops_at_the_budget():
    table, results = tune_kernels.tune({"gemm": {}}, [MODE_W4_G128], [("tiny", 64, 512)], [1], "cpu",
                                       (8, False, False), tune_kernels.cpu_timer, 0, None)
    assert results == [] and table == {"gemm": {}}


def test_attention_heads_of_a_model_config():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "qoq", "configs", "llama-3-8b.json")
    assert tune_kernels.attention_heads(path) == (32, 8, 128)


def test_decode_attention_tuning_keeps_only_a_faster_checked_plan(tmp_path, monkeypatch):
    """Coordinate descent on the CPU with a fake timer that makes two warps 10% faster: that change
    is kept (and written to the table), a no-gain knob is not, and every candidate was run
    against the torch twin."""
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    seen = []
    start = {"gemm": {}, "decode_attention": {"4": {"transposed": True, "biased": True}}}
    real_time = tune_kernels.time_attention

    def fake_time(plan, cases, timer):
        real_time(plan, cases, timer)  # checked against the twin (raises on a mismatch)
        seen.append(plan)
        return [0.9 if plan.num_warps == 2 else 1.0 for _ in cases]

    monkeypatch.setattr(tune_kernels, "time_attention", fake_time)
    out = tmp_path / "table.json"

    class Pool:  # the GPU's compile workers: candidates one knob away from the best, submitted before timing
        submitted = []

        def submit(self, fn, bits, heads, page, points, plan_json):
            assert fn is tune_kernels._compile_attention and points == [(1, 32), (3, 48)]
            self.submitted.append(DecodePlan(**plan_json))
            future = concurrent.futures.Future()
            future.set_result("")
            return future

    table, results = tune_kernels.tune_attention(
        start, [4], (4, 2, 32), ((1, 32), (3, 48)), "cpu", tune_kernels.cpu_timer, 600, str(out),
        log=lambda s: None, knobs={"num_warps": (1, 2), "block_t": (0, 32)}, page=16, pool=Pool())
    best = results[0]["best"]["plan"]
    assert best == {"transposed": True, "biased": True, "num_warps": 2}
    assert set(seen[1:]) <= set(Pool.submitted) and len(Pool.submitted) == len(set(Pool.submitted))
    assert json.loads(out.read_text())["decode_attention"]["4"] == best == table["decode_attention"]["4"]
    assert len(seen) == len(set(seen)) >= 3 and all("ms" in r for r in results[0]["records"])
    # the latency plan starts from the table's plan and goes to its own key, next to it
    seen.clear()
    table, results = tune_kernels.tune_attention(
        table, [4], (4, 2, 32), ((1, 32),), "cpu", tune_kernels.cpu_timer, 600, str(out),
        log=lambda s: None, knobs={"block_t": (0, 32), "chains": (1, 2)}, page=16, key=tune_kernels.LATENCY_KEY)
    assert seen[0] == DecodePlan(**best) and results[0]["key"] == tune_kernels.LATENCY_KEY
    # the chained kernel is a candidate, checked against the twin like the others
    assert any(p.chains == 2 for p in seen) and all("ms" in r for r in results[0]["records"])
    written = json.loads(out.read_text())
    assert written["decode_attention"]["4"] == best and written[tune_kernels.LATENCY_KEY]["4"] == best


def test_attention_knobs_skip_what_would_not_run():
    """Chains only where some point's launch keeps two (decode_chains: 64 resident chains on the
    CPU's nominal 8 SMs), and no transposed flip beside them (the row kernel has no chains)."""
    plan = DecodePlan(transposed=True, biased=True)
    assert tune_kernels._knob_applies("chains", plan, 4, min_programs=32)
    assert not tune_kernels._knob_applies("chains", plan, 4, min_programs=33)
    assert not tune_kernels._knob_applies("chains", plan, 16, min_programs=1)
    chained = DecodePlan(transposed=True, biased=True, chains=2)
    assert not tune_kernels._knob_applies("transposed", chained, 4) and not tune_kernels._knob_applies("skew", chained, 4)


@pytest.mark.parametrize("mode", [MODE_W4_G128, MODE_W4_PER_CHANNEL, MODE_W8])
def test_decode_points_time_the_input_prologue_where_the_engine_runs_it(mode, monkeypatch):
    """With QOQ_ACT_PROLOGUE=1 a quantizing kernel is timed from the fp16 rows alone (as the
    engine runs it: plain rows, or the norm of rows + a residual); every candidate is still
    checked against the twin and timed."""
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    monkeypatch.setenv("QOQ_ACT_PROLOGUE", "1")
    calls = []
    real = tune_kernels.int8_gemm_act_triton
    monkeypatch.setattr(tune_kernels, "int8_gemm_act_triton", lambda *a: calls.append(a[-1]) or real(*a))
    gen = torch.Generator().manual_seed(0)
    plans = [GemmPlan("reg_a", 8, 64, split_k=2), GemmPlan("gemv", 1, 32, split_k=2)]
    weights = tune_kernels.weight_copies(mode, 64, 512, "cpu", gen)[:1]
    for kind in (ACT_PLAIN, ACT_ADD_RMSNORM):
        calls.clear()
        records = tune_kernels.tune_point(mode, 1, 64, 512, plans, weights, "cpu", gen, tune_kernels.cpu_timer,
                                          time.time() + 600, kind)
        assert all("ms" in r for r in records), records
        assert set(calls) == set(plans)
