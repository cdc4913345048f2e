"""The request features of the OpenAI API on a GPU (a random W4A8KV4 model, real kernels):
penalties, logit_bias, min_tokens, logprobs, prompt logprobs and structured output. CUDA graphs
give the eager engine's tokens, logprobs are the reference forward's log-softmax, guided JSON parses
and has the schema's fields, and launching a step with penalties, biases and logprobs never waits
on the GPU. The tokenizer is a byte-level one made here (one token per byte, EOS after them): the
bundled model's package is too large to carry to the GPU machine."""

import json

import pytest
import torch
from reference import check_launches_never_wait, logits_of

from qoq.bench.random_model import random_model
from qoq.config import G128, ModelConfig, QuantConfig
from qoq.engine import LLM, SamplingParams
from qoq.engine.guided import build_grammar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EOS = 256
TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "eos_token_id": EOS}
ENGINE = dict(page_size=16, max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.3)
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # a random model would pad with whitespace to max_tokens
}


def byte_tokenizer():
    """Token i < 256 is byte i (GPT-2's byte-to-character map), token 256 is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's map: these stand for themselves
    shifted = iter(range(256, 512))  # the others take the characters after 255, in order
    vocab = {chr(b if b in kept else next(shifted)): b for b in range(256)}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", model_max_length=1 << 20)


@pytest.fixture(scope="module")
def gpu_model():
    model = random_model(ModelConfig.from_hf(TINY), QuantConfig("w4a8kv4", G128), device="cuda", seed=4)
    tok = byte_tokenizer()
    assert tok.decode(tok("{\"a\": 1} é")["input_ids"]) == "{\"a\": 1} é"
    return model, tok


def _requests(tok):
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 256, (40,), generator=gen).tolist()
    return [
        (prompt, SamplingParams(max_tokens=16, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4,
                                logprobs=3, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=16, temperature=0.9, seed=4, frequency_penalty=1.0, logprobs=2,
                                ignore_eos=True)),
        (prompt[:5], SamplingParams(max_tokens=8, logit_bias={EOS: 100.0}, min_tokens=3)),
        (prompt, SamplingParams(max_tokens=6, prompt_logprobs=2, logprobs=0, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=12, ignore_eos=True)),
        (tok("Describe a person as JSON: ")["input_ids"],
         SamplingParams(max_tokens=64, grammar=build_grammar("json_schema", PERSON))),
    ]


def test_graphs_equal_eager_and_the_values_are_the_models(gpu_model):
    model, tok = gpu_model
    requests = _requests(tok)
    prompts, params = [r[0] for r in requests], [r[1] for r in requests]
    outs = {}
    for eager in (False, True):
        llm = LLM.from_model(model, tok, enforce_eager=eager, **ENGINE)
        assert (llm.engine.runner.graphs is None) == eager
        outs[eager] = llm.generate(prompts, params)
        del llm
    assert [o.token_ids for o in outs[False]] == [o.token_ids for o in outs[True]]
    penalized, sampled, held, prompt_lp, plain, guided = outs[False]

    assert penalized.token_ids != plain.token_ids  # the penalties changed the greedy choice
    prompt = prompts[0]
    ref = torch.log_softmax(logits_of(model, prompt + penalized.token_ids), -1).cpu()
    for i, (token, entry) in enumerate(zip(penalized.token_ids, penalized.new_logprobs, strict=True)):
        row = len(prompt) + i - 1
        assert entry[0] == token and abs(entry[1] - ref[row, token].item()) < 0.05, i
        assert len(entry[2]) == 3 and abs(entry[2][0][1] - ref[row].max().item()) < 0.05, i
    assert len(sampled.new_logprobs) == 16 and all(len(e[2]) == 2 for e in sampled.new_logprobs)

    assert len(held.token_ids) == 3 and held.finish_reason == "stop" and EOS not in held.token_ids

    assert prompt_lp.prompt_logprobs[0] is None and len(prompt_lp.prompt_logprobs) == len(prompt)
    dense = torch.log_softmax(logits_of(model, prompt), -1).cpu()
    for pos in range(1, len(prompt)):
        token, logprob, _ = prompt_lp.prompt_logprobs[pos]
        assert token == prompt[pos] and abs(logprob - dense[pos - 1, token].item()) < 0.05, pos

    assert guided.finish_reason == "stop", guided.text
    value = json.loads(guided.text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


def test_launching_with_penalties_biases_and_logprobs_never_waits(gpu_model):
    model, tok = gpu_model
    llm = LLM.from_model(model, tok, async_scheduling=True, **ENGINE)
    engine = llm.engine
    requests = [r for r in _requests(tok) if r[1].grammar is None]
    llm.generate([r[0] for r in requests[:2]], [r[1] for r in requests[:2]])  # warm-up
    launches = check_launches_never_wait(engine.runner)
    outs = llm.generate([r[0] for r in requests], [r[1] for r in requests])
    assert launches[0] >= 12
    assert [len(o.token_ids) for o in outs] == [16, 16, 3, 6, 12]
