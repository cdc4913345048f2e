"""`qoq bench serve`: a load generator for any OpenAI-compatible server (qoq, vLLM, SGLang, TRT-LLM).

Requests stream `/v1/completions` (or `/v1/chat/completions`) and arrive all at once
(`request_rate` inf) or as a Poisson process, at most `max_concurrency` at a time. Token counts
come from the server's `usage` (asked for with `stream_options.include_usage`), else from
`--tokenizer`; text is never split to count tokens. Per request: TTFT (first chunk with text),
ITL (gaps between chunks with text: a chunk that carries several tokens is one gap), TPOT
((latency - TTFT) / (output tokens - 1)) and end-to-end latency; the report has their mean, p50,
p90, p99, the throughputs over the whole run, and goodput under optional SLOs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VOCAB = 32000  # every Llama-family vocabulary holds at least these ids


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens, when known (token-id prompts); else from usage
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


@dataclass
class DatasetArgs:
    name: str = "random"  # random | shared-prefix | jsonl
    num_prompts: int = 100
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0  # random: lengths uniform in [len * (1 - r), len * (1 + r)]
    vocab_size: int = DEFAULT_VOCAB
    num_prefixes: int = 8  # shared-prefix: prompts = prefix i + question j
    prefix_len: int = 512
    path: str | None = None  # jsonl: {"prompt": str | [ids], "output_len" | "max_tokens": int} per line
    seed: int = 0


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(100, vocab_size) for _ in range(n)]


def _length(rng: random.Random, n: int, ratio: float) -> int:
    return max(1, rng.randint(int(n * (1 - ratio)), int(n * (1 + ratio)))) if ratio else n


def make_requests(args: DatasetArgs) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    if args.name == "random":
        out = []
        for _ in range(args.num_prompts):
            n_in = _length(rng, args.input_len, args.range_ratio)
            out.append(BenchRequest(_ids(rng, n_in, args.vocab_size), n_in,
                                    _length(rng, args.output_len, args.range_ratio)))
        return out
    if args.name == "shared-prefix":
        # num_prompts questions, spread round-robin over the prefixes (each question input_len tokens)
        prefixes = [_ids(rng, args.prefix_len, args.vocab_size) for _ in range(args.num_prefixes)]
        return [BenchRequest(prefixes[i % args.num_prefixes] + _ids(rng, args.input_len, args.vocab_size),
                             args.prefix_len + args.input_len, args.output_len) for i in range(args.num_prompts)]
    if args.name == "jsonl":
        if not args.path:
            raise ValueError("--dataset jsonl needs --dataset-path FILE")
        out = []
        for line_no, line in enumerate(Path(args.path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{args.path}:{line_no}: each line needs a \"prompt\" (text or token ids)")
            prompt = row["prompt"]
            out.append(BenchRequest(prompt, len(prompt) if isinstance(prompt, list) else 0,
                                    int(row.get("output_len", row.get("max_tokens", args.output_len)))))
        return out[: args.num_prompts] if args.num_prompts else out
    raise ValueError(f"unknown dataset {args.name!r}: random, shared-prefix or jsonl")


def _body(req: BenchRequest, model: str, chat: bool, ignore_eos: bool, n: int = 1, logprobs: int | None = None) -> dict:
    # n > 1 samples (temperature 1): n greedy choices would be one choice n times.
    body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0 if n == 1 else 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang / qoq extension
    if n != 1:
        body["n"] = n
    if logprobs is not None:  # the sampled token's logprob and the top `logprobs` others
        body.update({"logprobs": True, "top_logprobs": logprobs} if chat else {"logprobs": logprobs})
    if chat:
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = req.prompt
    return body


async def _one(session, url: str, body: dict, req: BenchRequest, chat: bool) -> RequestResult:
    """One streamed request. With n choices, TTFT is the first chunk of any choice and the ITL
    gaps are measured within each choice."""
    result = RequestResult(prompt_tokens=req.prompt_len)
    start = time.perf_counter()
    last: dict[int, float] = {}  # choice index -> time of its latest chunk
    pieces: list[str] = []
    usage = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
                    if not text:
                        continue
                    now, index = time.perf_counter(), choice.get("index", 0)
                    if not pieces:
                        result.ttft_s = now - start
                    if index in last:
                        result.itl_s.append(now - last[index])
                    last[index] = now
                    pieces.append(text)
        result.latency_s = time.perf_counter() - start
        result.text = "".join(pieces)
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
            result.output_tokens = usage.get("completion_tokens", 0)
        result.ok = True
    except Exception as err:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(err).__name__}: {err}"[:200]
    return result


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    xs = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(xs) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {k: round(1000 * v, 3) for k, v in
            (("mean", sum(xs) / len(xs)), ("p50", pct(50)), ("p90", pct(90)), ("p99", pct(99)))}


def _metric_total(text: str, names: tuple[str, ...]) -> float | None:
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] in names:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


_HITS = ("qoq_prefix_cache_hits_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")
_QUERIES = ("qoq_prefix_cache_queries_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")


async def _metrics_text(session, base_url: str) -> str:
    try:
        async with session.get(f"{base_url}/metrics") as resp:
            return await resp.text() if resp.status == 200 else ""
    except Exception:  # noqa: BLE001 - a server without /metrics has no counters to report
        return ""


# qoq's step-time histograms (a label set per series), summarized per case as server_timings
_STEP_HISTOGRAMS = {"engine_step_decode": ("qoq_engine_step_seconds", 'kind="decode"'),
                    "engine_step_prefill": ("qoq_engine_step_seconds", 'kind="prefill"'),
                    "engine_step_host": ("qoq_engine_step_host_seconds", ""),
                    "server_step_gap": ("qoq_server_step_gap_seconds", "")}


def _buckets(text: str, name: str, label: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one histogram series in a /metrics text."""
    out = []
    prefix = f"{name}_bucket{{"
    for line in text.splitlines():
        if line.startswith(prefix) and label in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(out)


