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

Why our own response and not sse-starlette (3.7.0, measured, not adopted):
- Cost per write, the response alone in one process (CPU time, median of 5
  alternated runs of 200,000 one-frame writes; `.venv/bin/python
  bench/bench_stream.py --responses`, with sse-starlette installed by hand):
  bare ASGI sends 0.17 us, starlette's StreamingResponse 0.25 us, EventStream
  0.65 us, sse-starlette's EventSourceResponse 6.9-7.0 us, 10.7-11.0x ours.
  It opens an anyio cancel scope per write for its send timeout; EventStream
  watches the write in progress from one task instead (an asyncio.timeout per
  write cost 3.6 us, 5.0-5.3 us per write in all).
- End to end, 100 clients at 1,000 records/s (`.venv/bin/python
  bench/bench_fanout.py --clients 100 --rate 1000 --seconds 4 --repeats 2
  --app functions.stream.app:create_app`, then `--app
  bench.sse_starlette_app:create_app`, two rounds alternated): both delivered
  every record (~99,000/s); the app's CPU, median of 8 runs each, 0.31 cores
  ours, 0.375 sse-starlette. Latency separates nothing there: on 2 cores
  shared with other test runs, p99 ranged 20-86 ms (ours) and 23-331 ms
  (sse-starlette) from run to run.
- What it would not do: it finds uvicorn's Server through the SIGTERM handler's
  `__self__` and replaces `uvicorn.Server.handle_exit` for the whole process
  at import (the private reach-in this package dropped); a send timeout raises
  out of the response and leaves a graceful close, which never completes for a
  stalled peer (the socket must be reset); it has no max duration; its ping
  runs on a fixed period, not only when idle. Wrapping all that would leave it
  nothing to do but start four tasks.
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
CLEAN_ENDS = ("done", "max-duration", "shutdown")  # why a response may end at a frame boundary (not "stalled", "disconnected")


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
        sending = _Sending(self, send)
        transport = scope.get(TRANSPORT_KEY)
        bound_send_buffer(transport)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        reason = await sending.run(receive)
        if reason in CLEAN_ENDS and not await sending.end(reason):
            reason = "stalled"
        if reason == "stalled":
            await self._drop(scope.get("client"), transport)

    async def _drop(self, client, transport) -> None:
        """A stalled client: reset its connection, not close it gracefully, so no bytes wait for a peer that never reads."""
        log.info("client %s took no bytes for %gs: dropped", client[0] if client else "?", self.send_timeout)
        if transport is not None:
            reset(transport)
            await anyio.lowlevel.checkpoint()  # let the server see the connection lost before this returns


class _Sending:
    """The send loop of one EventStream response, and the state its tasks share.

    One task pumps the chunks, one writes heartbeats when idle, and three
    watch for an end: a stalled write, the client leaving, the clock or a
    shutdown. They share the write lock, the time of the last write, the start
    of the write in progress, and `reason`: why the response ends, as the
    first of them to end it said.
    """

    __slots__ = ("stream", "send", "lock", "last_write", "write_since", "reason", "group")

    def __init__(self, stream: EventStream, send):
        self.stream = stream
        self.send = send
        self.lock = asyncio.Lock()  # anyio.Lock yields to the loop on every acquire: slow with many clients
        self.last_write = time.monotonic()
        self.write_since: float | None = None  # when the write in progress started
        self.reason: str | None = None
        self.group: anyio.abc.TaskGroup | None = None

    async def run(self, receive) -> str | None:
        """Run the send loop until the first reason to end it; return that reason."""
        async with anyio.create_task_group() as self.group:
            self.group.start_soon(self.pump)
            if self.stream.heartbeat > 0:
                self.group.start_soon(self.beat)
            self.group.start_soon(self.watch_sends)
            self.group.start_soon(self.watch_client, receive)
            self.group.start_soon(self.watch_clock)
        return self.reason

    async def write(self, body: bytes, more: bool = True) -> None:
        """One body write, noted while in progress (for watch_sends) and when done (for beat)."""
        # No timeout scope per write (asyncio.timeout costs ~3.6 us, most of a write):
        # watch_sends() looks at write_since instead.
        self.write_since = time.monotonic()
        await self.send({"type": "http.response.body", "body": body, "more_body": more})
        self.last_write = time.monotonic()
        self.write_since = None

    def finish(self, why: str) -> None:
        """End the send loop; the first reason given is the one kept."""
        if self.reason is None:
            self.reason = why
        self.group.cancel_scope.cancel()

    async def pump(self) -> None:
        """Write the chunks as they come; the response is done when they end."""
        lock, write = self.lock, self.write  # locals: this is the loop of every write
        async with aclosing(self.stream.chunks) as chunks:
            async for chunk in chunks:
                async with lock:
                    await write(chunk)
        self.finish("done")

    async def beat(self) -> None:
        """A comment after `heartbeat` seconds without a write: proxies keep an idle stream open."""
        heartbeat = self.stream.heartbeat
        while True:
            await anyio.sleep(max(0.0, self.last_write + heartbeat - time.monotonic()))
            if time.monotonic() - self.last_write >= heartbeat:
                async with self.lock:
                    await self.write(b":\n\n")

    async def watch_sends(self) -> None:
        """A write still in progress `send_timeout` after it started means a stalled client."""
        send_timeout = self.stream.send_timeout
        while True:
            since, now = self.write_since, time.monotonic()
            if since is not None and now - since >= send_timeout:
                self.finish("stalled")
                return
            await anyio.sleep(send_timeout if since is None else since + send_timeout - now)

    async def watch_client(self, receive) -> None:
        """The client went away: nothing more to send."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.finish("disconnected")

    async def watch_clock(self) -> None:
        """End at the response's max duration (jittered: reconnects spread out), or at once on shutdown."""
        stream = self.stream
        limit = stream.max_seconds * (1 - MAX_SECONDS_JITTER * random.random())
        with anyio.move_on_after(limit):
            await stream.closing.wait()
        self.finish("shutdown" if stream.closing.is_set() else "max-duration")

    async def end(self, reason: str) -> bool:
        """The last write of a clean end, with a comment saying why unless the chunks ended; False if it stalled.

        The send loop is over, so watch_sends() no longer watches: this one write has its own timeout.
        """
        tail = b"" if reason == "done" else comment(f"{reason}: resume with Last-Event-ID")
        try:
            async with asyncio.timeout(self.stream.send_timeout):
                await self.write(tail, more=False)
        except TimeoutError:
            return False
        return True


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
