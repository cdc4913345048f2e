"""`qoq serve` under load against the engine's own (offline) speed, one JSON file of records.

Per precision: `qoq bench throughput --batch max` (the offline figure and the largest batch that
fits), then `qoq serve --random-weights CONFIG` as a subprocess on loopback, a short warm-up
(Triton compiles at first launch), and `qoq bench serve` at each request rate: Poisson arrivals
at the finite rates, all at once at `inf`, there at concurrency 512 and at the largest batch.
Each record gets `offline_output_tokens_per_s` of the offline run at the same batch when one was
measured. On an H200 (Llama-3-8B shape) the default run takes about 8 minutes; `--quick` halves
the prompt counts.

    python benchmarks/bench_serve.py --out $OUT/serve-h200.json            # GPU
    python benchmarks/bench_serve.py --config tiny --device cpu --precisions w16a16kv16 \\
        --input-len 16 --output-len 8 --quick --out /tmp/serve-cpu.json     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qoq.bench.serve import BenchConfig, DatasetArgs, bench_record, format_report
from qoq.server.serve import free_port, wait_healthy

# prompts per finite request rate: about 10-30 s of arrivals each
PROMPTS_AT_RATE = {1.0: 12, 4.0: 48, 16.0: 160}


def _qoq(*args: str) -> list[str]:
    return [sys.executable, "-m", "qoq", *args]


def offline_throughput(args, precision: str, batch: str) -> dict:
    cmd = _qoq("bench", "throughput", "--config", args.config, "--precision", precision, "--batch", batch,
               "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--device", args.device)
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Server:
    def __init__(self, args, precision: str, max_num_seqs: int, log_path: Path, extra: tuple[str, ...] = (),
                 max_num_batched_tokens: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = _qoq("serve", "--random-weights", args.config, "--precision", precision, "--device", args.device,
                   "--port", str(self.port), "--max-num-seqs", str(max_num_seqs),
                   "--max-num-batched-tokens", str(max_num_batched_tokens or args.max_num_batched_tokens),
                   "--max-model-len", str(max(args.input_len + args.output_len, 4096)), "--log-level", "warning",
                   *args.serve_args.split(), *extra)
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.proc, args.start_timeout)
        except RuntimeError as err:
            self.stop()
            raise RuntimeError(f"{err}: see {log_path}") from err

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def serve_cases(args, batch_max: int) -> list[tuple[float, int, int | None]]:
    """(request_rate, num_prompts, max_concurrency) for one precision."""
    scale = 0.5 if args.quick else 1.0
    cases = []
    for rate in args.rates:
        if rate == float("inf"):
            for conc in sorted({min(args.concurrency, batch_max), batch_max}):
                cases.append((rate, max(conc, int(args.num_prompts_inf * scale)), conc))
        else:
            cases.append((rate, max(2, int(PROMPTS_AT_RATE.get(rate, 16 * rate) * scale)), args.concurrency))
    return cases


def run_precision(args, precision: str, out_dir: Path) -> list[dict]:
    offline = {}
    if not args.skip_offline:
        result = offline_throughput(args, precision, "max")
        offline[result["batch"]] = result["tokens_per_s"]
    batch_max = max(offline) if offline else args.concurrency
    cases = serve_cases(args, batch_max)
    if not args.skip_offline and args.concurrency < batch_max:
        offline[args.concurrency] = offline_throughput(args, precision, str(args.concurrency))["tokens_per_s"]
    server = Server(args, precision, max(c for _, _, c in cases), out_dir / f"serve-{precision}.log")
    records = []
    try:
        warm = DatasetArgs("random", num_prompts=2 * args.max_num_batched_tokens // args.input_len + 2,
                           input_len=args.input_len, output_len=4, vocab_size=args.vocab_size, seed=1)
        bench_record(BenchConfig(base_url=server.url, progress=False), warm)
        for case, (rate, num_prompts, conc) in enumerate(cases):
            config = BenchConfig(base_url=server.url, request_rate=rate, max_concurrency=conc,
                                 system="qoq", precision=precision, progress=not args.no_progress)
            # Fresh prompts in every case: prompts repeated from an earlier case would hit the prefix
            # cache and skip their prefill, which the offline figure never does.
            dataset = DatasetArgs("random", num_prompts=num_prompts, input_len=args.input_len,
                                  output_len=args.output_len, vocab_size=args.vocab_size, seed=100 + case)
            record = bench_record(config, dataset)
            record["config"] = args.config
            record["offline_output_tokens_per_s"] = offline.get(conc) if rate == float("inf") else None
            print(f"== {precision} rate {rate} prompts {num_prompts} concurrency {conc}\n{format_report(record)}",
                  file=sys.stderr, flush=True)
            records.append(record)
    finally:
        server.stop()
    return records


def run_features(args, out_dir: Path) -> list[dict]:
    """Chunked prefill and prefix caching on against off (w4a8kv4): random prompts at 16
    requests/s (inter-token latency while prompts arrive), and a shared-prefix set (32 prefixes of
    2,048 tokens, 16 questions of 128 each, output 128; time to first token)."""
    precision = args.precisions[0]
    records = []
    runs = [("on", (), budget) for budget in args.chunk_budget]
    if not args.skip_features_off:
        runs.append(("off", ("--no-chunked-prefill", "--no-prefix-caching"), args.max_num_batched_tokens))
    for label, extra, budget in runs:
        log_name = f"serve-features-{label}-{budget}.log" if label == "on" else "serve-features-off.log"
        server = Server(args, precision, args.concurrency, out_dir / log_name, extra, budget)
        try:
            warm = DatasetArgs("random", num_prompts=8, input_len=args.input_len, output_len=4,
                               vocab_size=args.vocab_size, seed=1)
            bench_record(BenchConfig(base_url=server.url, progress=False), warm)
            cases = [(16.0, DatasetArgs("random", num_prompts=80 if args.quick else 160, input_len=args.input_len,
                                        output_len=args.output_len, vocab_size=args.vocab_size, seed=200)),
                     (float("inf"), DatasetArgs("shared-prefix", num_prompts=512, input_len=128, output_len=128,
                                                num_prefixes=32, prefix_len=2048, vocab_size=args.vocab_size,
                                                seed=300))]
            for rate, dataset in cases:
                config = BenchConfig(base_url=server.url, request_rate=rate, max_concurrency=64 if rate == float("inf")
                                     else args.concurrency, system="qoq", precision=precision,
                                     progress=not args.no_progress)
                record = bench_record(config, dataset)
                record.update(config=args.config, chunked_prefill=label == "on", prefix_caching=label == "on",
                              max_num_batched_tokens=budget)
                print(f"== {precision} chunked prefill + prefix caching {label} (budget {budget}), {dataset.name} "
                      f"rate {rate}\n"
                      f"{format_report(record)}", file=sys.stderr, flush=True)
                records.append(record)
        finally:
            server.stop()
    return records


def run_api_features(args, out_dir: Path) -> list[dict]:
    """What `n` and `logprobs` cost (first precision, all at once at --concurrency): the same
    prompts plain, with n=4 (sampled choices; a quarter of the prompts, so the same number of
    streams) and with logprobs=5. Each record gets `plain_output_tokens_per_s` of the plain run."""
    precision = args.precisions[0]
    server = Server(args, precision, args.concurrency, out_dir / "serve-api-features.log")
    records = []
    try:
        warm = DatasetArgs("random", num_prompts=8, input_len=args.input_len, output_len=4,
                           vocab_size=args.vocab_size, seed=1)
        bench_record(BenchConfig(base_url=server.url, progress=False), warm)
        num = args.num_prompts_inf // (2 if args.quick else 1)
        plain = None
        for case, (n, logprobs) in enumerate(((1, None), (4, None), (1, 5))):
            config = BenchConfig(base_url=server.url, max_concurrency=max(1, args.concurrency // n), system="qoq",
                                 precision=precision, progress=not args.no_progress, n=n, logprobs=logprobs)
            dataset = DatasetArgs("random", num_prompts=num // n, input_len=args.input_len,
                                  output_len=args.output_len, vocab_size=args.vocab_size, seed=400 + case)
            record = bench_record(config, dataset)
            record["config"] = args.config
            plain = plain or record["output_tokens_per_s"]
            record["plain_output_tokens_per_s"] = plain
            print(f"== {precision} n {n} logprobs {logprobs}\n{format_report(record)}", file=sys.stderr, flush=True)
            records.append(record)
    finally:
        server.stop()
    return records


def _provenance(device: str) -> dict:
    """What every record carries: the commit and the device that measured it, and when."""
    import datetime

    import torch

    commit = os.environ.get("QOQ_GIT_COMMIT")
    if not commit:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = done.stdout.strip() or "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device
    return {"git_commit": commit, "device": name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-3-8b", help="a config of qoq/configs (random weights)")
    p.add_argument("--precisions", nargs="+", default=["w4a8kv4", "w16a16kv16"])
    p.add_argument("--rates", nargs="+", type=float, default=[1.0, 4.0, 16.0, float("inf")])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=512, help="max concurrency (inf: also the largest batch)")
    p.add_argument("--num-prompts-inf", type=int, default=1000, help="prompts of each request-rate-inf case")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random prompt ids are drawn below this (default: the config's vocabulary)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="half the prompts")
    p.add_argument("--skip-offline", action="store_true", help="no `qoq bench throughput` runs")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--features", action="store_true",
                   help="chunked prefill and prefix caching on vs off instead of the precision sweep")
    p.add_argument("--api-features", action="store_true",
                   help="the cost of n=4 and logprobs=5 against plain requests (first precision, rate inf)")
    p.add_argument("--serve-args", default="", help="more `qoq serve` options for every server, e.g. "
                   "'--prefill-graph-mode full'")
    p.add_argument("--skip-features-off", action="store_true",
                   help="--features: only the servers with both features on (the off baseline measured before)")
    p.add_argument("--chunk-budget", type=int, nargs="+", default=[1024],
                   help="token budget per step with --features 'on' (several: one server each)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "serve-h200.json"))
    args = p.parse_args()
    if args.vocab_size is None:
        from qoq.bench.random_model import bundled_config

        args.vocab_size = bundled_config(args.config).vocab_size
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.perf_counter()
    stamp = _provenance(args.device)

    def save(new: list[dict]) -> None:  # kept so far, should a later part fail
        records.extend({**r, **stamp} for r in new)
        out.write_text(json.dumps(records, indent=1))

    if args.features:
        save(run_features(args, out.parent))
    if args.api_features:
        save(run_api_features(args, out.parent))
    for precision in args.precisions if not (args.features or args.api_features) else []:
        save(run_precision(args, precision, out.parent))
    print(f"{len(records)} records -> {out} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
