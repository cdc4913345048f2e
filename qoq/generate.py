"""`qoq generate`: a batch of prompts through the serving engine (the offline LLM), sized for them.

There is one inference path: the engine's paged cache, CUDA graphs on a GPU, its kernels, sampler
and detokenizer (stop tokens and strings, streamed text deltas). This module only sizes an engine
for the prompts at hand and hands the streamed deltas to a callback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qoq.engine.block_manager import pages_needed
from qoq.engine.config import EngineConfig
from qoq.engine.llm import LLM
from qoq.engine.sequence import RequestOutput
from qoq.model.llama import LlamaModel
from qoq.sampling import SamplingParams


def apply_chat_template(tokenizer, user_message: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}
    ]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; drop --chat and pass a plain prompt")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def engine_config_for(model: LlamaModel, prompts: list[list[int]], params: SamplingParams,
                      page_size: int = 64) -> dict:
    """An engine just big enough for these requests: a page pool that holds all of them at full
    length (so none is ever preempted), CUDA graphs only for batch sizes up to their number and
    a token budget of their prompts (what a GPU start-up warms up and captures for), and a fresh
    seed per process for requests that sample without a seed (as torch's own RNG)."""
    context = model.config.max_position_embeddings
    pages = sum(pages_needed(min(len(p) + params.max_tokens, context), page_size) for p in prompts)
    budget = min(EngineConfig.max_num_batched_tokens, max(16, sum(map(len, prompts)) + len(prompts)))
    return dict(page_size=page_size, num_pages=max(1, pages), max_num_seqs=len(prompts),
                max_num_batched_tokens=budget, max_graph_batch_size=len(prompts), seed=torch.initial_seed())


def llm_for(model: LlamaModel, tokenizer, prompts: list[list[int]], params: SamplingParams,
            **engine_config) -> LLM:
    """The offline LLM sized for these prompts (engine_config_for), keyword arguments overriding it.
    Building it is the start-up (kernel warm-up and CUDA graph capture on a GPU)."""
    return LLM.from_model(model, tokenizer, **{**engine_config_for(model, prompts, params), **engine_config})


def generate(
    model: LlamaModel,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    on_output: Callable[[int, RequestOutput], None] | None = None,
    **engine_config,
) -> list[RequestOutput]:
    """Generate for a batch of tokenized prompts on the engine; outputs in prompt order.

    `on_output(prompt_index, delta)` gets every step's output of a prompt as it is produced
    (`delta.new_text` is the text to show: a stop string is never in it). Keyword arguments
    override the engine's configuration (kv_bits, enforce_eager, ...; see engine_config_for).
    """
    llm = llm_for(model, tokenizer, prompts, params, **engine_config)
    if on_output is None:
        return llm.generate(prompts, params)
    final: list[RequestOutput | None] = [None] * len(prompts)
    for index, out in llm.stream(prompts, params):
        on_output(index, out)
        if out.finished:
            final[index] = out
    return final
