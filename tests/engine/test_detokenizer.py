"""Incremental detokenization: streamed text adds up to tokenizer.decode(all ids), stop strings
behave as the plain rules say (a full decode after every token), and each step decodes only a
small window (bundled tokenizer)."""

import random
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qoq.engine.detokenizer import append_token, make_output
from qoq.engine.sequence import Sequence
from qoq.engine.stops import truncate_at_stop
from qoq.sampling import SamplingParams

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello 🙂 world, 你好世界! naïve café — ok.",
    "日本語のテキスト🎉🎉 and 한국어 too",
    "family 👩\u200d👩\u200d👧\u200d👦, flags 🇫🇷🇯🇵, math ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "a literal \ufffd replacement char \ufffd",
    "def f(x):\n    return x ** 2  # 平方\n",
]


@pytest.fixture(scope="module")
def tok():
    from qoq.model.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(None))


class WindowSpy:
    """The tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.windows: list[int] = []

    def decode(self, ids, **kwargs):
        self.windows.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def stream(tokenizer, ids, params, stop_token_ids=frozenset()):
    """Feed ids one per step as the engine does; return (deltas, last output)."""
    seq = Sequence("r", [1], params, frozenset(stop_token_ids))
    pieces, out = [], None
    for token in ids:
        append_token(seq, token, tokenizer)
        out = make_output(seq, finished=seq.finish_reason is not None)
        pieces.append(out.new_text)
        if out.finished:
            break
    return pieces, out


def reference(tokenizer, ids, params, stop_token_ids=frozenset()):
    """The rules, written plainly with a full decode after every token: a stop token ends the
    output without being in it; a stop string ends it after the token that completes it, the
    text cut before the string; max_tokens ends it with "length"."""
    tokens, reason = [], None
    for token in ids:
        if token in stop_token_ids:
            reason = "stop"
            break
        tokens.append(token)
        if truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), params.stop)[1]:
            reason = "stop"
            break
        if len(tokens) >= params.max_tokens:
            reason = "length"
            break
    text, _ = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
    return SimpleNamespace(token_ids=tokens, text=text, finish_reason=reason)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode_of_all_ids(tok, text):
    ids = tok(text)["input_ids"]
    ids = ids[:5] + [tok.convert_tokens_to_ids("<|im_start|>")] + ids[5:]  # a special token: no text
    spy = WindowSpy(tok)
    pieces, out = stream(spy, ids, SamplingParams(max_tokens=len(ids)))
    expected = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == out.text == expected
    assert out.finished and out.finish_reason == "length" and out.token_ids == ids
    # Nothing streamed is ever taken back or garbled: every prefix of the stream is final text.
    sent = ""
    for piece in pieces:
        sent += piece
        assert expected.startswith(sent)
    # Incremental: at most two decodes a token, each of a few ids, not the whole output.
    assert len(spy.windows) <= 2 * len(ids)
    assert max(spy.windows) <= 10


def test_long_output_decodes_small_windows(tok):
    ids = tok(" ".join(TEXTS * 4))["input_ids"]
    spy = WindowSpy(tok)
    pieces, out = stream(spy, ids, SamplingParams(max_tokens=len(ids), stop=["never there"]))
    assert "".join(pieces) == out.text == tok.decode(ids)
    assert len(ids) > 300 and max(spy.windows) <= 10 and len(spy.windows) <= 2 * len(ids)


@pytest.mark.parametrize("text, stop", [
    ("Hello 🙂 world, 你好世界! naïve café — ok.", "世界"),  # CJK, split over byte tokens
    ("Hello 🙂 world, 你好世界! naïve café — ok.", "🙂 wor"),  # emoji + ASCII across tokens
    ("Hello 🙂 world, 你好世界! naïve café — ok.", "ok."),
    ("日本語のテキスト🎉🎉 and 한국어 too", "🎉"),
    ("日本語のテキスト🎉🎉 and 한국어 too", "テキ"),
    ("The quick brown fox jumps over the lazy dog.", "own fox ju"),  # spans several tokens
    ("The quick brown fox jumps over the lazy dog.", "T"),  # in the first token
    ("The quick brown fox jumps over the lazy dog.", "cat"),  # never
])
def test_stop_strings_across_tokens_match_the_generator(tok, text, stop):
    ids = tok(text)["input_ids"]
    params = SamplingParams(max_tokens=len(ids), stop=[stop, "zzz-never"])
    pieces, out = stream(tok, ids, params)
    ref = reference(tok, ids, params)
    assert "".join(pieces) == out.text == ref.text
    assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason
    full = tok.decode(ids, skip_special_tokens=True)
    if stop in full:
        assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    assert all(stop not in piece for piece in pieces)


def test_unfinished_character_at_the_end_is_kept_as_decode_has_it(tok):
    ids = tok("go 🎉")["input_ids"]
    cut = ids[:-1]  # the emoji's last byte never comes
    assert tok.decode(cut).endswith("\ufffd")
    pieces, out = stream(tok, cut, SamplingParams(max_tokens=len(cut)))
    assert "".join(pieces) == out.text == tok.decode(cut)
    assert all("\ufffd" not in piece for piece in pieces[:-1])  # held back until the end


def test_abort_mid_character_flushes_the_pending_text(tok):
    ids = tok("ok 你好")["input_ids"]
    seq = Sequence("r", [1], SamplingParams(max_tokens=100))
    pieces = []
    for token in ids[:-1]:
        append_token(seq, token, tok)
        pieces.append(make_output(seq, finished=False).new_text)
    out = make_output(seq, finished=True)  # what LLMEngine.abort_request does
    assert "".join(pieces) + out.new_text == out.text == tok.decode(ids[:-1])


def test_random_token_streams(tok):
    rng = random.Random(0)
    fragments = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]  # bytes of characters
    for _ in range(40):
        n = rng.randint(1, 30)
        ids = [rng.choice(fragments) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(n)]
        pieces, out = stream(tok, ids, SamplingParams(max_tokens=n))
        assert "".join(pieces) == out.text == tok.decode(ids, skip_special_tokens=True), ids


def test_a_stop_string_longer_than_the_text_so_far_is_held_back(tok):
    """The finding of issue 26: the hold-back index went negative, so text the final answer cuts
    was streamed ([' ', 'Paris.', ''] against ' ')."""
    ids = tok(" Paris. It is")["input_ids"]
    params = SamplingParams(max_tokens=len(ids), stop=["Paris. It is"])
    pieces, out = stream(tok, ids, params)
    assert out.finish_reason == "stop" and out.text == " "
    assert "".join(pieces) == " "


def _check_stream(tok, ids, params, stop_ids):
    pieces, out = stream(tok, ids, params, stop_ids)
    ref = reference(tok, ids, params, stop_ids)
    assert "".join(pieces) == out.text == ref.text
    assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason
    sent = ""
    for piece in pieces:  # never a piece that is taken back
        sent += piece
        assert out.text.startswith(sent)


@st.composite
def stop_cases(draw, tok, fragments):
    """Token ids (whole words, bytes of split characters, special tokens) and stop strings: pieces
    of the decoded text (overlapping, across tokens, longer than the text so far), random unicode,
    and stop token ids."""
    words = draw(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=3))
    ids = tok(" ".join(words))["input_ids"][: draw(st.integers(1, 40))]
    for _ in range(draw(st.integers(0, 4))):  # some byte tokens: characters split across tokens
        ids.insert(draw(st.integers(0, len(ids))), draw(st.sampled_from(fragments)))
    text = tok.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(draw(st.integers(0, 4))):
        if text and draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start : start + draw(st.integers(1, 12))])
        else:
            stops.append(draw(st.text(min_size=1, max_size=8)))
    if stops and draw(st.booleans()):
        stops.append(stops[0] + draw(st.text(min_size=1, max_size=30)))  # overlaps the first, longer
    stop_ids = draw(st.sets(st.sampled_from(ids), max_size=1)) if draw(st.booleans()) else set()
    max_tokens = draw(st.integers(1, len(ids)))
    return ids, SamplingParams(max_tokens=max_tokens, stop=stops), stop_ids


def test_streamed_equals_final_for_every_stop_configuration(tok):
    fragments = [i for i in range(2000) if tok.decode([i]) == "\ufffd"]

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stop_cases(tok, fragments))
    def check(case):
        _check_stream(tok, *case)

    check()
