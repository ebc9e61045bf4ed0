"""The live trace of a task over Server-Sent Events, and the task listings.

Invariants (docs/stream.md explains the choices):
- An SSE `id:` is the sequence of the message in the JetStream stream AGENT. A
  client that resumes with `Last-Event-ID` (or `?after=SEQ`) gets every later
  message of the task exactly once and in stream order. Its stream keeps a
  position (every task message at or below it has been sent or filtered out)
  and only ever sends messages above it, so a replay (an ordered consumer
  recreates itself after a NATS restart) is dropped and nothing is skipped.
  `?types=` and `?level=` filter what is sent, never the position: a filtered
  client resumes exactly too, and is never sent what its filter excludes.
- After the terminal status event the server sends `event: end` and closes; a
  client resuming at or after the terminal event gets `end` at once.
- Nothing leaves unredacted: every message is redacted once, where it is read
  from NATS (secret formats always; known values from the file in
  `known_secrets_file`, reloaded when it changes), and so is every task record.
- A task followed by any client has one `Feed`: one consumer reading the live
  tail, shared by all its clients. A client whose position is below what the
  feed holds, or further behind than its buffer, catches up with a consumer of
  its own first. Every consumer is ephemeral and deleted when its last reader
  leaves (the server reaps one left behind after `CONSUMER_INACTIVE_SECONDS`).
- A slow client never slows the feed or another client: a live client that
  falls more than `stream_client_buffer_bytes` behind is cut (its response ends
  cleanly; it resumes from its Last-Event-ID), and a socket that takes no bytes
  for `stream_send_timeout_seconds` is aborted.
- Every response ends cleanly, at a frame boundary, after `stream_max_seconds`
  (less some jitter) and when the server shuts down; the client resumes.
- NATS going away mid-stream: the response stays open (heartbeats go on) and
  the consumers recreate themselves once it is back. Any error after the
  response started ends it instead; the client resumes with `Last-Event-ID`.

The app shares the process's NATS connection (`functions.core.bus`), opened on first
use. Mounted inside another Starlette app its lifespan does not run by itself:
the parent enters `app.router.lifespan_context(app)` to run the tracker and to
end open streams on shutdown. nats-py is imported on first use: cold start is
measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import struct
import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator, Callable

import anyio  # starlette's own dependency: costs nothing at import
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import contract
from agent.redact import Redactor
from functions.core import bus
from functions.stream import cockpit
from functions.core.settings import Settings
from functions.errors import BadInput, Unavailable, answer_for

log = logging.getLogger(__name__)

LOG_EVENT = "log"  # SSE event name of records from logs.agent.<id>
END_EVENT = "end"  # SSE event name sent after the terminal status event
DEFAULT_HEARTBEAT_SECONDS = 15.0  # an SSE comment at least this often keeps proxies from closing the stream
CONSUMER_INACTIVE_SECONDS = 30.0
CONSUMER_IDLE_HEARTBEAT_SECONDS = 2.0  # a consumer silent for twice this is recreated (after a NATS restart)
MAX_BATCH = 512  # messages taken from a consumer at once
MAX_FEED_FRAMES = 10_000  # recent frames a task's feed keeps for clients that lag behind
MAX_FEED_BYTES = 16 * 1024 * 1024  # ... and at most this many bytes of them
MAX_WRITE_BYTES = 256 * 1024  # one write to a client carries at most this much (a single larger frame goes alone)
SOCKET_SEND_BUFFER_BYTES = 256 * 1024  # the kernel's send buffer per stream (Linux autotunes it up to 4 MiB)
FLUSH_SECONDS = 0.005  # clients of a feed are woken at most this often: fewer, larger writes
MAX_SECONDS_JITTER = 0.1  # responses end between 90% and 100% of stream_max_seconds: reconnects spread out
SECRETS_CHECK_SECONDS = 1.0  # the known-secrets file is looked at (stat) at most this often
RETRY_AFTER_SECONDS = 5  # Retry-After of a 429 (too many streams from one address)
SHUTDOWN_POLL_SECONDS = 0.1

# Log levels a client may ask for with ?level=, and how a record's "level" ranks.
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
UNKNOWN_LEVEL = LEVELS["info"]
# Every event type the agent and the functions publish: the names in agent/contract.py.
EVENT_TYPES = tuple(value for name, value in vars(contract).items() if name.startswith("EV_"))


# --- redaction -----------------------------------------------------------------


class Redaction:
    """The stream's `Redactor`: secret formats always, plus the known values in `path`.

    The file is looked at no more than every SECRETS_CHECK_SECONDS and read
    again when its modification time, size or inode changed; `current()` then
    returns a new Redactor, which the feeds notice (they drop frames redacted
    with the old one). A missing or unreadable file means formats only.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path else None
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._redactor = Redactor()

    def current(self) -> Redactor:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= SECRETS_CHECK_SECONDS:
                self._checked = now
                self._reload_if_changed()
        return self._redactor

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._redactor = Redactor.from_secrets_dir(None, extra_file=self.path)
        if stamp is None:
            log.warning("known secrets file %s is missing: redacting secret formats only", self.path)
        else:
            log.info("known secrets file %s: %d values", self.path, self._redactor.known_count)


