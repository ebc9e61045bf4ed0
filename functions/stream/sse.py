"""Server-Sent Events: the framing of one message, and `EventStream`, the response that carries them.

Invariants:
- A frame is written whole: `id:` is the message's sequence in the stream
  AGENT, `event:` its type ("log" for log records), and data with line breaks
  is split into `data:` lines. `end` carries no `id:`, so a client resuming
  after it still resumes after the terminal event itself.
- A response ends cleanly, at a frame boundary, when its chunks end, after
  `max_seconds` (less up to MAX_SECONDS_JITTER of it, so reconnects spread
  out), or when `closing` is set (server shutdown); a comment says why.
- No client holds more than one write (MAX_WRITE_BYTES, functions/stream/feed.py)
  in user space, plus the transport's 64 KiB and a fixed kernel send buffer; a
  send that does not complete within `send_timeout` means a stalled client:
  its connection is reset at once, not closed gracefully.

SSE_CHOICE
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import ClassVar

import anyio  # starlette's own dependency: costs nothing at import
import anyio.lowlevel

from functions.stream.internals import TRANSPORT_KEY

log = logging.getLogger(__name__)

LOG_EVENT = "log"  # SSE event name of records from logs.agent.<id>
END_EVENT = "end"  # SSE event name sent after the terminal status event
DEFAULT_HEARTBEAT_SECONDS = 15.0  # an SSE comment at least this often keeps proxies from closing the stream
MAX_SECONDS_JITTER = 0.1  # responses end between 90% and 100% of max_seconds: reconnects spread out
SOCKET_SEND_BUFFER_BYTES = 256 * 1024  # the kernel's send buffer per stream (Linux autotunes it up to 4 MiB)


# --- framing ----------------------------------------------------------------------


def event_name(event: object) -> str:
    """The SSE event name of a published event: its type, if that is an identifier."""
    name = event.get("type") if isinstance(event, dict) else None
    return name if isinstance(name, str) and name.isidentifier() else "event"


def frame(seq: int, event: bytes, data: bytes) -> bytes:
    """One SSE message: data as published, split into `data:` lines if it has line breaks."""
    if b"\n" in data or b"\r" in data:
        data = b"\ndata: ".join(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event, data)


def end_frame(task_id: str, seq: int) -> bytes:
    """No `id:`: a client that reconnects still resumes after the terminal event itself."""
    body = json.dumps({"task_id": task_id, "last_id": seq}, separators=(",", ":"))
    return f"event: {END_EVENT}\ndata: {body}\n\n".encode()


def comment(text: str) -> bytes:
    """An SSE comment: clients ignore it; it says why a response ended, for people reading the wire."""
    return f": {text}\n\n".encode()


# --- the response -------------------------------------------------------------------


class _Stalled(Exception):
    """The client's socket took no bytes for the send timeout."""


class EventStream:
    """An ASGI response: the bytes of `chunks` as an SSE stream, heartbeats when idle.

    `on_close` runs once the response is over, however it ended. A stalled
    client's connection is aborted when the transport is known (see
    functions/stream/internals.py) instead of waiting for a peer that never
    reads to take the bytes already queued for it.
    """

    headers: ClassVar[list[tuple[bytes, bytes]]] = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer the stream
    ]

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        heartbeat: float,
        send_timeout: float,
        max_seconds: float,
        closing: asyncio.Event,
        on_close: Callable[[], None] | None = None,
    ):
        self.chunks = chunks
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.max_seconds = max_seconds
        self.closing = closing
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            if scope["method"] == "HEAD":
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                await self.chunks.aclose()
                return
            await self._stream(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _stream(self, scope, receive, send) -> None:
        lock = asyncio.Lock()  # anyio.Lock yields to the loop on every acquire: slow with many clients
        last_write = time.monotonic()
        reason: str | None = None

        async def write(body: bytes, more: bool = True) -> None:
            nonlocal last_write
            try:
                async with asyncio.timeout(self.send_timeout):  # cheaper than an anyio scope, per write
                    await send({"type": "http.response.body", "body": body, "more_body": more})
            except TimeoutError:
                raise _Stalled from None
            last_write = time.monotonic()

        def finish(why: str) -> None:
            nonlocal reason
            if reason is None:
                reason = why
            group.cancel_scope.cancel()

        async def pump() -> None:
            try:
                async with aclosing(self.chunks) as chunks:
                    async for chunk in chunks:
                        async with lock:
                            await write(chunk)
                finish("done")
            except _Stalled:
                finish("stalled")

        async def beat() -> None:
            try:
                while True:
                    await anyio.sleep(max(0.0, last_write + self.heartbeat - time.monotonic()))
                    if time.monotonic() - last_write >= self.heartbeat:
                        async with lock:
                            await write(b":\n\n")
            except _Stalled:
                finish("stalled")

        async def watch_client() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            finish("disconnected")

        async def watch_clock() -> None:
            limit = self.max_seconds * (1 - MAX_SECONDS_JITTER * random.random())
            with anyio.move_on_after(limit):
                await self.closing.wait()
            finish("shutdown" if self.closing.is_set() else "max-duration")

        transport = scope.get(TRANSPORT_KEY)
        bound_send_buffer(transport)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        async with anyio.create_task_group() as group:
            group.start_soon(pump)
            if self.heartbeat > 0:
                group.start_soon(beat)
            group.start_soon(watch_client)
            group.start_soon(watch_clock)

        if reason in ("done", "max-duration", "shutdown"):
            tail = b"" if reason == "done" else comment(f"{reason}: resume with Last-Event-ID")
            try:
                await write(tail, more=False)
                return
            except _Stalled:
                reason = "stalled"
        if reason == "stalled":
            client = scope.get("client")
            log.info("client %s took no bytes for %gs: dropped", client[0] if client else "?", self.send_timeout)
            if transport is not None:
                reset(transport)
                await anyio.lowlevel.checkpoint()  # let the server see the connection lost before this returns


def bound_send_buffer(transport) -> None:
    """Fix the kernel's send buffer of a stream's socket: a client's buffers stay bounded there too.

    Left alone, Linux grows it up to 4 MiB per connection, and a stalled client
    would be noticed only once that is full.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER_BYTES)
        except OSError as exc:
            log.debug("SO_SNDBUF: %s", exc)


def reset(transport) -> None:
    """Drop the connection at once, with a TCP reset.

    A graceful close waits for the peer to take what is queued for it: a
    stalled peer never does. Even a plain close() of the socket leaves the
    kernel trying to deliver its send buffer, and the peer sees no end; with
    SO_LINGER at zero the kernel discards it and sends RST.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as exc:
            log.debug("SO_LINGER: %s", exc)
    transport.abort()
