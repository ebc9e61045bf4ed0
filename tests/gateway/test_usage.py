"""Usage read from the bytes passing through: each provider's shape, whole or streamed, split anywhere."""

from __future__ import annotations

import json

import pytest

from gateway.usage import Meter, Price, Totals, parse_prices, price_of


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def read(content_type: str, body: bytes, cut: int | None = None):
    meter = Meter(content_type)
    step = cut or len(body) or 1
    for start in range(0, len(body), step):
        meter.feed(body[start:start + step])
    return meter.usage()


RESPONSES_STREAM = sse(
    {"type": "response.created", "response": {"id": "r1", "usage": None}},
    {"type": "response.output_text.delta", "delta": "hi"},
    {"type": "response.completed", "response": {"id": "r1", "usage": {"input_tokens": 50, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 20}}}},
)
ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"id": "msg_7", "usage": {"input_tokens": 5, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 2, "output_tokens": 1}}},
    {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "usage is a word in the text"}},
    {"type": "message_delta", "usage": {"output_tokens": 12}},
)
CHAT_STREAM = sse(
    {"choices": [{"delta": {"content": "x"}}], "usage": None},
    {"id": "chatcmpl-9", "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 8}}},
)


@pytest.mark.parametrize("cut", [None, 1, 7, 64])
@pytest.mark.parametrize("body, expected", [
    (CHAT_STREAM, (40, 4, 8)),
    (RESPONSES_STREAM, (50, 9, 20)),
    (ANTHROPIC_STREAM, (37, 12, 30)),  # input counts the cache reads and writes; output from the last message_delta
])
def test_streamed_usage_of_each_provider_wherever_the_chunks_are_cut(body, expected, cut):
    usage = read("text/event-stream; charset=utf-8", body, cut)
    assert (usage.input, usage.output, usage.cached, usage.reported) == (*expected, True)
    assert usage.response_id == {CHAT_STREAM: "chatcmpl-9", RESPONSES_STREAM: "r1", ANTHROPIC_STREAM: "msg_7"}[body]


@pytest.mark.parametrize("body, expected", [
    ({"usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}, (10, 3, 0)),
    ({"usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 4}}, (14, 3, 4)),
    ({"output": [], "usage": {"input_tokens": 10, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 6}}}, (10, 3, 6)),
])
def test_whole_json_answers(body, expected):
    usage = read("application/json", json.dumps(body).encode(), 5)
    assert (usage.input, usage.output, usage.cached) == expected


def test_an_answer_without_usage_counts_nothing_and_says_so():
    for content_type, body in (("application/json", b'{"error": {"message": "bad"}}'), ("application/json", b"not json"),
                               ("text/event-stream", b"data: {not json usage}\n\n")):
        usage = read(content_type, body)
        assert (usage.total, usage.reported) == (0, False)


def test_prices_longest_prefix_and_cost():
    prices = parse_prices(" gpt-4o=2.5/10/1.25, gpt-4o-mini=0.15/0.6 ,claude=3/15/0.3")
    assert price_of(prices, "gpt-4o-mini-2024-07-18") == Price(0.15, 0.6, 0.15)
    assert price_of(prices, "gpt-4o-2024-08-06") == Price(2.5, 10, 1.25)
    assert price_of(prices, "llama3") is None
    usage = read("application/json", json.dumps({"usage": {"prompt_tokens": 1_000_000, "completion_tokens": 100_000,
                                                           "prompt_tokens_details": {"cached_tokens": 200_000}}}).encode())
    assert usage.cost(prices["gpt-4o"]) == pytest.approx(0.8 * 2.5 + 0.2 * 1.25 + 0.1 * 10)
    assert usage.cost(None) == 0.0
    totals = Totals()
    totals.add(usage, 3.25)
    assert Totals.from_dict(totals.to_dict()) == totals


@pytest.mark.parametrize("text", ["gpt-4o", "gpt-4o=1", "gpt-4o=a/b", "=1/2", "gpt=1/2/3/4", "gpt=-1/2", "gpt=nan/1"])
def test_a_bad_price_table_names_the_entry(text):
    with pytest.raises(ValueError, match="model=input/output"):
        parse_prices(text)
