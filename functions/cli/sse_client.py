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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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


@asynccontextmanager
async def _http_client(client: httpx.AsyncClient | None, read_timeout: float) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client, left open; or one of our own, closed when following ends."""
    if client is not None:
        yield client
        return
    own = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=read_timeout))
    try:
        yield own
    finally:
        await own.aclose()


def _request_headers(headers: dict[str, str] | None, last_id: int | None) -> dict[str, str]:
    """The caller's headers, plus Last-Event-ID once an id was yielded: the server resumes right after it."""
    request_headers = {"Accept": "text/event-stream", **(headers or {})}
    if last_id is not None:
        request_headers["Last-Event-ID"] = str(last_id)
    return request_headers


async def _check_status(response: httpx.Response) -> None:
    """Raise unless the stream is on: SSEError for a 4xx but 429 (reconnecting cannot help), HTTPStatusError otherwise (retried)."""
    status = response.status_code
    if 400 <= status < 500 and status != 429:
        body = await response.aread()
        try:
            detail = json.loads(body)
        except ValueError:
            detail = body.decode(errors="replace")
        raise SSEError(status, detail)
    if status != 200:
        raise httpx.HTTPStatusError(f"HTTP {status}", request=response.request, response=response)


def _wait_asked(exc: Exception) -> float:
    """The least wait a failed attempt asks for: a 429's Retry-After; none for other failures."""
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 429:
        return _retry_after(exc.response.headers.get("retry-after"))
    return 0.0


def _delay(failures: int, backoff: float, max_backoff: float, retry_ms: int | None, at_least: float) -> float:
    """The wait before the next attempt: exponential backoff, but no less than the server asked for."""
    delay = min(max_backoff, backoff * (2 ** max(failures - 1, 0)))
    if retry_ms is not None:  # the server asked for at least this much (`retry:`)
        delay = max(delay, retry_ms / 1000)
    return max(delay, at_least)


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
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> AsyncIterator[SSEMessage]:
    """Yield the messages of the SSE stream at `url`, starting after sequence `after`.

    `max_retries` counts consecutive failed attempts (a connection that yields a
    message resets it); None retries forever. A 4xx answer raises `SSEError` at
    once, except 429 (too many streams from this address), which is retried after
    its Retry-After; 5xx and connection errors are retried with exponential backoff. With
    `reconnect=False` the generator ends when the connection ends. `read_timeout`
    should exceed the server's heartbeat interval: silence longer than that counts
    as a dropped connection. `sleep` waits between attempts (tests record the waits).
    """
    last_id = after
    failures = 0
    async with _http_client(client, read_timeout) as http:
        while True:
            progressed = False
            parser = SSEParser()
            wait_at_least = 0.0
            try:
                async with http.stream("GET", url, headers=_request_headers(headers, last_id)) as response:
                    await _check_status(response)
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
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                wait_at_least = _wait_asked(exc)
            if not reconnect:
                return
            failures = 0 if progressed else failures + 1
            if max_retries is not None and failures > max_retries:
                raise ConnectionError(f"gave up on {url} after {max_retries} retries without progress")
            await sleep(_delay(failures, backoff, max_backoff, parser.retry_ms, wait_at_least))
