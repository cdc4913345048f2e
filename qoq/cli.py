"""The `qoq` command: generate | eval ppl | demo (quantize, serve and bench land with their issues)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qoq.model.loader import DEFAULT_MODEL, LoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load(args):
    from qoq.model.loader import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    print(f"loaded {args.model} ({model.config.architecture}, {model.config.num_layers} layers) "
          f"on {device} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model, tokenizer


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"HF folder, .gguf file, or {DEFAULT_MODEL!r} (the bundled SmolLM2-135M-Instruct; default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights/activations dtype (default: float32 on CPU, float16 on GPU)")


def cmd_generate(args) -> int:
    from qoq.generate import apply_chat_template, generate
    from qoq.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or [])
    model, tokenizer = _load(args)
    prompt = apply_chat_template(tokenizer, args.prompt) if args.chat else tokenizer(args.prompt)["input_ids"]
    token_ids: list[int] = []
    shown = 0

    def stream(_: int, token: int) -> None:  # print each new piece of text as it is produced
        nonlocal shown
        token_ids.append(token)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        print(text[shown:], end="", flush=True)
        shown = len(text)

    t0 = time.perf_counter()
    [out] = generate(model, tokenizer, [prompt], params, on_token=stream)
    elapsed = time.perf_counter() - t0
    print()
    print(f"[{len(out.token_ids)} tokens, {len(out.token_ids) / elapsed:.1f} tok/s, finish: {out.finish_reason}]",
          file=sys.stderr)
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
    from qoq.generate import apply_chat_template, generate
    from qoq.sampling import SamplingParams

    model, tokenizer = _load(args)
    ids = tokenize_corpus(tokenizer, load_corpus("eval"))
    result = perplexity(model, ids, seq_len=512, max_tokens=args.ppl_tokens)
    print(f"perplexity (fp {str(model.dtype).removeprefix('torch.')}, Python-docs eval split, "
          f"{result.tokens} tokens, seq 512): {result.ppl:.2f}")
    for question in args.questions:
        [out] = generate(model, tokenizer, [apply_chat_template(tokenizer, question)], SamplingParams(max_tokens=64))
        print(f"user: {question}\nassistant: {out.text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qoq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="accuracy evaluation")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity on the project's corpus (Python docs prose)")
    _add_model_args(ppl)
    ppl.add_argument("--split", choices=["eval", "calib"], default="eval")
    ppl.add_argument("--seq-len", type=int, default=512)
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ppl.add_argument("--batch-size", type=int, default=4)
    ppl.set_defaults(func=cmd_eval_ppl)

    demo = sub.add_parser("demo", help="the main job on the bundled model: load, measure, chat")
    _add_model_args(demo)
    demo.add_argument("--ppl-tokens", type=int, default=16384, help="tokens of the eval split to score")
    demo.add_argument("--questions", nargs="*",
                      default=["What is the capital of France?", "Write a haiku about the sea."])
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LoadError, ValueError) as err:
        print(f"qoq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