def histogram_summary(before: str, after: str, name: str, label: str = "") -> dict | None:
    """Count, mean and p50/p90/p99 (ms, interpolated within buckets as Prometheus'
    histogram_quantile does) of what a histogram observed between two /metrics scrapes."""
    b, a = dict(_buckets(before, name, label)), _buckets(after, name, label)
    cumulative = [(le, n - b.get(le, 0.0)) for le, n in a]
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    count = cumulative[-1][1]

    def total(text: str) -> float:
        for line in text.splitlines():
            if line.startswith(f"{name}_sum") and label in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def quantile(q: float) -> float:
        rank, lo_le, lo_n = q * count, 0.0, 0.0
        for le, n in cumulative:
            if n >= rank:
                if le == float("inf"):
                    return lo_le
                return lo_le + (le - lo_le) * (rank - lo_n) / max(n - lo_n, 1e-9)
            lo_le, lo_n = le, n
        return lo_le

    return {"count": int(count), "mean": round(1000 * (total(after) - total(before)) / count, 3),
            **{f"p{q}": round(1000 * quantile(q / 100), 3) for q in (50, 90, 99)}}


def _metric_deltas(before: str, after: str) -> tuple[float | None, dict]:
    hits0, queries0, hits1, queries1 = (_metric_total(t, names) for t in (before, after) for names in (_HITS, _QUERIES))
    hit_rate = None
    if None not in (hits0, hits1, queries0, queries1) and queries1 > queries0:
        hit_rate = (hits1 - hits0) / (queries1 - queries0)
    timings = {key: histogram_summary(before, after, name, label) for key, (name, label) in _STEP_HISTOGRAMS.items()}
    return hit_rate, {k: v for k, v in timings.items() if v is not None}


