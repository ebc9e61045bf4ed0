"""functions.core.cloudevent: deep or oversized JSON is a 400 naming the body, never a RecursionError."""

from __future__ import annotations

import json

import pytest

from functions.core.cloudevent import MAX_JSON_DEPTH, parse
from functions.errors import BadInput

BINARY = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "test", "ce-type": "dev.dockyard.task.submitted",
          "content-type": "application/json"}
STRUCTURED = {"content-type": "application/cloudevents+json"}


def structured(data) -> bytes:
    return json.dumps({"specversion": "1.0", "id": "e-1", "source": "test", "type": "t", "data": data}).encode()


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("mode", ["binary", "structured", "data_base64"])
def test_deeply_nested_json_is_a_400_naming_the_body(mode, depth):
    nested = "[" * depth + "]" * depth  # 1,000 levels: 2 KB
    if mode == "binary":
        headers, body, field = BINARY, nested.encode(), "data"
    elif mode == "structured":
        headers, body, field = STRUCTURED, b'{"specversion":"1.0","id":"e","source":"s","type":"t","data":' + nested.encode() + b"}", "body"
    else:
        import base64

        raw = {"specversion": "1.0", "id": "e", "source": "s", "type": "t", "data_base64": base64.b64encode(nested.encode()).decode()}
        headers, body, field = STRUCTURED, json.dumps(raw).encode(), "data_base64"
    with pytest.raises(BadInput) as caught:
        parse(headers, body)
    assert (caught.value.field, caught.value.status) == (field, 400)
    assert "nested" in caught.value.message


def test_nesting_up_to_the_limit_is_accepted_and_brackets_in_strings_do_not_count():
    ok = {"prompt": "[[[[{{{{" * 100}
    for _ in range(MAX_JSON_DEPTH - 2):
        ok = {"a": ok}
    event = parse(STRUCTURED, structured(ok))
    assert event.get_data()["a"]["a"]
    escaped = {"prompt": 'quote \\" then [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ inside'}
    assert parse(BINARY, json.dumps(escaped).encode()).get_data() == escaped


def test_one_level_too_deep_is_refused():
    data: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        data = [data]
    with pytest.raises(BadInput):
        parse(BINARY, json.dumps(data).encode())
