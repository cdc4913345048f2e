"""/metrics (render_metrics on its own, no server): the prefix cache's counters, escaped labels."""

from qoq.engine.llm_engine import EngineStats
from qoq.server.metrics import render_metrics


def test_prefix_cache_counters_are_rendered():
    text = render_metrics(EngineStats(prefix_cache_queries=400, prefix_cache_hits=256), "m")
    assert 'qoq_prefix_cache_queries_total{model_name="m"} 400' in text
    assert 'qoq_prefix_cache_hits_total{model_name="m"} 256' in text
    assert "# TYPE qoq_prefix_cache_hits_total counter" in text


def test_label_values_are_escaped():
    text = render_metrics(EngineStats(finished_total={"stop": 2}), 'we"ird\\name\nx')
    assert 'qoq_kv_cache_pages_used{model_name="we\\"ird\\\\name\\nx"} 0' in text
    assert 'finish_reason="stop"} 2' in text


def test_step_time_histograms_render_and_the_bench_client_reads_them_back():
    """The engine's step histograms on /metrics, read back by `qoq bench serve` as the
    difference between two scrapes (what one benchmark case observed)."""
    from qoq.bench.serve import histogram_summary
    from qoq.engine.histogram import Histogram

    stats, gaps = EngineStats(), Histogram()
    before = render_metrics(stats, "m", gaps)
    for ms in [5.0] * 90 + [7.0] * 9 + [90.0]:
        stats.step_seconds["decode"].observe(ms / 1000)
        gaps.observe(ms / 1000)
    stats.step_seconds["prefill"].observe(0.030)
    after = render_metrics(stats, "m", gaps)
    assert "# TYPE qoq_engine_step_seconds histogram" in after
    assert 'qoq_engine_step_seconds_bucket{model_name="m",kind="decode",le="+Inf"} 100' in after
    assert 'qoq_server_step_gap_seconds_count{model_name="m"} 100' in after
    decode = histogram_summary(before, after, "qoq_engine_step_seconds", 'kind="decode"')
    assert decode["count"] == 100 and abs(decode["mean"] - 6.03) < 1e-6
    assert 4.0 <= decode["p50"] <= 6.0 and 6.0 <= decode["p99"] <= 8.0  # within the buckets that hold them
    prefill = histogram_summary(before, after, "qoq_engine_step_seconds", 'kind="prefill"')
    assert prefill["count"] == 1 and 25.0 <= prefill["p50"] <= 30.0
    assert histogram_summary(after, after, "qoq_engine_step_seconds", 'kind="decode"') is None  # nothing new
