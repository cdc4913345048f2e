"""Engine configuration: one dataclass, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from qoq.engine.block_manager import pages_needed
from qoq.sampling import SamplingParamError


@dataclass
class EngineConfig:
    """How the engine batches and how big its KV cache is.

    kv_bits None takes the model's own (model.quant_config.kv_bits). num_pages None sizes the
    cache from free memory: on a GPU `gpu_memory_utilization` of it after a profiling forward,
    on the CPU `cpu_kv_cache_gib`.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096  # token budget of one step (prefill + decode tokens)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    page_size: int = 64  # QServe's page size
    kv_bits: int | None = None
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    enforce_eager: bool = False  # True: no CUDA graphs
    max_graph_batch_size: int = 64
    # On the GPU, compile every kernel variant a step can need before the first request (one dummy
    # forward per class of step size, engine/warmup.py), not between two tokens of every stream.
    kernel_warmup: bool = True
    seed: int = 0  # for requests that sample without a seed of their own
    # Overlap the engine's Python for step n+1 (scheduling, inputs, token bookkeeping, outputs)
    # with the device's step n: sampled tokens stay on the device and feed the next step, and
    # step() hands out the previous step's outputs (docs/serving.md). False: one step at a time.
    async_scheduling: bool = True
    # Split prompts over steps: each step's token budget takes every decode first, then prompt
    # chunks. False: a prompt is prefilled in one step (the budget is raised to max_model_len).
    enable_chunked_prefill: bool = True
    # Keep full pages keyed by their prefix after their requests end, and start later prompts with
    # the same prefix past them (block_manager.py).
    enable_prefix_caching: bool = True
    # A greedy request's output does not depend on what else is in the batch, float weights and a
    # quantized cache included: float linears run per row, attention per token (batch_invariant.py;
    # its cost is in docs/serving.md). Implies enforce_eager.
    deterministic: bool = False
    # Steps with prompt tokens: "full" attends with launches whose grids depend on the token count
    # only (FlatAttention: decode rows gathered into one decode launch, chunks through a paged-prefill
    # work list), so on the GPU one graph holds the whole step (eagerly too, on the CPU or past the
    # captured sizes); "piecewise" replays graphs cut at each attention call, attention launched
    # eagerly between them. docs/serving.md#cuda-graphs
    prefill_graph_mode: str = "full"

    def __post_init__(self) -> None:
        if self.prefill_graph_mode not in ("piecewise", "full"):
            raise ValueError(f"prefill_graph_mode must be 'piecewise' or 'full', got {self.prefill_graph_mode!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "max_graph_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_bits not in (None, 4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16, got {self.kv_bits}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit (the engine's fixed limits): checked before it is queued, also by a
    server process that does not hold the engine."""

    max_model_len: int
    vocab_size: int
    page_size: int
    num_pages: int

    def check(self, prompt_ids: list[int], params) -> None:
        """Raise ValueError saying what is wrong when the engine could never serve this request."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        params.validate()
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise SamplingParamError("stop_token_ids", f"stop_token_ids must be in [0, {self.vocab_size})")
        if params.logit_bias and any(t >= self.vocab_size for t in params.logit_bias):
            raise SamplingParamError("logit_bias", f"logit_bias token ids must be in [0, {self.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                f"({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) asks for {total}: "
                f"shorten the prompt or lower max_tokens"
            )
        if pages_needed(total, self.page_size) > self.num_pages:
            raise ValueError(
                f"the request needs {total} tokens of KV cache but the whole cache holds "
                f"{self.num_pages * self.page_size}: lower max_tokens"
            )
