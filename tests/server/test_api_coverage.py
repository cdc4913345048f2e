"""API coverage: every field a request body may carry is exercised by a test that checks what it
does (or, for a field qoq does not implement, that it is refused by name). A field added to the
protocol without a test fails here; so does a test that is renamed away from this table.

The fields the other server tests do not reach through HTTP are tested below."""

import importlib

import pytest
from openai import OpenAI
from server_helpers import MODEL

from qoq.server.protocol import ChatCompletionRequest, CompletionRequest

# field -> the tests (module::function, under tests/server) that check its effect
FIELD_TESTS = {
    "model": ["test_api_surface::test_openai_client_with_and_without_the_key"],
    "user": ["test_api_surface::test_user_field_is_accepted"],
    "prompt": ["test_openai_api::test_completion_matches_reference_with_usage",
               "test_sampling_api::test_a_list_of_prompts_gives_choices_in_order"],
    "messages": ["test_openai_api::test_chat_streaming_and_not"],
    "max_tokens": ["test_openai_api::test_completion_matches_reference_with_usage"],
    "max_completion_tokens": ["test_api_coverage::test_max_completion_tokens_caps_the_output"],
    "temperature": ["test_sampling_api::test_n_choices_differ_reproduce_and_share_the_prompts_pages",
                    "test_bad_requests::test_a_tiny_temperature_is_greedy_not_empty"],
    "top_k": ["test_api_coverage::test_top_k_one_and_a_tiny_top_p_are_greedy"],
    "top_p": ["test_api_coverage::test_top_k_one_and_a_tiny_top_p_are_greedy"],
    "seed": ["test_sampling_api::test_n_choices_differ_reproduce_and_share_the_prompts_pages"],
    "stop": ["test_openai_api::test_streamed_equals_non_streamed_for_stop_configurations"],
    "stop_token_ids": ["test_openai_api::test_streamed_equals_non_streamed_with_a_stop_token"],
    "ignore_eos": ["test_openai_api::test_streamed_equals_non_streamed_with_a_stop_token"],
    "n": ["test_sampling_api::test_n_choices_differ_reproduce_and_share_the_prompts_pages"],
    "best_of": ["test_sampling_api::test_best_of_returns_the_highest_cumulative_logprob"],
    "stream": ["test_openai_api::test_streamed_completion_equals_non_streamed"],
    "stream_options": ["test_openai_api::test_streamed_completion_equals_non_streamed"],
    "logprobs": ["test_sampling_api::test_completion_logprobs_with_echo_equal_the_dense_forward",
                 "test_sampling_api::test_chat_logprobs_streamed_equal_non_streamed_and_the_dense_forward",
                 "test_sampling_api::test_logprobs_zero_gives_the_chosen_tokens_only"],
    "top_logprobs": ["test_sampling_api::test_chat_logprobs_streamed_equal_non_streamed_and_the_dense_forward"],
    "echo": ["test_sampling_api::test_completion_logprobs_with_echo_equal_the_dense_forward"],
    "presence_penalty": ["test_sampling_api::test_logit_bias_min_tokens_and_penalties"],
    "frequency_penalty": ["test_sampling_api::test_logit_bias_min_tokens_and_penalties"],
    "repetition_penalty": ["test_sampling_api::test_logit_bias_min_tokens_and_penalties"],
    "min_tokens": ["test_sampling_api::test_logit_bias_min_tokens_and_penalties"],
    "logit_bias": ["test_sampling_api::test_logit_bias_min_tokens_and_penalties"],
    "response_format": ["test_structured_api::test_chat_json_schema_and_json_object",
                        "test_structured_api::test_completions_response_format_and_guided_regex"],
    "guided_regex": ["test_structured_api::test_completions_response_format_and_guided_regex"],
    "guided_grammar": ["test_api_coverage::test_guided_grammar_constrains_the_output"],
    "tools": ["test_structured_api::test_tool_choice_required_and_named_always_yield_valid_calls",
              "test_structured_api::test_bundled_template_cannot_take_tools"],
    "tool_choice": ["test_structured_api::test_tool_choice_required_and_named_always_yield_valid_calls"],
    "parallel_tool_calls": ["test_structured_api::test_tool_choice_required_and_named_always_yield_valid_calls"],
}
# any other field: a 400 naming it
UNKNOWN_FIELDS = ["test_api_surface::test_unimplemented_fields_are_refused_by_name"]


def test_every_request_field_has_a_test_of_its_effect():
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert fields == set(FIELD_TESTS), (sorted(fields - set(FIELD_TESTS)), sorted(set(FIELD_TESTS) - fields))
    for ref in [t for tests in FIELD_TESTS.values() for t in tests] + UNKNOWN_FIELDS:
        module, name = ref.split("::")
        assert callable(getattr(importlib.import_module(module), name, None)), f"{ref} does not exist"


def _text(client: OpenAI, **kw) -> str:
    return client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=8, **kw).choices[0].text


def test_top_k_one_and_a_tiny_top_p_are_greedy(client):
    """Sampling at temperature 1 from the top-1 token (or from the smallest set reaching 1e-9 of
    the mass, the top token alone) gives the greedy text, whatever the seed; plain sampling at
    temperature 2 does not, for some seed."""
    greedy = _text(client, temperature=0)
    for seed in range(3):
        assert _text(client, temperature=1.0, seed=seed, extra_body={"top_k": 1}) == greedy
        assert _text(client, temperature=1.0, top_p=1e-9, seed=seed) == greedy
    assert any(_text(client, temperature=2.0, seed=seed) != greedy for seed in range(3))


def test_max_completion_tokens_caps_the_output(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to fifty."}],
                                         max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_guided_grammar_constrains_the_output(client, stream):
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    kw = dict(model=MODEL, prompt="Is the sky blue?", max_tokens=16, temperature=1.0, seed=4,
              extra_body={"guided_grammar": grammar})
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    else:
        text = client.completions.create(**kw).choices[0].text
    assert text in ("The answer is yes.", "The answer is no.")
