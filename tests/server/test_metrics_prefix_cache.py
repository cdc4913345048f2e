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
