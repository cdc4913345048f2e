"""Independent oracles for what the engine (and so `qoq generate`) produces: plain loops in test code.

`reference_generate` recomputes the whole sequence for every new token, with no cache at all: the
model's own forward with the no-cache `CausalAttention` backend, which shares nothing with the
engine's paged path (no pages, no scheduler, no runner, no paged kernels, no detokenizer). With a
KV4/KV8 cache, `CausalAttention(kv_bits)` attends over quantize -> dequantize of every token's K
(after RoPE and the q/k Hadamard) and V, per token and head, with the kernels' torch twins
(quantize_kv_ref / dequantize_kv_ref): exactly what the engine's pages hold for each token, so a
full recompute has the paged cache's semantics (every query, the prompt's included, reads the
quantized K/V of the tokens up to itself).

The numbers are the same up to rounding, not bit for bit (other GEMM shapes, other attention
kernels), so `assert_greedy_agrees` checks an engine's greedy tokens teacher-forced: each one must
be the reference's greedy choice given the engine's own earlier tokens, up to a near tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qoq.layers.attention import CausalAttention
from qoq.sampling import SamplingParams, sample


@dataclass
class ReferenceOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS, stop token or string) or "length"


def chat_prompt(tokenizer, message: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def stop_ids(model, tokenizer, params: SamplingParams) -> set[int]:
    """The request's stop tokens, plus the model's and the tokenizer's EOS unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(model.config.eos_token_ids)
        ids.update({getattr(tokenizer, "eos_token_id", None)} - {None})
    return ids


def _attention(model, kv_bits: int | None) -> CausalAttention:
    return CausalAttention(kv_bits or model.quant_config.kv_bits, qk_hadamard=model.quant_config.qk_hadamard)


@torch.inference_mode()
def logits_of(model, token_ids: list[int], kv_bits: int | None = None, last_only: bool = False) -> torch.Tensor:
    """One causal forward over the whole sequence, no cache -> fp32 logits [T, V] (or [1, V])."""
    hidden = model(torch.tensor([token_ids], device=model.device), attn=_attention(model, kv_bits))[0]
    return model.compute_logits(hidden[-1:] if last_only else hidden).float()


def _text(tokenizer, token_ids: list[int], stops: list[str]) -> tuple[str, bool]:
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def reference_generate(model, tokenizer, prompt: list[int], params: SamplingParams,
                       kv_bits: int | None = None) -> ReferenceOutput:
    """Generate one prompt token by token, recomputing everything each time. A stop token ends
    the output without being part of it; a stop string ends it after the token that completes
    it, and the text is cut before the string. A seeded request draws from its own generator,
    one token at a time (qoq.sampling.sample), as the engine draws it."""
    stops = stop_ids(model, tokenizer, params)
    generator = None if params.seed is None else torch.Generator(device=model.device).manual_seed(params.seed)
    out = ReferenceOutput(prompt_token_ids=list(prompt))
    for _ in range(params.max_tokens):
        token = int(sample(logits_of(model, out.prompt_token_ids + out.token_ids, kv_bits, last_only=True),
                           params, generator)[0])
        if token in stops:
            out.finish_reason = "stop"
            break
        out.token_ids.append(token)
        if params.stop and _text(tokenizer, out.token_ids, params.stop)[1]:
            out.finish_reason = "stop"
            break
    out.text = _text(tokenizer, out.token_ids, params.stop)[0] if tokenizer is not None else ""
    return out


def assert_greedy_agrees(model, prompts: list[list[int]], outputs: list, kv_bits: int | None = None,
                         tol: float = 1e-3, stops: set[int] = frozenset()) -> int:
    """Every generated token is the reference's greedy choice given the tokens before it, or
    within `tol` (in logits) of it: a near tie that rounding may decide either way. An output that
    ended on a stop token must have had one as the reference's choice after its last token (up to
    `tol` too). Returns how many choices were near ties rather than the argmax."""
    near_ties = 0
    for prompt, out in zip(prompts, outputs, strict=True):
        chosen = list(getattr(out, "token_ids", out))  # an output, or its token ids
        logits = logits_of(model, list(prompt) + chosen, kv_bits)[len(prompt) - 1:]
        for j, token in enumerate(chosen):
            best = logits[j].max().item()
            assert logits[j, token].item() >= best - tol, (
                f"token {j}: the engine chose {token} ({logits[j, token].item():.4f}), the reference "
                f"{logits[j].argmax().item()} ({best:.4f})")
            near_ties += int(logits[j].argmax().item() != token)
        if stops and getattr(out, "finish_reason", None) == "stop":  # (callers pass stops only without stop strings)
            last = logits[len(chosen)]
            if last.argmax().item() not in stops:
                assert max(last[t].item() for t in stops) >= last.max().item() - tol
                near_ties += 1
    return near_ties


def check_launches_never_wait(runner) -> list[int]:
    """Wrap runner.launch so that any synchronizing CUDA call inside it raises
    (torch.cuda.set_sync_debug_mode("error")); returns the one-element launch counter."""
    launches = [0]
    launch = runner.launch

    def checked_launch(batch, prev):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch, prev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            launches[0] += 1

    runner.launch = checked_launch
    return launches
