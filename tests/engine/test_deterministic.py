"""EngineConfig.deterministic: a greedy request's output does not depend on what else runs.

Float weights with a KV4 cache are the hard case: without the mode, last-bit differences between
GEMMs of different batch shapes flip 4-bit codes (on this CPU about half of these prompts change
when run together). The same prompts run alone, then mixed with others under chunked prefill with
a small budget, a shared prefix from the prefix cache and preemption, must give the same tokens.
"""

import pytest
import torch

from qoq.engine import LLM, SamplingParams
from qoq.engine.batch_invariant import PerRowLinears

TEXTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "1, 2, 3, 4,",
         "Once upon a time, in a land far away", "The quick brown fox"]
OTHERS = ["Dear Sir or Madam,", "import numpy as np\nimport torch", "The capital of France is Paris. The capital of"]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def engine(bundled, **kw):
    kw = {"kv_bits": 4, "page_size": 16, "num_pages": 64, "deterministic": True, **kw}
    return LLM.from_model(*bundled, **kw)


@pytest.fixture(scope="module")
def alone(bundled):
    tok = bundled[1]
    return [engine(bundled).generate([tok(t)["input_ids"]], PARAMS)[0].token_ids for t in TEXTS]


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_greedy_outputs_alone_equal_outputs_mixed(bundled, alone, async_scheduling):
    tok = bundled[1]
    prompts = [tok(t)["input_ids"] for t in TEXTS + OTHERS]
    params = [PARAMS] * len(TEXTS) + [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 20, 9)]
    order = [6, 0, 7, 1, 2, 8, 3, 4, 5]  # others interleaved, arriving first
    llm = engine(bundled, max_num_batched_tokens=24, async_scheduling=async_scheduling)
    outs = llm.generate([prompts[i] for i in order], [params[i] for i in order])
    mixed = {i: o.token_ids for i, o in zip(order, outs)}
    assert [mixed[i] for i in range(len(TEXTS))] == alone


def test_preemption_and_the_prefix_cache_keep_the_outputs(bundled, alone):
    tok = bundled[1]
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    llm = engine(bundled, num_pages=6, max_num_seqs=6)  # 96 tokens of cache: most steps preempt
    first = [o.token_ids for o in llm.generate(prompts, PARAMS)]
    assert llm.engine.scheduler.num_preemptions > 0
    again = [o.token_ids for o in llm.generate(prompts[::-1], PARAMS)][::-1]  # prefixes cached now
    assert first == again == alone


def test_per_row_linears_do_not_depend_on_the_other_rows():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(9, 96, generator=gen)
    with PerRowLinears():
        full = linear(x)
        assert torch.equal(linear(x[3:5]), full[3:5]) and torch.equal(linear(x[:1]), full[:1])
    torch.testing.assert_close(full, linear(x))