def redact_data(data: bytes, redactor: Redactor) -> tuple[bytes, object]:
    """(the published bytes with secrets removed, the parsed JSON body or None).

    JSON is redacted value by value (a secret written with JSON escapes is
    still found, and a cut private-key block cannot swallow the closing
    quote) and written again only when something was removed; anything else
    is redacted as text.
    """
    try:
        body = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        text = data.decode("utf-8", "surrogateescape")
        clean = redactor.redact(text)
        return (data if clean == text else clean.encode("utf-8", "surrogateescape")), None
    clean = redactor.redact_obj(body)
    if clean != body:
        return json.dumps(clean).encode(), clean
    return data, body


# --- SSE framing --------------------------------------------------------------


def is_terminal(event: object) -> bool:
    return (
        isinstance(event, dict)
        and event.get("type") == contract.EV_STATUS
        and event.get("state") in contract.TERMINAL_STATES
    )


def _event_name(event: object) -> str:
    name = event.get("type") if isinstance(event, dict) else None
    return name if isinstance(name, str) and name.isidentifier() else "event"


def _log_level(record: object) -> int:
    level = record.get("level") if isinstance(record, dict) else None
    return LEVELS.get(level.lower(), UNKNOWN_LEVEL) if isinstance(level, str) else UNKNOWN_LEVEL


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


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    """One task message, redacted and framed."""

    seq: int
    frame: bytes
    kind: str  # the SSE event name: "log" or the event's type
    level: int  # the log level of a record (UNKNOWN_LEVEL for events)
    terminal: bool
    pending: int  # messages of the consumer still to come after this one


def encode(msg, logs_subject: str, redactor: Redactor) -> Encoded:
    metadata = msg.metadata
    seq = metadata.sequence.stream
    data, body = redact_data(msg.data, redactor)
    if msg.subject == logs_subject:
        return Encoded(seq, frame(seq, b"log", data), LOG_EVENT, _log_level(body), False, metadata.num_pending)
    kind = _event_name(body)
    return Encoded(seq, frame(seq, kind.encode(), data), kind, UNKNOWN_LEVEL, is_terminal(body), metadata.num_pending)


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a client asked to be sent (`?types=`, `?level=`); everything by default."""

    logs: bool = True
    events: frozenset[str] | None = None  # None: every event type
    min_level: int = 0

    @property
    def everything(self) -> bool:
        return self.logs and self.events is None and self.min_level == 0

    def passes(self, kind: str, level: int) -> bool:
        if kind == LOG_EVENT:
            return self.logs and level >= self.min_level
        return self.events is None or kind in self.events

    @classmethod
    def from_query(cls, types: str | None, level: str | None) -> "Filter":
        logs, events = True, None
        if types is not None:
            names = {name.strip() for name in types.split(",") if name.strip()}
            unknown = sorted(names - {"logs", "events", *EVENT_TYPES})
            if not names or unknown:
                raise BadInput(
                    f"types: {', '.join(map(repr, unknown)) or 'empty'} unknown; use a comma list of "
                    f"'events', 'logs' or event types ({', '.join(EVENT_TYPES)})",
                    "types",
                )
            logs = "logs" in names
            events = None if "events" in names else frozenset(names - {"logs"})
        min_level = 0
        if level is not None:
            if level.lower() not in LEVELS:
                raise BadInput(f"level must be one of {', '.join(LEVELS)} (the least severe log level sent)", "level")
            min_level = LEVELS[level.lower()]
        return cls(logs, events, min_level)


EVERYTHING = Filter()


# --- the trace of one task ----------------------------------------------------


async def last_message(js, subject: str):
    """The newest message on `subject` in the stream, or None."""
    from nats.js.errors import NotFoundError

    try:
        return await js.get_last_msg(contract.STREAM_NAME, subject)
    except NotFoundError:
        return None


async def _first_task_message_from(js, task_id: str, seq: int) -> int | None:
    """The sequence of the task's first message at or after `seq`, or None."""
    from nats.js.errors import NotFoundError

    try:
        # "*.agent.<id>" matches exactly the task's logs and events subjects in this stream.
        return (await js.get_msg(contract.STREAM_NAME, seq=seq, subject=f"*.agent.{task_id}", next=True)).seq
    except NotFoundError:
        return None


