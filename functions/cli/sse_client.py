"""Follow a task's trace over Server-Sent Events, surviving dropped connections.

Invariant: every message with an `id:` is yielded at most once and in order. After
any drop (network, server restart, Knative's request timeout) the client reconnects
with `Last-Event-ID` set to the last id it yielded, and the stream app resumes
exactly after it. Following stops after the `end` event, which is yielded too.

The text/event-stream format (html.spec.whatwg.org, "server-sent events") is parsed
by hand: lines; `field: value`; comments start with ':'; a blank line dispatches.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

END_EVENT = "end"


@dataclass(frozen=True)
class SSEMessage:
    id: int | None  # the stream sequence; None for events without an id (such as `end`)
    event: str
    data: dict = field(default_factory=dict)


class SSEError(Exception):
    """The server refused the stream for good (4xx): reconnecting cannot help."""

    def __init__(self, status: int, body: dict | str):
        self.status = status
        self.body = body
        message = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class SSEParser:
    """Feed it the bytes of a response as they come; it returns the messages completed.

    Lines end with CRLF, LF or CR; `field: value`; comments start with ':'; a blank
    line dispatches the message built so far (spec: "interpreting an event stream").
    """

    def __init__(self) -> None:
        self._rest = b""  # an incomplete last line
        self._cr = False  # the last chunk ended with CR: a LF starting the next one belongs to it
        self._event = b""
        self._data: list[bytes] = []
        self._id: bytes | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        if self._cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        messages = []
        for line in lines:
            if not line:
                if self._data or self._event:
                    messages.append(self._dispatch())
                else:
                    self._id = None
            elif line[0] != 58:  # ':' starts a comment
                self._field(line)
        return messages

    def _field(self, line: bytes) -> None:
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value
        elif name == b"retry" and value.isdigit():
            self.retry_ms = int(value)

    def _dispatch(self) -> SSEMessage:
        data = b"\n".join(self._data)
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {"text": data.decode(errors="replace")}
        if not isinstance(parsed, dict):
            parsed = {"value": parsed}
        raw_id = self._id
        message = SSEMessage(
            int(raw_id) if raw_id and raw_id.isdigit() else None,
            self._event.decode(errors="replace") or "message",
            parsed,
        )
        self._event, self._data, self._id = b"", [], None
        return message


def _retry_after(value: str | None) -> float:
    try:
        return min(60.0, max(0.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0


async def follow(
    url: str,
    after: int | None = None,
    *,
    reconnect: bool = True,
    max_retries: int | None = 10,
    backoff: float = 0.2,
    max_backoff: float = 5.0,
    read_timeout: float = 60.0,
    headers: dict[str, str] | None = None,
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[SSEMessage]:
    """Yield the messages of the SSE stream at `url`, starting after sequence `after`.

    `max_retries` counts consecutive failed attempts (a connection that yields a
    message resets it); None retries forever. A 4xx answer raises `SSEError` at
    once, except 429 (too many streams from this address), which is retried after
    its Retry-After; 5xx and connection errors are retried with exponential backoff. With
    `reconnect=False` the generator ends when the connection ends. `read_timeout`
    should exceed the server's heartbeat interval: silence longer than that counts
    as a dropped connection.
    """
    own_client = client is None
    if own_client:
        client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=read_timeout))
    last_id = after
    failures = 0
    try:
        while True:
            request_headers = {"Accept": "text/event-stream", **(headers or {})}
            if last_id is not None:
                request_headers["Last-Event-ID"] = str(last_id)
            progressed = False
            parser = SSEParser()
            wait_at_least = 0.0
            try:
                async with client.stream("GET", url, headers=request_headers) as response:
                    if response.status_code == 429:
                        wait_at_least = _retry_after(response.headers.get("retry-after"))
                        raise httpx.HTTPStatusError("HTTP 429", request=response.request, response=response)
                    if 400 <= response.status_code < 500:
                        body = await response.aread()
                        try:
                            detail = json.loads(body)
                        except ValueError:
                            detail = body.decode(errors="replace")
                        raise SSEError(response.status_code, detail)
                    if response.status_code != 200:
                        raise httpx.HTTPStatusError(
                            f"HTTP {response.status_code}", request=response.request, response=response
                        )
                    async for chunk in response.aiter_bytes():
                        for message in parser.feed(chunk):
                            if message.id is not None:
                                if last_id is not None and message.id <= last_id:
                                    continue  # already seen: never yield twice
                                last_id = message.id
                            progressed = True
                            yield message
                            if message.event == END_EVENT:
                                return
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass
            if not reconnect:
                return
            failures = 0 if progressed else failures + 1
            if max_retries is not None and failures > max_retries:
                raise ConnectionError(f"gave up on {url} after {max_retries} retries without progress")
            delay = min(max_backoff, backoff * (2 ** max(failures - 1, 0)))
            if parser.retry_ms is not None:  # the server asked for at least this much
                delay = max(delay, parser.retry_ms / 1000)
            delay = max(delay, wait_at_least)
            await asyncio.sleep(delay)
    finally:
        if own_client:
            await client.aclose()
