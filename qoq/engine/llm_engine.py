"""The engine: requests in, one scheduled step at a time, RequestOutputs (deltas) out.

Not thread-safe by design: one thread owns it (the offline LLM, or the server's engine thread).

With `EngineConfig.async_scheduling` (the default) steps are pipelined: step() schedules and
launches step n on the device, and while the device computes it, reads back and processes step
n-1's tokens (append, stops, outputs), so the engine's Python overlaps the device's work instead
of following it. step() therefore returns the outputs of the step launched by the previous call.

One request must never fail the others. A request whose token cannot be recorded (detokenized)
fails alone. A step that raises (a request that passed every check and still breaks the forward
or its sampling) is isolated: the in-flight tokens are forgotten, every running sequence goes
back to the waiting queue (recomputed later) and the prefix cache is dropped (pages keyed when
scheduled may never have been written); then each of those sequences runs alone, one synchronous
step at a time, until it samples a token. A sequence whose step fails alone is failed
(finish_reason "error"); the others carry on. A device fault (CUDA error, out of memory) is not
isolated: step() raises it, and the server's engine loop stops (`is_device_fault`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from qoq.engine.block_manager import BlockManager
from qoq.engine.config import EngineConfig, RequestLimits
from qoq.engine.detokenizer import append_token, make_output
from qoq.engine.guided import Guidance, accept_token, make_tokenizer
from qoq.engine.histogram import Histogram
from qoq.engine.logprobs import record_logprobs
from qoq.engine.model_runner import ModelRunner, StepInFlight
from qoq.engine.scheduler import Scheduler
from qoq.engine.sequence import RequestOutput, Sequence, SequenceStatus
from qoq.engine.stops import stop_token_ids
from qoq.model.llama import LlamaModel
from qoq.sampling import SamplingParams

log = logging.getLogger(__name__)
FINISHED = SequenceStatus.FINISHED


_DEVICE_FAULTS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access")


def is_device_fault(err: BaseException) -> bool:
    """An error that leaves the device (or its memory) in doubt: no request is to blame, and
    the engine cannot go on."""
    if isinstance(err, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
        return True
    return any(text in str(err) for text in _DEVICE_FAULTS)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_pages_used: int = 0
    num_pages_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    num_steps_total: int = 0
    finished_total: dict[str, int] = field(default_factory=dict)  # by finish reason
    generation_tokens_per_second: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache...
    prefix_cache_hits: int = 0  # ...and found there
    num_failed_steps_total: int = 0  # steps that raised (their requests isolated, see the docstring)
    # Wall time of each step() by what the step processed ("prefill": it held prompt tokens), and the
    # part of it the host spent scheduling, launching and processing (the rest waited for the device).
    step_seconds: dict[str, Histogram] = field(default_factory=lambda: {"decode": Histogram(),
                                                                         "prefill": Histogram()})
    step_host_seconds: Histogram = field(default_factory=Histogram)


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        max_pos = model.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or max_pos, max_pos)
        # Without chunked prefill a preempted sequence re-prefills all of its tokens in one step.
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            config = dataclasses.replace(config, max_num_batched_tokens=self.max_model_len)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        # HF fast tokenizers are not safe to share across threads (the server encodes on its event
        # loop while the engine thread decodes): every use goes through this lock.
        self.tokenizer_lock = threading.Lock()
        self.kv_bits = config.kv_bits or model.quant_config.kv_bits
        self.runner = ModelRunner(model, config, self.max_model_len, self.kv_bits)
        self.block_manager = BlockManager(self.runner.num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Sequence] = {}  # unfinished requests
        self._ids = itertools.count()
        self._stats = EngineStats(num_pages_total=self.runner.num_pages)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps, for tok/s
        self._in_flight: StepInFlight | None = None  # async scheduling: launched, not yet processed
        self._suspects: list[Sequence] = []  # after a failed step: to run alone, last first
        self._guidance: Guidance | None = None  # structured output's compiled grammars
        log.info("engine: %d KV pages of %d tokens (KV%d), max_model_len %d",
                 self.runner.num_pages, config.page_size, self.kv_bits, self.max_model_len)

    # -- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            with self.tokenizer_lock:
                return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use plain completions")
        with self.tokenizer_lock:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_model_len, self.model.config.vocab_size, self.config.page_size,
                             self.block_manager.num_pages)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError saying what is wrong when the engine could never serve this request."""
        self.limits.check(prompt_ids, params)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        seq = Sequence(request_id, prompt_ids, params, frozenset(stop_token_ids(self.model, self.tokenizer, params)),
                       arrival_time=time.monotonic())
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        if params.grammar is not None:  # structured output (engine/guided.py)
            seq.guide = self.guidance().new_matcher(params.grammar)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def guidance(self) -> Guidance:
        """The grammars compiled for this engine's tokenizer (built on the first guided request)."""
        if self._guidance is None:
            eos = stop_token_ids(self.model, self.tokenizer, SamplingParams())
            with self.tokenizer_lock:
                self._guidance = Guidance(make_tokenizer(self.tokenizer, self.model.config.vocab_size, list(eos)))
        return self._guidance

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request (client gone): its pages go back to the pool at once.

        A token of it still in flight is discarded when its step is processed (see Scheduler.finish
        for why the pages may be reused right away)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._count_finished("abort")
        return make_output(seq, finished=True)

    def fail_request(self, seq: Sequence, err: BaseException) -> RequestOutput:
        """Finish `seq` with finish_reason "error" (the engine could not serve it)."""
        log.error("request %s failed: %s: %s", seq.request_id, type(err).__name__, err)
        self.requests.pop(seq.request_id, None)
        self.scheduler.finish(seq, "error")
        self._count_finished("error")
        out = make_output(seq, finished=True)
        out.error = f"the engine failed this request: {type(err).__name__}: {err}"
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run a step; return the outputs of the step whose tokens were processed in it.

        Synchronous: this step's own. Async scheduling: the previous call's step (none on the
        first call), this call's step being on the device meanwhile. A failing step is isolated
        (module docstring); only a device fault raises.
        """
        if self._suspects:
            return self._step_alone(self._suspects[-1])
        try:
            return self._step()
        except Exception as err:
            # Tensor parallel: a step that failed on one rank may have left the others inside a
            # collective, so no rank can run on alone: the failure is the engine's (docs/parallel.md).
            if is_device_fault(err) or self.runner.tp is not None:
                raise
            self._isolate(err)
            return []

    def _step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        if not self.config.async_scheduling:
            batch = self.scheduler.schedule()
            if not batch:
                return []
            step = self.runner.launch(batch, None)
            token_ids, waited = self._wait(step)
            outputs = self._process(batch.seqs, token_ids, batch, step)
            self._time_step(batch, start, waited)
            return outputs
        # (a) Schedule step n. Sequences of step n-1 (in flight) count their pending token.
        batch = self.scheduler.schedule()
        prev, launched = self._in_flight, None
        if batch:
            # (b) Launch it: queued on the device, nothing waits. Its decodes whose last token step
            # n-1 sampled read it on the device. If this raises, step n-1 stays in flight.
            launched = self.runner.launch(batch, prev)
            for row, seq in enumerate(launched.seqs):
                seq.num_pending += 1
                seq.pending_row = row
        self._in_flight = launched
        if prev is None:
            return []
        # (c) While the device computes step n: step n-1's tokens, processed as a synchronous step
        # processes its own. A sequence finishing here may also be in step n: its step-n token is
        # dropped when step n is processed, and its pages are freed now (Scheduler.finish: the
        # device runs step n before any later step that could reuse them).
        try:
            token_ids, waited = self._wait(prev)
            outputs = self._process(prev.seqs, token_ids, prev.batch, prev)
        except BaseException:
            self._drop(prev, launched)
            raise
        # A step call waits for the previous step's tokens, so its time is (in a steady stream of
        # steps) the previous step's device time: counted under that step's kind.
        self._time_step(prev.batch, start, waited)
        return outputs

    @staticmethod
    def _wait(step) -> tuple[list[int], float]:
        t = time.perf_counter()
        return step.token_ids(), time.perf_counter() - t

    def _time_step(self, batch, start: float, waited: float) -> None:
        elapsed = time.perf_counter() - start
        self._stats.step_seconds["prefill" if batch.chunks else "decode"].observe(elapsed)
        self._stats.step_host_seconds.observe(elapsed - waited)

    def _isolate(self, err: Exception) -> None:
        log.exception("an engine step failed; running its %d requests one at a time to find the cause",
                      len(self.scheduler.running))
        self._stats.num_failed_steps_total += 1
        self._drop(self._in_flight)
        # Run alone last first: each goes back to the front of the waiting queue once it has
        # sampled, so they end up in their order.
        self._suspects = self.scheduler.requeue_all()
        self.block_manager.forget_cached_pages()

    def _step_alone(self, seq: Sequence) -> list[RequestOutput]:
        """One synchronous step of `seq` only; it is cleared once it has sampled a token."""
        if seq.status is FINISHED:  # aborted meanwhile
            self._suspects.pop()
            return []
        try:
            batch = self.scheduler.schedule_alone(seq)
            step = self.runner.launch(batch, None)
            outputs = self._process(batch.seqs, step.token_ids(), batch, step)
        except Exception as err:
            if is_device_fault(err):
                raise
            self._suspects.pop()
            failed = self.fail_request(seq, err)
            self.block_manager.forget_cached_pages()  # its step keyed pages it may not have written
            return [failed]
        if seq.status is FINISHED or batch.seqs:
            self._suspects.pop()
            if seq.status is not FINISHED:
                self.scheduler.requeue(seq)
        return outputs

    def _drop(self, *steps: StepInFlight | None) -> None:
        """Forget in-flight tokens (reading or recording them failed, e.g. a device error).

        A sequence that loses its pending token decodes again from its last known token: that
        rewrites the same cache slot with the same K/V, as a failed synchronous step is retried.
        """
        for step in steps:
            if step is not None:
                for seq in step.seqs:
                    seq.num_pending = 0
        self._in_flight = None

    def _process(self, seqs: list[Sequence], tokens: list[int], batch,
                 step: StepInFlight | None = None) -> list[RequestOutput]:
        """Record a step's sampled tokens: append, stops, finished sequences, outputs, stats."""
        tokenizer = self.tokenizer
        live, failed = [], []
        logprobs = None
        if step is not None and (step.logprobs is not None or step.prompt_logprobs is not None):
            logprobs = record_logprobs(step, tokens)
        with self.tokenizer_lock:
            for seq, token in zip(seqs, tokens):
                if seq.num_pending:
                    seq.num_pending -= 1  # known now
                if seq.status is FINISHED:  # finished or aborted while in flight: dropped
                    continue
                try:
                    num_output = len(seq.output_token_ids)
                    append_token(seq, token, tokenizer)
                    if seq.guide is not None:
                        accept_token(seq, token)
                    live.append(seq)
                    if logprobs and len(seq.output_token_ids) > num_output and seq.seq_id in logprobs:
                        entry = logprobs[seq.seq_id]
                        seq.logprobs.append(entry)
                        seq.cumulative_logprob += entry[1]
                except Exception as err:  # noqa: BLE001 - this request fails, not the step
                    failed.append((seq, err))
        outputs = [self.fail_request(seq, err) for seq, err in failed]
        for seq in live:
            finished = seq.finish_reason is not None
            if finished:
                self.scheduler.finish(seq, seq.finish_reason)
                self.requests.pop(seq.request_id, None)
                self._count_finished(seq.finish_reason)
            if finished or seq.params.output_kind == "delta":
                outputs.append(make_output(seq, finished))
        self._record_step(batch, len(live))
        return outputs

    def _count_finished(self, reason: str) -> None:
        self._stats.finished_total[reason] = self._stats.finished_total.get(reason, 0) + 1

    def _record_step(self, batch, num_generated: int) -> None:
        stats = self._stats
        stats.num_steps_total += 1
        stats.prompt_tokens_total += sum(s.num_prompt_tokens for s in batch.prefills if s.num_preemptions == 0)
        stats.generation_tokens_total += num_generated
        now = time.monotonic()
        self._recent.append((now, num_generated))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()

    def stats(self) -> EngineStats:
        """A snapshot (safe to read from another thread: fields are copied under the GIL)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        tps = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        return dataclasses.replace(
            self._stats,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_pages_used=self.block_manager.num_used_pages,
            num_preemptions_total=self.scheduler.num_preemptions,
            finished_total=dict(self._stats.finished_total),
            step_seconds={kind: h.copy() for kind, h in self._stats.step_seconds.items()},
            step_host_seconds=self._stats.step_host_seconds.copy(),
            generation_tokens_per_second=tps,
            prefix_cache_queries=self.block_manager.num_queried_tokens,
            prefix_cache_hits=self.block_manager.num_hit_tokens,
        )
