"""Perplexity over non-overlapping windows of a text (the WikiText protocol of GPTQ/QServe)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qoq.model.llama import LlamaModel


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # predicted tokens the mean is over
    seq_len: int


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.inference_mode()
def perplexity(
    model: LlamaModel,
    token_ids: torch.Tensor,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) over windows of `seq_len` tokens, each scored from its own start."""
    if seq_len < 2 or batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"perplexity needs seq_len >= 2, batch_size >= 1 and max_tokens >= 1 "
                         f"(got {seq_len}, {batch_size}, {max_tokens})")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    num_windows = token_ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, the text has {token_ids.numel()}")
    windows = token_ids[: num_windows * seq_len].view(num_windows, seq_len)
    total_nll, total_tokens = 0.0, 0
    starts = range(0, num_windows, batch_size)
    for start in tqdm(starts, desc=f"perplexity (seq {seq_len})", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(model.device)
        logits = model.compute_logits(model(batch))
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return PerplexityResult(ppl=math.exp(total_nll / total_tokens), tokens=total_tokens, seq_len=seq_len)
