"""Token usage of one model call, read from the bytes passing through, and what it costs.

Invariants
- The response is never held back: a meter sees a copy of each chunk as it is passed on.
  A JSON body is parsed once it has ended (its copy is capped at MAX_JSON_BYTES); an event
  stream is split into lines and only `data:` lines that mention `usage` are parsed.
- The providers' shapes, normalized: `input` counts every prompt token, cached ones included;
  `cached` is the part of it read from a cache; `output` the completion's tokens.
  * OpenAI chat completions: `usage.prompt_tokens`, `completion_tokens`,
    `prompt_tokens_details.cached_tokens`; streamed, in the last chunk when the request asks
    `stream_options.include_usage` (the gateway asks it for the caller).
  * OpenAI responses: `usage.input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`;
    streamed, in the `response.completed` event's `response.usage`.
  * Anthropic messages: `usage.input_tokens` (uncached), `cache_read_input_tokens`,
    `cache_creation_input_tokens`, `output_tokens`; streamed, input in `message_start`'s
    `message.usage`, the running output count in each `message_delta`'s `usage`.
  The latest value of each field wins, which is right for all three (the stream's counts are cumulative).
- Prices are USD per million tokens: `model=input/output[/cached input]`; the longest prefix of the
  request's model names the price (`gpt-4o` prices `gpt-4o-2024-08-06`); an unknown model costs 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_JSON_BYTES = 32 * 1024 * 1024
_FIELDS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
           "cache_read_input_tokens", "cache_creation_input_tokens", "cached_tokens")


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cached: float


def parse_prices(text: str) -> dict[str, Price]:
    """`gpt-4o=2.5/10, claude-sonnet-4-5=3/15/0.3` -> model prefix: Price. Raises ValueError naming the entry."""
    prices: dict[str, Price] = {}
    for entry in (part.strip() for part in (text or "").split(",")):
        if not entry:
            continue
        model, sep, numbers = entry.partition("=")
        try:
            values = [float(n) for n in numbers.split("/")]
        except ValueError:
            values = []
        if not sep or not model.strip() or len(values) not in (2, 3) or any(v < 0 or v != v or v == float("inf") for v in values):
            raise ValueError(f"{entry!r}: use model=input/output[/cached], USD per million tokens, e.g. gpt-4o=2.5/10")
        prices[model.strip()] = Price(values[0], values[1], values[2] if len(values) == 3 else values[0])
    return prices


def price_of(prices: dict[str, Price], model: str) -> Price | None:
    best = max((p for p in prices if model.startswith(p)), key=len, default=None)
    return prices[best] if best is not None else None


@dataclass
class Usage:
    """One call's tokens, normalized (see the module docstring)."""

    input: int = 0
    output: int = 0
    cached: int = 0
    reported: bool = False
    response_id: str = ""  # the provider's id of the answer (chatcmpl-..., msg_..., resp_...): joins a model turn to its usage

    @property
    def total(self) -> int:
        return self.input + self.output

    def cost(self, price: Price | None) -> float:
        if price is None:
            return 0.0
        return ((self.input - self.cached) * price.input + self.cached * price.cached + self.output * price.output) / 1_000_000


class Meter:
    """Reads a response's usage from copies of its chunks: `feed(chunk)` for each, then `usage()`."""

    def __init__(self, content_type: str):
        self.stream = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
        self._parts: list[bytes] = []
        self._size = 0
        self._line = b""
        self._seen: dict[str, int] = {}
        self._id = ""

    def feed(self, chunk: bytes) -> None:
        if not self.stream:
            self._size += len(chunk)
            if self._size <= MAX_JSON_BYTES:
                self._parts.append(chunk)
            return
        lines = (self._line + chunk).split(b"\n")
        self._line = lines.pop()
        for line in lines:
            self._sse_line(line)

    def usage(self) -> Usage:
        if self.stream:
            self._sse_line(self._line)
            self._line = b""
        elif self._parts and self._size <= MAX_JSON_BYTES:
            try:
                self._take(json.loads(b"".join(self._parts)))
            except ValueError:
                pass
            self._parts = []
        usage = _normalize(self._seen)
        usage.response_id = self._id
        return usage

    def _sse_line(self, line: bytes) -> None:
        if line.startswith(b"data:") and b"usage" in line:
            try:
                self._take(json.loads(line[5:]))
            except ValueError:
                pass

    def _take(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        for holder in (obj, obj.get("message"), obj.get("response")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                _collect(holder["usage"], self._seen)
                if not self._id and isinstance(holder.get("id"), str):
                    self._id = holder["id"][:100]


def _collect(usage: dict, seen: dict[str, int]) -> None:
    for name in _FIELDS:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            seen[name] = value
    for details in ("prompt_tokens_details", "input_tokens_details"):
        cached = (usage.get(details) or {}).get("cached_tokens") if isinstance(usage.get(details), dict) else None
        if isinstance(cached, int) and not isinstance(cached, bool):
            seen["cached_tokens"] = cached


def _normalize(seen: dict[str, int]) -> Usage:
    if not seen:
        return Usage()
    if "prompt_tokens" in seen or "completion_tokens" in seen:  # OpenAI chat completions
        return Usage(seen.get("prompt_tokens", 0), seen.get("completion_tokens", 0), seen.get("cached_tokens", 0), True)
    if "cache_read_input_tokens" in seen or "cache_creation_input_tokens" in seen:  # Anthropic: input excludes the cache
        read, created = seen.get("cache_read_input_tokens", 0), seen.get("cache_creation_input_tokens", 0)
        return Usage(seen.get("input_tokens", 0) + read + created, seen.get("output_tokens", 0), read, True)
    return Usage(seen.get("input_tokens", 0), seen.get("output_tokens", 0), seen.get("cached_tokens", 0), True)


@dataclass
class Totals:
    """A task's running totals, as the gateway counts them."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    refused: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, usage: Usage, cost: float) -> None:
        self.calls += 1
        self.input_tokens += usage.input
        self.output_tokens += usage.output
        self.cached_tokens += usage.cached
        self.cost_usd += cost

    def to_dict(self) -> dict:
        return {"calls": self.calls, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cached_tokens": self.cached_tokens, "tokens": self.tokens, "cost_usd": round(self.cost_usd, 6),
                "refused": self.refused}

    @classmethod
    def from_dict(cls, data: dict) -> "Totals":
        return cls(**{k: type(getattr(cls(), k))(data.get(k, 0)) for k in ("calls", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "refused")})