async def _subscribe(js, task_id: str, start: int):
    """An ordered consumer of the task's two subjects from stream sequence `start`."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    events_subject = contract.subject_events(task_id)
    config = ConsumerConfig(
        filter_subjects=[events_subject, contract.subject_logs(task_id)],
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        inactive_threshold=CONSUMER_INACTIVE_SECONDS,
    )
    sub = await js.subscribe(
        events_subject,
        stream=contract.STREAM_NAME,
        config=config,
        ordered_consumer=True,
        idle_heartbeat=CONSUMER_IDLE_HEARTBEAT_SECONDS,
    )
    # nats-py recreates an ordered consumer after the last sequence it saw, 0 before any
    # message; start it at ours instead of replaying the task (duplicates are dropped anyway).
    jsi = getattr(sub._sub, "_jsi", None)
    if jsi is not None and jsi._sseq == 0:
        jsi._sseq = start - 1
    return sub


async def _release(js, sub) -> None:
    """Unsubscribe and delete the consumer; never raises (the server reaps leftovers)."""
    with anyio.move_on_after(2.0, shield=True):  # also runs in a cancelled scope, on disconnect
        consumer = sub._consumer  # nats-py keeps the current name here when it recreates the consumer
        try:
            await sub.unsubscribe()
        except Exception as exc:
            log.debug("unsubscribe from consumer %s: %s", consumer, exc)
        try:
            await js.delete_consumer(contract.STREAM_NAME, consumer)
        except Exception as exc:  # gone already, or NATS away
            log.debug("delete consumer %s: %s", consumer, exc)


async def _batches(sub):
    """Lists of messages: the next one, plus those already waiting (at most MAX_BATCH)."""
    while True:
        batch = [await sub.next_msg(timeout=None)]
        while sub.pending_msgs and len(batch) < MAX_BATCH:
            batch.append(await sub.next_msg(timeout=None))
        yield batch


class Feed:
    """The live tail of one task, read and redacted once, shared by every client following it.

    Holds the frames of the task's messages with a sequence above `floor`, in
    order (at most MAX_FEED_FRAMES and MAX_FEED_BYTES; trimming the oldest
    raises `floor`). `starts[i]` counts the bytes of every frame before frame
    i since the feed opened, so how far a client is behind is one subtraction.
    Clients are woken at most every FLUSH_SECONDS, so each write carries every
    frame that arrived.
    """

    def __init__(self, js, task_id: str, redaction: Redaction):
        self.js = js
        self.task_id = task_id
        self.redaction = redaction
        self.floor = 0
        self.last = 0
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.kinds: list[str] = []
        self.levels: list[int] = []
        self.starts: list[int] = []
        self.total = 0  # bytes of every frame appended since the feed opened
        self.terminal: int | None = None
        self.failed = False
        self.clients = 0
        self.changed = asyncio.Event()
        self._redactor: Redactor | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._sub = None
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        # Starting after the stream's last message makes `floor` exact: every later
        # message of the task reaches this feed.
        self.floor = self.last = (await self.js.stream_info(contract.STREAM_NAME)).state.last_seq
        self._sub = await _subscribe(self.js, self.task_id, self.floor + 1)
        self._reader = asyncio.create_task(self._read(), name=f"feed-{self.task_id}")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._flush is not None:
            self._flush.cancel()
        if self._sub is not None:
            await _release(self.js, self._sub)

    def join_point(self, buffer_bytes: int) -> int:
        """The lowest position a client may read the feed from: above `floor`, within `buffer_bytes` of the newest."""
        j = bisect_left(self.starts, self.total - buffer_bytes)
        return self.floor if j == 0 else self.seqs[j - 1]

    def take(self, position: int, only: Filter) -> tuple[bytes, int, bool]:
        """(frames to send, the new position, whether the terminal event is among them), at most ~MAX_WRITE_BYTES.

        Filtered-out messages advance the position too; the result may be empty.
        """
        seqs, terminal = self.seqs, self.terminal
        i = bisect_right(seqs, position)
        if i == len(seqs):
            return b"", position, False
        k = max(i + 1, bisect_left(self.starts, self.starts[i] + MAX_WRITE_BYTES))
        k = min(k, len(seqs))
        ends = terminal is not None and position < terminal <= seqs[k - 1]
        if ends:
            k = bisect_right(seqs, terminal, i, k)
        if only.everything:
            chunk = b"".join(self.frames[i:k])
        else:
            kinds, levels, frames = self.kinds, self.levels, self.frames
            chunk = b"".join(frames[j] for j in range(i, k) if only.passes(kinds[j], levels[j]))
        return chunk, seqs[k - 1], ends

    def _forget(self, cut: int) -> None:
        self.floor = self.seqs[cut - 1]
        del self.seqs[:cut], self.frames[:cut], self.kinds[:cut], self.levels[:cut], self.starts[:cut]

    async def _read(self) -> None:
        logs_subject = contract.subject_logs(self.task_id)
        try:
            async for batch in _batches(self._sub):
                redactor = self.redaction.current()
                if redactor is not self._redactor:
                    if self._redactor is not None and self.seqs:
                        self._forget(len(self.seqs))  # redacted with the old secrets: clients below re-read NATS
                    self._redactor = redactor
                for msg in batch:
                    m = encode(msg, logs_subject, redactor)
                    if m.seq <= self.last:
                        continue  # replayed by a recreated consumer
                    self.last = m.seq
                    self.seqs.append(m.seq)
                    self.frames.append(m.frame)
                    self.kinds.append(m.kind)
                    self.levels.append(m.level)
                    self.starts.append(self.total)
                    self.total += len(m.frame)
                    if m.terminal and self.terminal is None:
                        self.terminal = m.seq
                self._trim()
                if self._flush is None:
                    self._flush = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._wake)
        except Exception as exc:  # the connection is closed: clients end, and resume elsewhere
            log.warning("feed of task %s stopped: %s", self.task_id, exc or type(exc).__name__)
            self.failed = True
            self._wake()

    def _trim(self) -> None:
        cut = 0
        if len(self.seqs) > MAX_FEED_FRAMES:
            cut = len(self.seqs) // 2
        if self.seqs and self.total - self.starts[0] > MAX_FEED_BYTES:
            cut = max(cut, bisect_left(self.starts, self.total - MAX_FEED_BYTES // 2))
        if cut:
            self._forget(min(cut, len(self.seqs)))

    def _wake(self) -> None:
        self._flush = None
        self.changed.set()
        self.changed = asyncio.Event()


class Feeds:
    """The feeds of this app, one per task followed by at least one client."""

    def __init__(self, redaction: Redaction):
        self.redaction = redaction
        self._feeds: dict[str, Feed] = {}
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def follow(self, js, task_id: str):
        async with self._lock:
            feed = self._feeds.get(task_id)
            if feed is None or feed.failed:
                feed = Feed(js, task_id, self.redaction)
                await feed.open()
                self._feeds[task_id] = feed
            feed.clients += 1
        try:
            yield feed
        finally:
            feed.clients -= 1
            if feed.clients == 0:
                if self._feeds.get(task_id) is feed:
                    del self._feeds[task_id]
                with anyio.move_on_after(3.0, shield=True):  # runs in a cancelled scope on disconnect
                    await feed.close()


async def _catch_up(js, task_id: str, position: int, feed: Feed, only: Filter, buffer_bytes: int):
    """Yield (chunk, position, ended) from a consumer of the client's own until it may join the feed.

    `position` means: every task message at or below it has been sent (or filtered out).
    """
    logs_subject = contract.subject_logs(task_id)
    while position < (target := feed.join_point(buffer_bytes)):
        first = await _first_task_message_from(js, task_id, position + 1)
        if first is None or first > target:
            yield b"", target, False  # no message of the task in (position, target]
            return
        sub = await _subscribe(js, task_id, position + 1)
        try:
            async for batch in _batches(sub):
                redactor = feed.redaction.current()
                chunk: list[bytes] = []
                size = pending = 0
                for msg in batch:
                    m = encode(msg, logs_subject, redactor)
                    pending = m.pending
                    if m.seq <= position:
                        continue
                    position = m.seq
                    if only.passes(m.kind, m.level):
                        chunk.append(m.frame)
                        size += len(m.frame)
                    if m.terminal:
                        chunk.append(end_frame(task_id, m.seq))
                        yield b"".join(chunk), position, True
                        return
                    if size >= MAX_WRITE_BYTES:
                        yield b"".join(chunk), position, False
                        chunk, size = [], 0
                if chunk:
                    yield b"".join(chunk), position, False
                if position >= feed.join_point(buffer_bytes) or pending == 0:
                    break  # may join the feed, or at the stream's end: check again
        finally:
            await _release(js, sub)


async def trace(
    js,
    feeds: Feeds,
    task_id: str,
    after: int | None,
    *,
    finished_at: int | None = None,
    only: Filter = EVERYTHING,
    buffer_bytes: int = Settings.default("stream_client_buffer_bytes"),
) -> AsyncIterator[bytes]:
    """Yield SSE bytes for the task's messages after sequence `after`, through the terminal event.

    `finished_at` is the sequence of a terminal status event known when the
    request came in: a client resuming at or after it gets `end` at once.
    A client is live once it has had everything the feed holds; a live client
    found more than `buffer_bytes` behind is cut (a comment says so) and
    resumes with its Last-Event-ID.
    """
    if finished_at is not None and after is not None and after >= finished_at:
        yield end_frame(task_id, finished_at)
        return
    position = after or 0
    live = False
    try:
        async with feeds.follow(js, task_id) as feed:
            while True:
                changed = feed.changed
                if position < feed.join_point(buffer_bytes):
                    if live:  # overflow: the client resumes and catches up on a consumer of its own
                        log.info("a client of task %s fell behind the live tail at %d: its response ends", task_id, position)
                        yield comment("fell behind the live tail: resume with Last-Event-ID")
                        return
                    async with aclosing(_catch_up(js, task_id, position, feed, only, buffer_bytes)) as chunks:
                        async for chunk, position, ended in chunks:
                            if chunk:
                                yield chunk
                            if ended:
                                return
                    continue
                chunk, position, ended = feed.take(position, only)
                if ended:
                    yield chunk + end_frame(task_id, position)
                    return
                if chunk:
                    yield chunk
                elif position >= feed.last:
                    if feed.failed:
                        return  # the client reconnects and resumes from its Last-Event-ID
                    live = True
                    await changed.wait()
    except Exception as exc:  # NATS trouble after the response started: end it, the client resumes
        log.warning("stream of task %s ended after %d: %s", task_id, position, exc or type(exc).__name__)


# --- the response -------------------------------------------------------------

TRANSPORT_KEY = "dockyard.transport"  # scope key: the connection's asyncio transport, when the server is uvicorn


class _Stalled(Exception):
    """The client's socket took no bytes for the send timeout."""


