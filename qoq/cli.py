"""The `qoq` command: quantize a model with QoQ (W4A8KV4), then generate, evaluate, serve or
benchmark it; `qoq demo` runs the whole job on the bundled model.

Defaults and choices come from the dataclasses that own them (QoQOptions, CalibConfig,
SamplingParams, EngineConfig). Each command imports what only it needs inside its function, so
that `qoq --help` and the other commands do not load the server or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from qoq.config import GRANULARITIES, PRECISIONS, QUANTIZED_PRECISIONS, Granularity, QuantConfig
from qoq.engine.config import EngineConfig
from qoq.host import keep_freed_memory, set_cpu_threads
from qoq.interrupts import interrupted
from qoq.model.loader import DEFAULT_MODEL
from qoq.model.weights import LoadError
from qoq.quant.calibrate import CalibConfig
from qoq.quant.pipeline import QoQOptions
from qoq.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """The --device choice (default: cuda when available), refused early when it cannot run here."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device torch knows ({err}); pass cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU and a CUDA build of torch; pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: qoq runs on cpu or cuda")
    return device


def default(cls, name: str):
    """The default of dataclass `cls`'s field `name`: the CLI restates none of them."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


KV_BITS = sorted({QuantConfig(p).kv_bits for p in PRECISIONS})


def group_size(text: str) -> Granularity:
    return Granularity.parse(text)  # named for argparse's message: "invalid group_size value"


def _add_granularity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", dest="granularity", type=group_size, choices=GRANULARITIES,
                   default=default(QoQOptions, "granularity"), metavar="{128,-1}",
                   help="4-bit weights: 128 (progressive, per group of 128) or -1 (per channel); default "
                        f"{default(QoQOptions, 'granularity').saved()}")


def _load(args):
    from qoq.model.loader import load_model

    device = str(resolve_device(args.device))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    print(f"loaded {args.model} ({model.config.architecture}, {model.config.num_layers} layers) "
          f"on {device} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model, tokenizer


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"HF folder, qoq checkpoint (qoq quantize --out), QServe model-zoo folder, .gguf file, or "
                        f"{DEFAULT_MODEL!r} (the bundled SmolLM2-135M-Instruct; default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights/activations dtype (default: float32 on CPU, float16 on GPU)")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: one per idle CPU, so a machine busy with other work "
                        "does not slow every op down to its busiest core)")


def cmd_generate(args) -> int:
    from qoq.generate import apply_chat_template, llm_for

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or [])
    model, tokenizer = _load(args)
    prompt = apply_chat_template(tokenizer, args.prompt) if args.chat else tokenizer(args.prompt)["input_ids"]
    t0 = time.perf_counter()
    llm = llm_for(model, tokenizer, [prompt], params)  # on a GPU: kernel warm-up and CUDA graph capture
    t1 = time.perf_counter()
    first = out = None
    for _, out in llm.stream([prompt], params):  # print each new piece of text as the engine produces it
        if first is None and out.new_token_ids:
            first = time.perf_counter()
        print(out.new_text, end="", flush=True)
    t2 = time.perf_counter()
    print()
    n = len(out.token_ids)
    # Decode speed counts the tokens after the first over the time after it: the prompt's prefill
    # and the engine's start-up are reported on their own, as a serving benchmark would.
    speed = f", then {(n - 1) / (t2 - first):.1f} tok/s" if first is not None and n > 1 and t2 > first else ""
    ttft = f"first token {1000 * (first - t1):.0f} ms" if first is not None else "no tokens"
    print(f"[{n} tokens: {ttft}{speed}; engine start {t1 - t0:.1f}s; finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_eval_ppl(args) -> int:
    from qoq.data.corpus import load_corpus
    from qoq.eval.perplexity import perplexity, tokenize_corpus

    model, tokenizer = _load(args)
    ids = tokenize_corpus(tokenizer, load_corpus(args.split))
    result = perplexity(model, ids, seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size)
    record = {"model": str(args.model), "split": args.split, "ppl": round(result.ppl, 4),
              "tokens": result.tokens, "seq_len": result.seq_len}
    print(json.dumps(record))
    return 0


def cmd_demo(args) -> int:
    from qoq.data.corpus import load_corpus
    from qoq.eval.perplexity import perplexity, tokenize_corpus

    model, tokenizer = _load(args)
    ids = tokenize_corpus(tokenizer, load_corpus("eval"))
    fp = perplexity(model, ids, seq_len=512, max_tokens=args.ppl_tokens)
    qmodel = _quantize_for_demo(model, tokenizer, args)
    quant = perplexity(qmodel, ids, seq_len=512, max_tokens=args.ppl_tokens)
    qc = qmodel.quant_config
    print(f"perplexity on the Python-docs eval split ({fp.tokens} tokens, seq 512): "
          f"fp32 {fp.ppl:.2f}, QoQ {qc.precision} {qc.granularity} {quant.ppl:.2f} "
          f"(+{100 * (quant.ppl / fp.ppl - 1):.1f}%)")
    _demo_chat_over_http(qmodel, tokenizer, args)
    return 0


def _quantize_for_demo(model, tokenizer, args):
    """QoQ-quantize the model once and keep the packed checkpoint in the cache; later demos load it."""
    from qoq.model.gguf_convert import cache_root
    from qoq.model.loader import load_model
    import copy
    import hashlib

    from qoq.model.checkpoint import save_checkpoint
    from qoq.quant.pipeline import describe, quantize_model

    options = QoQOptions(precision=args.precision, granularity=args.granularity,
                         calib=CalibConfig(num_seqs=args.calib_seqs, seq_len=512))
    # the cache key covers every option, so a checkpoint of older defaults is never reused
    key = hashlib.sha256(json.dumps(describe(options), sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = cache_root() / "demo" / f"{args.model}-{args.precision}-g{args.granularity.saved()}-{key}"
    if not (out / "quant_config.json").exists():
        print(f"quantizing with QoQ ({args.precision}, {args.granularity}) -> {out}", file=sys.stderr)
        save_checkpoint(quantize_model(copy.deepcopy(model), tokenizer, options), out, tokenizer)
    qmodel, _ = load_model(out, dtype=model.dtype, device=model.device)
    return qmodel


def _demo_chat_over_http(model, tokenizer, args) -> None:
    """Serve the model on a free loopback port and ask it the questions as an OpenAI client would."""
    import httpx

    from qoq.server.serve import BackgroundServer, free_port, make_server

    port = free_port()
    config = EngineConfig(kv_bits=args.kv_bits, max_model_len=2048)
    server = make_server(model, tokenizer, "qoq-demo", config, "127.0.0.1", port, log_level="warning")
    with BackgroundServer(server):
        print(f"serving on http://127.0.0.1:{port}/v1 ({model.quant_config.precision}, "
              f"KV{args.kv_bits or model.quant_config.kv_bits} paged cache)")
        for question in args.questions:
            body = {"model": "qoq-demo", "messages": [{"role": "user", "content": question}],
                    "max_tokens": 64, "temperature": 0}
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
            reply.raise_for_status()
            print(f"user: {question}\nassistant: {reply.json()['choices'][0]['message']['content']}")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    engine = {name: default(EngineConfig, name) for name in ("page_size", "max_num_seqs", "max_num_batched_tokens",
                                                                "gpu_memory_utilization", "cpu_kv_cache_gib")}
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                   help="KV cache precision (default: the model's quant config; 16 for fp models)")
    p.add_argument("--num-pages", type=int, default=None, help="KV cache pages (default: from free memory)")
    p.add_argument("--page-size", type=int, default=engine["page_size"], help="tokens per KV page")
    p.add_argument("--max-num-seqs", type=int, default=engine["max_num_seqs"], help="most requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=engine["max_num_batched_tokens"],
                   help="token budget of one step")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=engine["gpu_memory_utilization"],
                   help="share of the GPU's memory the engine may use (weights, activations, KV cache)")
    p.add_argument("--cpu-kv-cache-gib", type=float, default=engine["cpu_kv_cache_gib"],
                   help="KV cache size on the CPU")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--prefill-graph-mode", choices=["piecewise", "full"], default=default(EngineConfig,
                   "prefill_graph_mode"), help="steps with prompt tokens on the GPU: whole graphs with attention "
                   "inside (full), or graphs cut at each attention call with attention launched between them "
                   "(piecewise); default %(default)s")
    p.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="prefill each prompt in one step (default: split prompts over steps' token budgets)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="recompute shared prompt prefixes (default: reuse their cached KV pages)")
    p.add_argument("--deterministic", action="store_true",
                   help="greedy outputs independent of the rest of the batch (float linears per row, attention "
                        "per token: slower, see docs/serving.md)")


def cmd_serve(args) -> int:
    from qoq.server.engine_loop import EngineStartError, ModelSpec
    from qoq.server.serve import (
        check_port_free,
        configure_logging,
        default_served_name,
        engine_failed,
        make_process_server,
        read_chat_template,
    )

    config = EngineConfig(
        kv_bits=args.kv_bits, num_pages=args.num_pages, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        enforce_eager=args.enforce_eager, max_graph_batch_size=max(64, args.max_num_seqs),
        enable_chunked_prefill=args.enable_chunked_prefill, enable_prefix_caching=args.enable_prefix_caching,
        deterministic=args.deterministic, prefill_graph_mode=args.prefill_graph_mode)
    if args.max_queue_len < 0:
        raise ValueError(f"--max-queue-len must be >= 0, got {args.max_queue_len}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    configure_logging(args.log_level)
    device = str(resolve_device(args.device))
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    spec = ModelSpec(args.model, device, dtype, args.random_weights, args.precision, args.log_level, args.threads,
                     args.tensor_parallel_size, read_chat_template(args.chat_template))
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    from qoq.server.tp import serve_worker_from_env, torchrun_world_size

    if torchrun_world_size() > 1:  # launched by torchrun: one `qoq serve` per rank (docs/parallel.md)
        spec.tensor_parallel_size = torchrun_world_size()
        if os.environ["RANK"] != "0":
            return serve_worker_from_env(spec, config)
    check_port_free(args.host, args.port)
    if args.random_weights:
        from qoq.bench.random_model import bundled_config

        bundled_config(args.random_weights)  # an unknown config is an error here, not in the engine process
    names = args.served_model_name or [default_served_name(args.model, args.random_weights, args.precision)]
    name = names[0]
    t0 = time.perf_counter()
    try:
        server = make_process_server(spec, names, config, args.host, args.port, args.log_level, args.max_queue_len,
                                     args.max_request_bytes, args.api_key)
    except EngineStartError as err:  # e.g. a tensor-parallel rank that died while loading: named in err
        print(f"qoq: error: {err}", file=sys.stderr)
        return 1
    print(f"loaded {args.random_weights or args.model} on {device} in {time.perf_counter() - t0:.1f}s; "
          f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.run()
    return 1 if engine_failed(server) else 0


def cmd_bench_throughput(args) -> int:
    from qoq.bench.throughput import run_throughput

    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    device = str(resolve_device(args.device))
    batch = 0 if args.batch == "max" else int(args.batch)
    result = run_throughput(args.config, args.precision, args.granularity, batch, args.input_len,
                            args.output_len, device, tensor_parallel_size=args.tensor_parallel_size,
                            threads=args.threads)
    print(json.dumps(result.to_dict()))
    return 0


def cmd_bench_serve(args) -> int:
    from qoq.bench.serve import BenchConfig, DatasetArgs, bench_record, format_report, parse_slo

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.logprobs is not None and not 0 <= args.logprobs <= 20:
        raise ValueError(f"--logprobs must be in [0, 20], got {args.logprobs}")
    rate = float(args.request_rate)
    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0 or inf, got {args.request_rate}")
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = BenchConfig(base_url=args.base_url, model=args.model, chat=args.chat, request_rate=rate,
                         max_concurrency=args.max_concurrency, ignore_eos=not args.no_ignore_eos, seed=args.seed,
                         slo_ms=parse_slo(args.goodput), progress=not args.no_progress, system=args.system,
                         precision=args.precision, n=args.n, logprobs=args.logprobs)
    dataset = DatasetArgs(args.dataset, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                          args.vocab_size, args.num_prefixes, args.prefix_len, args.dataset_path, args.seed)
    record = bench_record(config, dataset, tokenizer)
    print(format_report(record), file=sys.stderr)
    print(json.dumps(record))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


def quantize_options(args):
    """`qoq quantize`'s switches -> QoQOptions (a switch left out keeps the option's default)."""
    steps = {step: not getattr(args, f"no_{step}") for step in ("rotation", "qk_hadamard", "smooth", "reorder", "clip")}
    steps.update({step: getattr(args, step) for step in ("smooth_attention", "v_rotation", "gptq")
                  if getattr(args, step) is not None})
    if args.rotation == "auto":
        if args.no_rotation:
            raise ValueError("--rotation auto and --no-rotation contradict each other: pass one")
        steps["rotation"] = "auto"
    options = QoQOptions(precision=args.precision, granularity=args.granularity, progressive=True,
                         calib=CalibConfig(num_seqs=args.calib_seqs, seq_len=args.calib_seq_len), **steps)
    options.quant_config()  # reject a bad precision / group size before loading anything
    return options


def cmd_quantize(args) -> int:
    from pathlib import Path

    from qoq.model.checkpoint import check_output_dir
    from qoq.model.loader import load_tokenizer, resolve_model_path
    from qoq.quant.calibrate import calibration_tokens
    from qoq.quant.stream import check_source, quantize_folder

    options = quantize_options(args)
    device = resolve_device(args.device)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)  # before any long work
    folder = resolve_model_path(args.model)
    config = check_source(folder)
    try:
        tokenizer = load_tokenizer(folder)
    except LoadError as err:
        raise LoadError(f"{err}; calibration tokenizes text with the model's tokenizer: add its tokenizer files "
                        "(tokenizer.json / tokenizer_config.json) to the folder") from None
    if args.calib:
        try:
            text = Path(args.calib).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the calibration text {args.calib}: {err}") from None
    else:
        text = None
    tokens = calibration_tokens(tokenizer, options.calib, text)
    rotation = {True: "randomized Hadamard (QuaRot-style)", False: "none", "auto": "auto"}[options.rotation]
    print(f"quantizing {args.model} ({config.architecture}, {config.num_layers} layers) to {options.precision} "
          f"{options.granularity} on {device}\n  calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens from "
          f"{args.calib or 'the corpus calib split'}; rotation: {rotation}; GPTQ: {'on' if options.gptq else 'off'}",
          file=sys.stderr)
    if options.rotation == "auto":
        return _quantize_in_memory(args, options, tokens, device)
    report = quantize_folder(folder, out, options, tokens, tokenizer, device, args.overwrite)
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in sorted(report["step_seconds"].items(), key=lambda kv: -kv[1]))
    gpu = f", peak GPU {report['peak_gpu_gib']:.1f} GiB" if report["peak_gpu_gib"] is not None else ""
    print(f"done in {report['seconds']:.0f}s ({steps}){gpu}, peak host {report['peak_host_gib']:.1f} GiB\n"
          f"  checkpoint: {out} ({report['checkpoint_gib']:.2f} GiB)\n  serve it:   qoq serve {out}",
          file=sys.stderr)
    return 0


def _quantize_in_memory(args, options, tokens, device) -> int:
    """--rotation auto: the whole model in memory, quantized both ways (quant.pipeline)."""
    from qoq.model.checkpoint import save_checkpoint
    from qoq.quant.pipeline import quantize_model

    args.dtype = args.dtype or "float32"
    args.device = str(device)
    model, tokenizer = _load(args)
    t0 = time.perf_counter()
    quantize_model(model, tokenizer, options, calib_tokens=tokens)
    out = save_checkpoint(model, args.out, tokenizer, overwrite=args.overwrite)
    print(f"quantized {args.model} to {args.precision} {args.granularity} in {time.perf_counter() - t0:.0f}s "
          f"-> {out}\n  serve it: qoq serve {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qoq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=default(SamplingParams, "max_tokens"),
                     help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=default(SamplingParams, "temperature"),
                     help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=default(SamplingParams, "top_k"), help="0 = off (default)")
    gen.add_argument("--top-p", type=float, default=default(SamplingParams, "top_p"), help="1 = off (default)")
    gen.add_argument("--seed", type=int, default=None, help="random seed of the sampler (temperature > 0)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="accuracy evaluation")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity on the project's corpus (Python docs prose)")
    _add_model_args(ppl)
    ppl.add_argument("--split", choices=["eval", "calib"], default="eval",
                     help="corpus split to score (calib is what qoq quantize calibrates on)")
    ppl.add_argument("--seq-len", type=int, default=512, help="tokens per scored window")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ppl.set_defaults(func=cmd_eval_ppl)

    qz = sub.add_parser("quantize", help="QoQ-quantize a model into a packed checkpoint folder")
    _add_model_args(qz)
    qz.add_argument("--out", required=True, help="output folder (config.json, quant_config.json, safetensors shards)")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing qoq checkpoint at --out")
    qz.add_argument("--precision", choices=QUANTIZED_PRECISIONS, default=default(QoQOptions, "precision"),
                    help="quantized precision (weights, activations, KV cache)")
    _add_granularity_arg(qz)
    qz.add_argument("--calib", default=None, help="calibration text file (default: the corpus' calib split)")
    qz.add_argument("--calib-seqs", type=int, default=default(CalibConfig, "num_seqs"), help="calibration sequences")
    qz.add_argument("--calib-seq-len", type=int, default=default(CalibConfig, "seq_len"),
                    help="tokens per calibration sequence")
    for step, what in (("rotation", "Hadamard block-input rotation (and RMSNorm folding)"),
                       ("qk-hadamard", "the runtime Hadamard on q/k after RoPE that makes 4-bit keys accurate"),
                       ("smooth", "o_proj / down_proj input smoothing"),
                       ("reorder", "activation-aware channel reordering (g128)"),
                       ("clip", "weight clipping search")):
        qz.add_argument(f"--no-{step}", action="store_true", help=f"skip {what} (ablation)")
    qz.add_argument("--smooth-attention", action=argparse.BooleanOptionalAction, default=None,
                    help="SmoothAttention on the keys (default: only with --no-qk-hadamard; with the q/k "
                         "Hadamard it measured worse, docs/accuracy.md)")
    qz.add_argument("--v-rotation", action=argparse.BooleanOptionalAction, default=None,
                    help="offline per-head Hadamard of the values (v_proj rows, o_proj columns); off by default "
                         "(no gain measured)")
    qz.add_argument("--rotation", choices=["on", "auto"], default="on",
                    help="auto: quantize with and without the rotation and keep the variant closer to the "
                         "float model on calibration data (twice the time; docs/accuracy.md)")
    qz.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                    help="GPTQ rounding: choose the integer weight codes column by column under QoQ's scales, "
                         "compensating each column's rounding error through the inverse input Gram matrix "
                         "(same packed format, same scales; on by default; --no-gptq: round to nearest; "
                         "docs/accuracy.md)")
    qz.set_defaults(func=cmd_quantize)

    demo = sub.add_parser("demo", help="the main job on the bundled model: load, measure, chat")
    _add_model_args(demo)
    demo.add_argument("--ppl-tokens", type=int, default=8192,
                      help="tokens of the eval split to score (8,192: about half a minute each on 2 cores)")
    demo.add_argument("--questions", nargs="*",
                      default=["What is the capital of France?", "Write a haiku about the sea."],
                      help="chat questions sent to the served quantized model")
    demo.add_argument("--precision", choices=QUANTIZED_PRECISIONS, default=default(QoQOptions, "precision"),
                      help="quantized precision (weights, activations, KV cache)")
    _add_granularity_arg(demo)
    demo.add_argument("--calib-seqs", type=int, default=32,
                      help="calibration sequences of 512 tokens (fewer than qoq quantize's, for a quick demo)")
    demo.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                      help="KV cache precision served (default: the quantized model's)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the model names clients may send; the first is the one responses and metrics use "
                            "(default: MODEL's folder or file name, never its path)")
    serve.add_argument("--api-key", default=os.environ.get("QOQ_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every route but /health "
                            "(default: $QOQ_API_KEY; none: no authentication)")
    _add_engine_args(serve)
    serve.add_argument("--max-queue-len", type=int, default=4096,
                       help="requests that may wait beyond --max-num-seqs; more get 503 with Retry-After")
    serve.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                       help="largest request body accepted (default 4 MiB); larger ones get 413")
    serve.add_argument("--random-weights", metavar="CONFIG", default=None,
                       help="serve random weights of a config in qoq/configs (or a config.json) with a synthetic "
                            "tokenizer (token i is the word 't<i>'), for benchmarks; MODEL is then ignored")
    serve.add_argument("--precision", default=default(QoQOptions, "precision"), choices=PRECISIONS,
                       help="precision of the --random-weights model")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="server and engine log level")
    serve.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="split the model over N processes of this host (one GPU each; CPU processes over "
                            "gloo without GPUs); under torchrun, its WORLD_SIZE (docs/parallel.md)")
    serve.add_argument("--chat-template", metavar="FILE", default=None,
                       help="a Jinja chat template replacing the tokenizer's (e.g. one that renders tools)")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tput = bench_sub.add_parser("throughput", help="end-to-end generation throughput, random weights from a config")
    tput.add_argument("--config", default="llama-3-8b", help="a config in qoq/configs or a config.json path")
    tput.add_argument("--precision", default=default(QoQOptions, "precision"), choices=PRECISIONS,
                      help="precision of the random weights")
    _add_granularity_arg(tput)
    tput.add_argument("--batch", default="max", help="number of requests, or 'max' (largest that fits)")
    tput.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request")
    tput.add_argument("--output-len", type=int, default=512, help="generated tokens per request")
    tput.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tput.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                      help="split the model over N processes of this host (one GPU each; CPU processes over gloo "
                           "without GPUs), each drawing only its own shard of the random weights; times and "
                           "peak memory are rank 0's (docs/parallel.md)")
    _add_threads_arg(tput)
    tput.set_defaults(func=cmd_bench_throughput)
    bs = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (qoq, vLLM, SGLang, ...) over HTTP")
    bs.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    bs.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models)")
    bs.add_argument("--chat", action="store_true", help="/v1/chat/completions (default: /v1/completions)")
    bs.add_argument("--dataset", choices=["random", "shared-prefix", "jsonl"], default="random",
                    help="random token ids, prompts sharing prefixes, or a jsonl file")
    bs.add_argument("--dataset-path", default=None, help="jsonl: one {\"prompt\": text or token ids, "
                                                         "\"output_len\": N} per line")
    bs.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    bs.add_argument("--input-len", type=int, default=1024, help="prompt tokens (shared-prefix: question tokens)")
    bs.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    bs.add_argument("--range-ratio", type=float, default=0.0,
                    help="random: lengths uniform in [len * (1 - r), len * (1 + r)]")
    bs.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn below this")
    bs.add_argument("--num-prefixes", type=int, default=8, help="shared-prefix: distinct prefixes")
    bs.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per prefix")
    bs.add_argument("--request-rate", default="inf", help="requests per second (Poisson arrivals), or inf: all at once")
    bs.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    bs.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: ignore_eos)")
    bs.add_argument("--goodput", nargs="*", metavar="KEY:MS", help="SLOs for goodput: ttft:MS tpot:MS e2e:MS")
    bs.add_argument("--tokenizer", default=None, help="count output tokens with it when the server sends no usage")
    bs.add_argument("--system", default="qoq", help="label for the record")
    bs.add_argument("--precision", default=None, help="label for the record")
    bs.add_argument("--n", type=int, default=1, help="choices per request (sampled at temperature 1 when > 1)")
    bs.add_argument("--logprobs", type=int, default=None, metavar="K",
                    help="ask for each token's logprob and its top K alternatives")
    bs.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrival times")
    bs.add_argument("--no-progress", action="store_true", help="no progress bar")
    bs.add_argument("--out", default=None, help="write the JSON record here")
    bs.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        keep_freed_memory()
        set_cpu_threads(getattr(args, "threads", None))
        return args.func(args)
    except KeyboardInterrupt:
        print("qoq: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if interrupted():  # a library turned the Ctrl-C into an error of its own
            print("qoq: interrupted", file=sys.stderr)
            return 130
        if not isinstance(err, (LoadError, ValueError)):
            raise
        print(f"qoq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
