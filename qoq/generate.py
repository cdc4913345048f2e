"""Batched prefill + decode generation on the dense KV cache (the CPU reference generator)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qoq.engine.stops import stop_token_ids, truncate_at_stop
from qoq.layers.attention import SERVING, DenseKVCache
from qoq.model.llama import LlamaModel
from qoq.sampling import SamplingParams, sample


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"


def apply_chat_template(tokenizer, user_message: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}
    ]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; drop --chat and pass a plain prompt")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.inference_mode()
def generate(
    model: LlamaModel,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    on_token: Callable[[int, int], None] | None = None,
    kv_quantizer=None,
    kv_mode: str = SERVING,
    kv_bits: int | None = None,
) -> list[GenerationOutput]:
    """Generate for a batch of tokenized prompts (left-padded, advanced in lock step).

    `on_token(sequence_index, token_id)` is called for every token as it is produced.
    `kv_mode` "serving" (the default) gives a KV4/KV8 model the serving engine's semantics: the
    prompt attends over its fresh K/V, generated tokens over the quantized cache, so greedy
    outputs equal qoq.engine's. "fake_quant" quantizes the prompt's K/V too (what perplexity
    measures); only that mode takes a custom `kv_quantizer`. See DenseKVCache. `kv_bits` None
    takes the model's own (quant_config.kv_bits), as the engine's EngineConfig.kv_bits does.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    total = longest + params.max_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens"
        )
    device = model.device
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    input_ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    positions = (torch.arange(longest, device=device)[None] - pad[:, None]).clamp(min=0)
    cache = DenseKVCache(
        cfg.num_layers, batch, total, cfg.num_kv_heads, cfg.head_dim, model.dtype, device, pad, kv_quantizer,
        kv_bits=kv_bits or model.quant_config.kv_bits, mode=kv_mode, qk_hadamard=model.quant_config.qk_hadamard,
    )
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stops = stop_token_ids(model, tokenizer, params)
    outputs = [GenerationOutput(prompt_token_ids=list(p)) for p in prompts]
    next_pos = positions[:, -1] + 1
    for step in range(params.max_tokens):
        hidden = model(input_ids, positions, cache)
        cache.advance(input_ids.shape[1])
        tokens = sample(model.compute_logits(hidden[:, -1]), params, generator).tolist()
        for i, out in enumerate(outputs):
            if out.finish_reason is None:
                _append_token(out, tokens[i], tokenizer, params, stops, on_token, i)
        if all(o.finish_reason for o in outputs):
            break
        input_ids = torch.tensor(tokens, device=device)[:, None]
        positions = next_pos[:, None]
        next_pos = next_pos + 1
    for out in outputs:
        if out.finish_reason is None:
            out.finish_reason = "length"
        out.text, _ = truncate_at_stop(tokenizer.decode(out.token_ids, skip_special_tokens=True), params.stop)
    return outputs


def _append_token(out, token, tokenizer, params, stops, on_token, index) -> None:
    if token in stops:
        out.finish_reason = "stop"
        return
    out.token_ids.append(token)
    if on_token is not None:
        on_token(index, token)
    if params.stop:
        _, hit = truncate_at_stop(tokenizer.decode(out.token_ids, skip_special_tokens=True), params.stop)
        if hit:
            out.finish_reason = "stop"
    if out.finish_reason is None and len(out.token_ids) >= params.max_tokens:
        out.finish_reason = "length"
