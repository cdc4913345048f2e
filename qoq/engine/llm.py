"""The offline API: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.engine.sequence import RequestOutput
from qoq.sampling import SamplingParams


class LLM:
    """Load a model (HF folder, .gguf, qoq checkpoint or the bundled default) and serve it offline.

    Keyword arguments beyond device/dtype go to EngineConfig (kv_bits, num_pages, max_num_seqs...).
    """

    def __init__(self, model: str | Path | None = None, *, device: str | None = None,
                 dtype: torch.dtype | None = None, **engine_config) -> None:
        from qoq.model.loader import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        model, tokenizer = load_model(model, dtype=dtype, device=device)
        self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_config))

    @classmethod
    def from_model(cls, model, tokenizer, **engine_config) -> "LLM":
        """Wrap an already loaded (possibly quantized) model."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_config))
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """All prompts go in at once; the engine batches them. Outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for prompt, p in zip(prompts, params_list):  # check all before starting any
            self.engine.check_request(self.engine.tokenize(prompt), p)
        # Only the final outputs are kept: the engine need not build one per sequence per step.
        ids = [self.engine.add_request(prompt, dataclasses.replace(p, output_kind="final"))
               for prompt, p in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
