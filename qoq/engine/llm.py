"""The offline API: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.engine.parallel import launch, load_model_shard
from qoq.engine.sequence import RequestOutput
from qoq.sampling import SamplingParams


class LLM:
    """Load a model (HF folder, .gguf, qoq checkpoint or the bundled default) and serve it offline.

    Keyword arguments beyond device/dtype go to EngineConfig (kv_bits, num_pages, max_num_seqs...).
    tensor_parallel_size N > 1 starts N - 1 more processes on this host, each running its shard
    of the model in lockstep with this one (engine/parallel.py; one GPU each under NCCL, CPU
    processes over gloo otherwise); `close()` stops them.
    """

    def __init__(self, model: str | Path | None = None, *, device: str | None = None,
                 dtype: torch.dtype | None = None, tensor_parallel_size: int = 1, **engine_config) -> None:
        from qoq.model.loader import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        config = EngineConfig(**engine_config)
        if tensor_parallel_size > 1:
            self.engine = launch(functools.partial(load_model_shard, model, dtype, device), config,
                                 tensor_parallel_size, "nccl" if device.startswith("cuda") else "gloo")
            return
        model, tokenizer = load_model(model, dtype=dtype, device=device)
        self.engine = LLMEngine(model, tokenizer, config)

    @classmethod
    def from_model(cls, model, tokenizer, **engine_config) -> "LLM":
        """Wrap an already loaded (possibly quantized) model."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_config))
        return llm

    def close(self) -> None:
        """Stop the other ranks' processes (tensor parallel); nothing to do otherwise."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """All prompts go in at once; the engine batches them. Outputs come back in prompt order."""
        # Only the final outputs are kept: the engine need not build one per sequence per step.
        final: dict[int, RequestOutput] = {}
        for index, out in self._run(prompts, params, "final"):
            final[index] = out
        return [final[i] for i in range(len(final))]

    def stream(self, prompts: str | list[str] | list[list[int]],
               params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[tuple[int, RequestOutput]]:
        """As generate, batched the same way, but yields (prompt index, output) for every step of
        every prompt as the engine produces it: `new_text` / `new_token_ids` are the step's delta,
        and the last output of a prompt has `finished` set."""
        return self._run(prompts, params, "delta")

    def _run(self, prompts, params, output_kind: str) -> Iterator[tuple[int, RequestOutput]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for prompt, p in zip(prompts, params_list):  # check all before starting any
            self.engine.check_request(self.engine.tokenize(prompt), p)
        return self._steps(prompts, params_list, output_kind)

    def _steps(self, prompts, params_list, output_kind: str) -> Iterator[tuple[int, RequestOutput]]:
        index = {self.engine.add_request(prompt, dataclasses.replace(p, output_kind=output_kind)): i
                 for i, (prompt, p) in enumerate(zip(prompts, params_list))}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                yield index[out.request_id], out
