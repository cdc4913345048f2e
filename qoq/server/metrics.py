"""/metrics in the Prometheus text exposition format (no client library needed for a few gauges)."""

from __future__ import annotations

from qoq.engine.histogram import Histogram
from qoq.engine.llm_engine import EngineStats


def _metric(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")


def label_value(value: str) -> str:
    """A label value escaped as the text format wants it (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram(lines: list[str], name: str, help_text: str, series: list[tuple[str, Histogram]]) -> None:
    """`series`: (labels inside the braces, histogram) pairs of one metric family."""
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    for labels, hist in series:
        for bound, count in hist.cumulative():
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {count}')
        lines.append(f"{name}_sum{{{labels}}} {hist.total:g}")
        lines.append(f"{name}_count{{{labels}}} {hist.count}")


def render_metrics(stats: EngineStats, model_name: str, message_gaps: Histogram | None = None) -> str:
    model_name = label_value(model_name)
    label = f'{{model_name="{model_name}"}}'
    lines: list[str] = []
    gauges = [
        ("qoq_num_requests_running", "Requests in the running batch", stats.num_running),
        ("qoq_num_requests_waiting", "Requests waiting for KV pages or a batch slot", stats.num_waiting),
        ("qoq_kv_cache_pages_used", "KV cache pages in use", stats.num_pages_used),
        ("qoq_kv_cache_pages_total", "KV cache pages allocated", stats.num_pages_total),
        ("qoq_kv_cache_usage_ratio", "Fraction of KV cache pages in use",
         float(stats.num_pages_used / max(1, stats.num_pages_total))),
        ("qoq_generation_tokens_per_second", "Generated tokens per second over the last 10 s",
         float(stats.generation_tokens_per_second)),
    ]
    for name, help_text, value in gauges:
        _metric(lines, name, "gauge", help_text, [(label, value)])
    counters = [
        ("qoq_prompt_tokens_total", "Prompt tokens prefilled", stats.prompt_tokens_total),
        ("qoq_generation_tokens_total", "Tokens generated", stats.generation_tokens_total),
        ("qoq_num_preemptions_total", "Sequences preempted (recomputed later) for lack of KV pages",
         stats.num_preemptions_total),
        ("qoq_engine_steps_total", "Engine steps run", stats.num_steps_total),
        ("qoq_engine_failed_steps_total", "Engine steps that raised (their requests were run alone to find the "
         "one at fault, which finished with reason \"error\")", stats.num_failed_steps_total),
        ("qoq_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries),
        ("qoq_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (hit rate: hits / queries)",
         stats.prefix_cache_hits),
    ]
    for name, help_text, value in counters:
        _metric(lines, name, "counter", help_text, [(label, value)])
    finished = [(f'{{model_name="{model_name}",finish_reason="{label_value(reason)}"}}', count)
                for reason, count in sorted(stats.finished_total.items())]
    _metric(lines, "qoq_request_finished_total", "counter", "Requests finished, by finish reason", finished)
    name_label = f'model_name="{model_name}"'
    _histogram(lines, "qoq_engine_step_seconds", "Wall time of an engine step, by whether it held prompt tokens "
               "(under async scheduling: the time until the previous step's tokens were back)",
               [(f'{name_label},kind="{kind}"', hist) for kind, hist in sorted(stats.step_seconds.items())])
    _histogram(lines, "qoq_engine_step_host_seconds", "Host time of an engine step (scheduling, launching, "
               "processing the tokens), not waiting for the device", [(name_label, stats.step_host_seconds)])
    if message_gaps is not None:
        _histogram(lines, "qoq_server_step_gap_seconds", "Gaps between engine steps as the API server receives them "
                   "while requests are in flight (the engine's step plus the hand-off)", [(name_label, message_gaps)])
    return "\n".join(lines) + "\n"
