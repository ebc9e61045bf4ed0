"""What a model turn tells the trace: the `thought` event's fields.

Per model turn the agent publishes two `thought` events: `{phase, turn, open: true}`
as the call starts (so "thinking… Ns" is exact and always ends), then
`{phase, turn, text, latency_ms, usage, response_id, tool_calls}` when it
returns, or `{..., error}` when it raised. Two events per turn whatever the
reply's size: the volume is bounded by the number of turns.

Invariants: `text` is the reply's text content only (tool calls are counted,
not copied), redacted, then cut to `TEXT_LIMIT` characters with a marker
(the caller's `cut` does both, in that order). `usage` is the provider's
own count (LangChain's `usage_metadata`), or absent; the model gateway's
`usage` event for the same `response_id` carries the cost.
"""

from __future__ import annotations

from typing import Any, Callable

from langchain_core.messages import AIMessage

TEXT_LIMIT = 8000  # characters of a turn's text in the trace; the transcript keeps all of it
ERROR_LIMIT = 500
USAGE_FIELDS = ("input_tokens", "output_tokens", "total_tokens")


def opened(*, phase: str, turn: int) -> dict[str, Any]:
    return {"phase": phase, "turn": turn, "open": True}


def closed(reply: AIMessage, *, phase: str, turn: int, latency_ms: int, cut: Callable[[str, int], str]) -> dict[str, Any]:
    """The fields of the event that closes a turn, from the model's reply."""
    fields: dict[str, Any] = {
        "phase": phase,
        "turn": turn,
        "text": cut(reply.text, TEXT_LIMIT),
        "latency_ms": latency_ms,
        "tool_calls": len(reply.tool_calls),
    }
    usage = usage_of(reply)
    if usage:
        fields["usage"] = usage
    response_id = response_id_of(reply)
    if response_id:
        fields["response_id"] = response_id
    return fields


def failed(exc: BaseException, *, phase: str, turn: int, latency_ms: int, cut: Callable[[str, int], str]) -> dict[str, Any]:
    """The fields of the event that closes a turn whose call raised: text "", the error in words."""
    said = str(exc) or type(exc).__name__
    return {"phase": phase, "turn": turn, "text": "", "latency_ms": latency_ms, "tool_calls": 0, "error": cut(said, ERROR_LIMIT)}


def usage_of(reply: AIMessage) -> dict[str, int] | None:
    """The provider's token counts of the reply (cached and reasoning tokens too when it says them)."""
    meta = reply.usage_metadata
    if not meta:
        return None
    usage = {name: int(meta[name]) for name in USAGE_FIELDS if isinstance(meta.get(name), int)}
    cached = (meta.get("input_token_details") or {}).get("cache_read")
    if isinstance(cached, int) and cached:
        usage["cached_tokens"] = cached
    reasoning = (meta.get("output_token_details") or {}).get("reasoning")
    if isinstance(reasoning, int) and reasoning:
        usage["reasoning_tokens"] = reasoning
    return usage or None


def response_id_of(reply: AIMessage) -> str | None:
    """The provider's id of the answer (`chatcmpl-…`, `msg_…`, `resp_…`), as the gateway's usage event names it."""
    value = (reply.response_metadata or {}).get("id")
    return value if isinstance(value, str) and value else None
