"""The serving engine: paged KV cache, in-flight batching, preemption by recompute (docs/serving.md)."""

from qoq.engine.config import EngineConfig
from qoq.engine.llm import LLM
from qoq.engine.llm_engine import EngineStats, LLMEngine
from qoq.engine.sequence import RequestOutput, Sequence, SequenceStatus
from qoq.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams", "Sequence",
           "SequenceStatus"]