async def _model_name(session, base_url: str) -> str:
    async with session.get(f"{base_url}/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    chat: bool = False
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    ignore_eos: bool = True
    seed: int = 0
    slo_ms: dict = field(default_factory=dict)  # {"ttft": ms, "tpot": ms, "e2e": ms}: goodput
    progress: bool = True
    system: str = "qoq"
    precision: str | None = None
    dataset: str | None = None
    n: int = 1  # choices per request (their tokens all count as output)
    logprobs: int | None = None  # ask for the sampled token's logprob and this many top ones


async def run_bench(config: BenchConfig, requests: list[BenchRequest], tokenizer=None) -> tuple[dict, list[RequestResult]]:
    import aiohttp
    from tqdm import tqdm

    base = config.base_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=3600)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = config.model or await _model_name(session, base)
        url = f"{base}/v1/chat/completions" if config.chat else f"{base}/v1/completions"
        metrics0 = await _metrics_text(session, base)
        limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        bar = tqdm(total=len(requests), disable=not config.progress, desc="requests")
        rng = random.Random(config.seed)

        async def send(req: BenchRequest) -> RequestResult:
            body = _body(req, model, config.chat, config.ignore_eos, config.n, config.logprobs)
            if limit is None:
                result = await _one(session, url, body, req, config.chat)
            else:
                async with limit:
                    result = await _one(session, url, body, req, config.chat)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(send(req)))
            if config.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(config.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        metrics1 = await _metrics_text(session, base)
    if tokenizer is not None:  # a server without usage: count with the endpoint's tokenizer
        for r in results:
            if r.ok and not r.output_tokens:
                r.output_tokens = len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
    hit_rate, timings = _metric_deltas(metrics0, metrics1)
    record = summarize(config, requests, results, duration, hit_rate)
    record["server_timings_ms"] = timings or None  # qoq's step histograms over the run (None: not qoq)
    return record, results


def summarize(config: BenchConfig, requests: list[BenchRequest], results: list[RequestResult], duration: float,
              prefix_cache_hit_rate: float | None) -> dict:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    n = config.n  # a request's choices stream side by side: TPOT is per choice
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens / n - 1) for r in done if r.output_tokens > n]
    slo = config.slo_ms

    def good(r: RequestResult) -> bool:
        tpot = (r.latency_s - r.ttft_s) / (r.output_tokens / n - 1) if r.output_tokens > n else 0.0
        return (1000 * r.ttft_s <= slo.get("ttft", float("inf")) and 1000 * tpot <= slo.get("tpot", float("inf"))
                and 1000 * r.latency_s <= slo.get("e2e", float("inf")))

    rate = config.request_rate
    lengths_in = sorted({r.prompt_len for r in requests})
    lengths_out = sorted({r.output_len for r in requests})
    return {
        "system": config.system, "precision": config.precision, "dataset": config.dataset,
        "input_len": lengths_in[0] if len(lengths_in) == 1 else None,
        "output_len": lengths_out[0] if len(lengths_out) == 1 else None,
        "num_prompts": len(requests), "request_rate": "inf" if rate == float("inf") else rate,
        "max_concurrency": config.max_concurrency, "n": n, "logprobs": config.logprobs, "completed": len(done), "failed": len(results) - len(done),
        "duration_s": round(duration, 3),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": round(len(done) / duration, 4),
        "output_tokens_per_s": round(out_tokens / duration, 2),
        "total_tokens_per_s": round((in_tokens + out_tokens) / duration, 2),
        "goodput": round(sum(map(good, done)) / duration, 4) if slo else None,
        "slo_ms": slo or None,
        "ttft_ms": _stats_ms([r.ttft_s for r in done]),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([x for r in done for x in r.itl_s]),
        "e2e_ms": _stats_ms([r.latency_s for r in done]),
        "prefix_cache_hit_rate": prefix_cache_hit_rate,
        "offline_output_tokens_per_s": None,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def parse_slo(items: list[str] | None) -> dict:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2e:MS, got {item!r}")
        slo[key] = float(value)
    return slo


def format_report(record: dict) -> str:
    lines = [f"{'completed / failed':<28}{record['completed']} / {record['failed']}",
             f"{'duration (s)':<28}{record['duration_s']}",
             f"{'request throughput (req/s)':<28}{record['request_throughput']}",
             f"{'output tokens/s':<28}{record['output_tokens_per_s']}",
             f"{'total tokens/s':<28}{record['total_tokens_per_s']}"]
    if record["goodput"] is not None:
        lines.append(f"{'goodput (req/s)':<28}{record['goodput']}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = record[key]
        lines.append(f"{key:<28}" + "  ".join(f"{k} {v}" for k, v in s.items()))
    if record["prefix_cache_hit_rate"] is not None:
        lines.append(f"{'prefix cache hit rate':<28}{record['prefix_cache_hit_rate']:.3f}")
    for key, s in (record.get("server_timings_ms") or {}).items():
        lines.append(f"{key + '_ms':<28}" + "  ".join(f"{k} {v}" for k, v in s.items()))
    for err in record["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def bench_record(config: BenchConfig, dataset: DatasetArgs, tokenizer=None) -> dict:
    requests = make_requests(dataset)
    config.dataset = dataset.name
    record, _ = asyncio.run(run_bench(config, requests, tokenizer))
    if dataset.name != "jsonl":  # the lengths asked for (random ranges: the centre)
        record["input_len"] = dataset.input_len + (dataset.prefix_len if dataset.name == "shared-prefix" else 0)
        record["output_len"] = dataset.output_len
    return record