class EventStream:
    """An ASGI response: the bytes of `chunks` as an SSE stream, heartbeats when idle.

    It ends cleanly, at a frame boundary, when `chunks` ends, after
    `max_seconds`, or when `closing` is set (server shutdown); the client
    resumes with Last-Event-ID. A send that does not complete within
    `send_timeout` means a stalled client: the connection is aborted (when the
    transport is known, see `StreamApp`) instead of waiting for a peer that
    never reads to take the bytes already queued for it.
    """

    headers = [
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

        _bound_socket_buffer(scope.get(TRANSPORT_KEY))
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
            transport = scope.get(TRANSPORT_KEY)
            client = scope.get("client")
            log.info("client %s took no bytes for %gs: dropped", client[0] if client else "?", self.send_timeout)
            if transport is not None:
                _reset(transport)
                await anyio.sleep(0)  # let the server see the connection lost before this returns


def _bound_socket_buffer(transport) -> None:
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


def _reset(transport) -> None:
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


class StreamApp(Starlette):
    """The stream app; notes uvicorn's transport of each request in its scope (`TRANSPORT_KEY`).

    ASGI offers no way to abort a connection, and a graceful close waits for
    the peer to read what is queued: with a stalled peer, forever. uvicorn's
    `send` is a bound method of the request cycle, which holds the transport.
    Mounted inside another app (the dev stack) the transport is not found and a
    stalled client's socket closes when its peer reads or the kernel gives up.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and TRANSPORT_KEY not in scope:
            scope[TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await super().__call__(scope, receive, send)


def _uvicorn_server():
    """The uvicorn Server running this process, found through its SIGTERM handler (main thread only), or None."""
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return server if hasattr(server, "should_exit") else None


async def _watch_shutdown(closing: asyncio.Event) -> None:
    """Set `closing` as soon as uvicorn starts shutting down.

    uvicorn runs the lifespan shutdown only after every open response ended
    (or after --timeout-graceful-shutdown, by cancelling them mid-frame), so an
    SSE stream must learn of the shutdown from the server itself.
    """
    server = _uvicorn_server() if threading.current_thread() is threading.main_thread() else None
    if server is None:
        return
    while not server.should_exit:
        await asyncio.sleep(SHUTDOWN_POLL_SECONDS)
    closing.set()


# --- HTTP ---------------------------------------------------------------------


class TooManyStreams(BadInput):
    """More concurrent streams from one address than `stream_max_per_ip`: 429, retry later."""

    status = 429
    retry_after = RETRY_AFTER_SECONDS


def _task_id(request: Request) -> str:
    task_id = request.path_params["task_id"]
    if not contract.is_valid_task_id(task_id):
        raise BadInput(
            f"task id must be 1-{contract.TASK_ID_MAX} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            "task_id",
        )
    return task_id


def _resume_after(request: Request) -> int | None:
    """Last-Event-ID wins over ?after=: a browser reconnects to the first URL, with the header."""
    for field, value in (
        ("Last-Event-ID", request.headers.get("last-event-id")),
        ("after", request.query_params.get("after")),
    ):
        if value:
            if not value.isdigit():
                raise BadInput(f"{field} must be a stream sequence number (a non-negative integer)", field)
            return int(value)
    return None


def _answered(endpoint):
    """Errors become answers by the one rule, functions.errors.answer_for."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            status, body = answer_for(exc)
            response = JSONResponse(body, status)
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                response.headers["Retry-After"] = str(retry_after)
            return response

    return wrapped


def create_app(
    settings: Settings | None = None,
    *,
    nats_url: str | None = None,
    run_tracker: bool = False,
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
) -> Starlette:
    """The stream app. `run_tracker=True` runs the registry tracker in its lifespan (one per deployment)."""
    settings = settings or Settings.from_env()
    if nats_url:
        settings = settings.model_copy(update={"nats_url": nats_url})
    redaction = Redaction(settings.known_secrets_file or None)
    feeds = Feeds(redaction)
    closing = asyncio.Event()  # set when the server shuts down: open streams end
    streams_per_ip: Counter[str] = Counter()

    def open_slot(request: Request) -> Callable[[], None]:
        """Count a stream of the request's address, or refuse it (429); returns the release."""
        address = request.client.host if request.client else "unknown"
        cap = settings.stream_max_per_ip
        if cap and streams_per_ip[address] >= cap:
            raise TooManyStreams(f"{address} has {cap} streams open already, the most allowed; close one or retry later", "client")
        streams_per_ip[address] += 1

        def release() -> None:
            streams_per_ip[address] -= 1
            if streams_per_ip[address] <= 0:
                del streams_per_ip[address]

        return release

    @_answered
    async def stream(request: Request) -> Response:
        task_id = _task_id(request)
        after = _resume_after(request)
        only = Filter.from_query(request.query_params.get("types"), request.query_params.get("level"))
        release = open_slot(request)
        try:
            connection = await bus.connect(settings)
            last_event = await last_message(connection.js, contract.subject_events(task_id))
            if last_event is None and await last_message(connection.js, contract.subject_logs(task_id)) is None:
                if await connection.registry.get(task_id) is None:
                    raise BadInput(f"no task {task_id!r}: nothing was published for it and it is not registered", "task_id", 404)
        except BaseException:
            release()
            raise
        finished_at = None
        if last_event is not None:
            try:
                finished_at = last_event.seq if is_terminal(json.loads(last_event.data or b"")) else None
            except ValueError:
                pass
        chunks = trace(
            connection.js, feeds, task_id, after,
            finished_at=finished_at, only=only, buffer_bytes=settings.stream_client_buffer_bytes,
        )  # fmt: skip
        return EventStream(
            chunks,
            heartbeat=heartbeat_seconds,
            send_timeout=settings.stream_send_timeout_seconds,
            max_seconds=settings.stream_max_seconds,
            closing=closing,
            on_close=release,
        )

    @_answered
    async def list_tasks(request: Request) -> Response:
        records = await (await bus.connect(settings)).registry.list()
        records.sort(key=lambda r: (r.get("created_at") or "", r.get("task_id") or ""), reverse=True)
        return JSONResponse(redaction.current().redact_obj(records))

    @_answered
    async def get_task(request: Request) -> Response:
        task_id = _task_id(request)
        record = await (await bus.connect(settings)).registry.get(task_id)
        if record is None:
            raise BadInput(f"no task {task_id!r}", "task_id", 404)
        return JSONResponse(redaction.current().redact_obj(record))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        closing.clear()  # an app served again after a shutdown (tests restart it) streams again
        watcher = asyncio.create_task(_watch_shutdown(closing))
        tracker = asyncio.create_task(_run_tracker(settings)) if run_tracker else None
        try:
            yield
        finally:
            closing.set()
            watcher.cancel()
            if tracker is not None:
                tracker.cancel()
            await asyncio.gather(watcher, *([tracker] if tracker else []), return_exceptions=True)
            await bus.disconnect()

    middleware = []
    if settings.cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "HEAD"],
                allow_headers=["Last-Event-ID", "Cache-Control"],  # EventSource sends Last-Event-ID when it reconnects
                expose_headers=["Retry-After"],
                max_age=600,
            )
        )
    return StreamApp(
        routes=[
            Route("/api/stream/{task_id}", stream),
            Route("/api/tasks", list_tasks),
            Route("/api/tasks/{task_id}", get_task),
            Route("/healthz", healthz),
            *cockpit.routes(settings),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )


async def _run_tracker(settings: Settings) -> None:
    """Connect (waiting for NATS as long as it takes), then track until cancelled."""
    from functions.core.tracker import Tracker

    delay = 0.5
    while True:
        try:
            connection = await bus.connect(settings)
            break
        except Unavailable as exc:
            log.warning("tracker waits for NATS: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    await Tracker(connection.js, connection.registry).run()


# --- serving ------------------------------------------------------------------

GC_THRESHOLDS = (50_000, 20, 100)  # young collections every 50,000 allocations instead of 700


def quiet_gc() -> None:
    """Keep the garbage collector from pausing every stream at once; once per process, after imports.

    With 200 clients a full collection walks tens of thousands of connection
    objects and stops the event loop for 30-60 ms, the whole p99 of a fan-out
    (bench/bench_fanout.py). Freezing what start-up made (modules, the app)
    takes it out of every collection, and rarer young collections promote
    fewer short-lived objects into the old generation.
    """
    import gc

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    """`python -m functions.stream`: serve the stream app as deployed, with the tracker."""
    import argparse
    import sys

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m functions.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")), help="default: $PORT or 8080")
    parser.add_argument("--no-tracker", action="store_true", help="do not run the registry tracker (one per deployment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = Settings.from_env()
    print(settings.describe(), file=sys.stderr, flush=True)
    app = create_app(settings, run_tracker=not args.no_tracker)
    quiet_gc()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
