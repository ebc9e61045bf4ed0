"""An HTTP request as a CloudEvent (spec 1.0, JSON data), binary or structured mode.

Invariant: whatever `parse` returns is a CloudEvent with specversion 1.0, the
required attributes, and data that is None or decoded JSON. Anything else is a
`BadInput` naming the header or attribute at fault, so no function ever sees
(or crashes on) a malformed event.
"""

from __future__ import annotations

import base64
import json
from typing import Mapping

from cloudevents.http import CloudEvent, from_http
from starlette.requests import Request

from functions.errors import BadInput

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")
MAX_BODY_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32  # nesting of objects and arrays; a task needs 3


def _is_json_type(content_type: str | None) -> bool:
    """application/json, text/json or any +json media type (parameters ignored)."""
    if not content_type:
        return True  # CloudEvents: an absent datacontenttype means application/json
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def _json_depth_exceeds(raw: bytes | str, limit: int) -> bool:
    """True when arrays/objects nest deeper than `limit`, counted before parsing (brackets inside
    strings skipped), so deep input never reaches the recursive parser."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _decode_json(raw: bytes | str, field: str) -> object:
    """Decoded JSON, or BadInput naming `field`: invalid, or nested deeper than MAX_JSON_DEPTH."""
    if _json_depth_exceeds(raw, MAX_JSON_DEPTH):
        raise BadInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels; send a flatter object", field)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"event data is not valid JSON ({exc}); send a JSON object", field) from None
    except RecursionError:
        raise BadInput("JSON nested too deeply; send a flatter object", field) from None


def parse(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Parse a request into a CloudEvent or raise BadInput (400, or 415 for non-JSON data)."""
    headers = {k.lower(): v for k, v in headers.items()}
    content_type = headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()

    if media == BATCH:
        raise BadInput("batched CloudEvents are not accepted; send one event per request", "content-type", 415)
    if media == STRUCTURED:
        return _parse_structured(headers, body)
    if "ce-specversion" in headers:
        return _parse_binary(headers, body, content_type)
    raise BadInput(
        "not a CloudEvent: send binary mode (ce-specversion, ce-id, ce-source, ce-type headers) "
        f"or structured mode (Content-Type: {STRUCTURED})",
        "ce-specversion",
    )


def _check_attributes(attrs: Mapping[str, object], prefix: str) -> None:
    for name in REQUIRED:
        value = attrs.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadInput(f"CloudEvent attribute '{name}' is required and must be a non-empty string", prefix + name)
    if attrs["specversion"] != "1.0":
        raise BadInput(f"CloudEvents specversion {attrs['specversion']!r} is not supported; use 1.0", prefix + "specversion")


def _raw(value):
    return value  # hand data to us undecoded; we decode JSON with proper errors


def _parse_binary(headers: dict, body: bytes, content_type: str) -> CloudEvent:
    _check_attributes({k[3:]: v for k, v in headers.items() if k.startswith("ce-")}, "ce-")
    if body and not _is_json_type(content_type):
        raise BadInput(f"event data must be JSON; got Content-Type {content_type!r}", "data", 415)
    try:
        event = from_http(headers, body, data_unmarshaller=_raw)
    except Exception as exc:  # the SDK raises several types for one cause: not a valid event
        raise BadInput(f"not a valid CloudEvent: {exc}", "ce-specversion") from None
    event.data = _decode_json(body, "data") if body else None
    return event


def _parse_structured(headers: dict, body: bytes) -> CloudEvent:
    raw = _decode_json(body, "body") if body else None
    if not isinstance(raw, dict):
        raise BadInput("a structured CloudEvent must be a JSON object", "body")
    _check_attributes(raw, "")
    if "data" in raw and "data_base64" in raw:
        raise BadInput("a CloudEvent carries either 'data' or 'data_base64', not both", "data_base64")
    content_type = raw.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise BadInput("datacontenttype must be a string", "datacontenttype")
    data = raw.get("data")
    if "data_base64" in raw:
        try:
            decoded = base64.b64decode(raw["data_base64"], validate=True)
        except (ValueError, TypeError):
            raise BadInput("data_base64 is not valid base64", "data_base64") from None
        if not _is_json_type(content_type):
            raise BadInput(f"event data must be JSON; got datacontenttype {content_type!r}", "data", 415)
        data = _decode_json(decoded, "data_base64") if decoded else None
    elif data is not None and not _is_json_type(content_type):
        raise BadInput(f"event data must be JSON; got datacontenttype {content_type!r}", "data", 415)
    attrs = {k: v for k, v in raw.items() if k not in ("data", "data_base64")}
    try:
        return CloudEvent.create(attrs, data)
    except Exception as exc:
        raise BadInput(f"not a valid CloudEvent: {exc}", "body") from None


def require_type(event: CloudEvent, expected: str) -> None:
    if event["type"] != expected:
        raise BadInput(f"this function handles CloudEvents of type {expected!r}, not {event['type']!r}", "ce-type")


def data_object(event: CloudEvent) -> dict:
    """The event's data as a JSON object, or BadInput naming 'data'."""
    data = event.get_data()
    if not isinstance(data, dict):
        raise BadInput("event data must be a JSON object", "data")
    return data


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing (413) anything larger than `limit` without reading it all."""
    too_large = BadInput(f"request body is larger than {limit} bytes", "body", 413)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_event(request: Request) -> CloudEvent:
    """The CloudEvent posted in `request`, or BadInput."""
    return parse(request.headers, await read_body(request))
