"""The engine on a GPU: KV-cache sizing from free memory, Triton kernels, CUDA graphs = eager."""

import pytest
import torch

from qoq.bench.random_model import random_model
from qoq.config import ModelConfig, QuantConfig
from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _generate(engine: LLMEngine, prompts, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


@pytest.mark.parametrize("precision, group", [("w4a8kv4", -1), ("w4a8kv4", 128), ("w16a16kv16", -1)])
def test_graphs_equal_eager_and_the_cache_is_sized_from_free_memory(precision, group):
    model = random_model(ModelConfig.from_hf(TINY), QuantConfig(precision, group), device="cuda")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 64, 65, 130, 7, 200)]
    outputs = []
    for eager in (False, True):
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_model_len=256, enforce_eager=eager,
                                                     gpu_memory_utilization=0.5))
        assert engine.runner.num_pages >= 8 * 4  # free memory sizing found room for every sequence
        assert (engine.runner.graphs is None) == eager
        outputs.append(_generate(engine, prompts, 24))
        del engine
    assert outputs[0] == outputs[1]
    assert all(len(o) == 24 for o in outputs[0])
