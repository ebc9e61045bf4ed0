"""The live trace of a task over Server-Sent Events, and the task listings.

Invariants:
- An SSE `id:` is the sequence of the message in the JetStream stream AGENT. A
  client that resumes with `Last-Event-ID` (or `?after=SEQ`) gets every later
  message of the task exactly once and in stream order. Its stream keeps a
  position (every task message at or below it has been sent) and only ever
  sends messages above it, so a replay (an ordered consumer recreates itself
  after a NATS restart) is dropped and nothing is skipped.
- After the terminal status event the server sends `event: end` and closes; a
  client resuming at or after the terminal event gets `end` at once.
- A task followed by any client has one `Feed`: one consumer reading the live
  tail, shared by all its clients. A client whose position is below what the
  feed holds catches up with a consumer of its own first. Every consumer is
  ephemeral and deleted when its last reader leaves (the server reaps one left
  behind after `CONSUMER_INACTIVE_SECONDS`).
- NATS going away mid-stream: the response stays open (heartbeats go on) and
  the consumers recreate themselves once it is back. Any error after the
  response started ends it instead; the client resumes with `Last-Event-ID`.

The app shares the process's NATS connection (`functions.bus`), opened on first
use. Mounted inside another Starlette app its lifespan does not run by itself:
the parent enters `app.router.lifespan_context(app)` to run the tracker.
nats-py and sse-starlette are imported on first use: cold start is measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from bisect import bisect_right
from contextlib import aclosing, asynccontextmanager

import anyio  # starlette's own dependency: costs nothing at import
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import contract
from functions import bus, cockpit
from functions.settings import Settings
from functions.task import BadInput

log = logging.getLogger(__name__)

LOG_EVENT = b"log"  # SSE event name of records from logs.agent.<id>
END_EVENT = "end"  # SSE event name sent after the terminal status event
DEFAULT_HEARTBEAT_SECONDS = 15.0  # an SSE comment at least this often keeps proxies from closing the stream
CONSUMER_INACTIVE_SECONDS = 30.0
CONSUMER_IDLE_HEARTBEAT_SECONDS = 2.0  # a consumer silent for twice this is recreated (after a NATS restart)
MAX_BATCH = 512  # messages taken from a consumer at once
MAX_FEED_FRAMES = 10_000  # recent frames a task's feed keeps for clients that lag behind
FLUSH_SECONDS = 0.005  # clients of a feed are woken at most this often: fewer, larger writes
SEND_TIMEOUT_SECONDS = 60.0  # a client that takes no bytes for this long is dropped (it can resume)


# --- SSE framing --------------------------------------------------------------


def is_terminal(event: object) -> bool:
    return (
        isinstance(event, dict)
        and event.get("type") == contract.EV_STATUS
        and event.get("state") in contract.TERMINAL_STATES
    )


def _event_name(event: object) -> bytes:
    name = event.get("type") if isinstance(event, dict) else None
    return name.encode() if isinstance(name, str) and name.isidentifier() else b"event"


def frame(seq: int, event: bytes, data: bytes) -> bytes:
    """One SSE message: data as published, split into `data:` lines if it has line breaks."""
    if b"\n" in data or b"\r" in data:
        data = b"\ndata: ".join(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event, data)


def end_frame(task_id: str, seq: int) -> bytes:
    """No `id:`: a client that reconnects still resumes after the terminal event itself."""
    body = json.dumps({"task_id": task_id, "last_id": seq}, separators=(",", ":"))
    return f"event: {END_EVENT}\ndata: {body}\n\n".encode()


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


def _encode(msg, logs_subject: str) -> tuple[int, bytes, bool, int]:
    """(stream sequence, SSE frame, is terminal, messages pending after it) of one message."""
    metadata = msg.metadata
    seq = metadata.sequence.stream
    if msg.subject == logs_subject:
        return seq, frame(seq, LOG_EVENT, msg.data), False, metadata.num_pending
    try:
        event = json.loads(msg.data)
    except ValueError:
        event = None
    return seq, frame(seq, _event_name(event), msg.data), is_terminal(event), metadata.num_pending


class Feed:
    """The live tail of one task, read once and shared by every client following it.

    Holds the frame of every task message with a sequence above `floor`, in
    order; trimming the oldest raises `floor`. A client whose position is below
    `floor` catches up with a consumer of its own first. Clients are woken at
    most every FLUSH_SECONDS, so each write carries every frame that arrived.
    """

    def __init__(self, js, task_id: str):
        self.js = js
        self.task_id = task_id
        self.floor = 0
        self.last = 0
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.terminal: int | None = None
        self.failed = False
        self.clients = 0
        self.changed = asyncio.Event()
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

    def after(self, position: int) -> tuple[list[int], list[bytes]] | None:
        """Sequences and frames above `position`; None if frames above it were trimmed already."""
        if position < self.floor:
            return None
        i = bisect_right(self.seqs, position)
        return self.seqs[i:], self.frames[i:]

    async def _read(self) -> None:
        logs_subject = contract.subject_logs(self.task_id)
        try:
            async for batch in _batches(self._sub):
                for msg in batch:
                    seq, data, terminal, _ = _encode(msg, logs_subject)
                    if seq <= self.last:
                        continue  # replayed by a recreated consumer
                    self.last = seq
                    self.seqs.append(seq)
                    self.frames.append(data)
                    if terminal and self.terminal is None:
                        self.terminal = seq
                if len(self.seqs) > MAX_FEED_FRAMES:
                    cut = len(self.seqs) // 2
                    self.floor = self.seqs[cut - 1]
                    del self.seqs[:cut], self.frames[:cut]
                if self._flush is None:
                    self._flush = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._wake)
        except Exception as exc:  # the connection is closed: clients end, and resume elsewhere
            log.warning("feed of task %s stopped: %s", self.task_id, exc or type(exc).__name__)
            self.failed = True
            self._wake()

    def _wake(self) -> None:
        self._flush = None
        self.changed.set()
        self.changed = asyncio.Event()


class Feeds:
    """The feeds of this app, one per task followed by at least one client."""

    def __init__(self):
        self._feeds: dict[str, Feed] = {}
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def follow(self, js, task_id: str):
        async with self._lock:
            feed = self._feeds.get(task_id)
            if feed is None or feed.failed:
                feed = Feed(js, task_id)
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


async def _catch_up(js, task_id: str, position: int, feed: Feed):
    """Yield (chunk, position, ended) from a consumer of the client's own until position >= feed.floor.

    `position` means: every task message at or below it has been sent.
    """
    logs_subject = contract.subject_logs(task_id)
    while position < feed.floor:
        floor = feed.floor
        first = await _first_task_message_from(js, task_id, position + 1)
        if first is None or first > floor:
            yield b"", floor, False  # no message of the task in (position, floor]
            return
        sub = await _subscribe(js, task_id, position + 1)
        try:
            async for batch in _batches(sub):
                chunk: list[bytes] = []
                pending = 0
                for msg in batch:
                    seq, data, terminal, pending = _encode(msg, logs_subject)
                    if seq <= position:
                        continue
                    position = seq
                    chunk.append(data)
                    if terminal:
                        chunk.append(end_frame(task_id, seq))
                        yield b"".join(chunk), position, True
                        return
                if chunk:
                    yield b"".join(chunk), position, False
                if position >= feed.floor or pending == 0:
                    break  # joined the feed, or at the stream's end: check again
        finally:
            await _release(js, sub)


async def trace(js, feeds: Feeds, task_id: str, after: int | None, *, finished_at: int | None = None):
    """Yield SSE bytes for the task's messages after sequence `after`, through the terminal event.

    `finished_at` is the sequence of a terminal status event known when the
    request came in: a client resuming at or after it gets `end` at once.
    """
    if finished_at is not None and after is not None and after >= finished_at:
        yield end_frame(task_id, finished_at)
        return
    position = after or 0
    try:
        async with feeds.follow(js, task_id) as feed:
            while True:
                changed = feed.changed
                got = feed.after(position)
                if got is None:
                    async with aclosing(_catch_up(js, task_id, position, feed)) as chunks:
                        async for chunk, position, ended in chunks:
                            if chunk:
                                yield chunk
                            if ended:
                                return
                    continue
                seqs, frames = got
                if seqs:
                    terminal = feed.terminal
                    if terminal is not None and position < terminal <= seqs[-1]:
                        yield b"".join(frames[: bisect_right(seqs, terminal)]) + end_frame(task_id, terminal)
                        return
                    position = seqs[-1]
                    yield b"".join(frames)
                elif feed.failed:
                    return  # the client reconnects and resumes from its Last-Event-ID
                else:
                    await changed.wait()
    except Exception as exc:  # NATS trouble after the response started: end it, the client resumes
        log.warning("stream of task %s ended after %d: %s", task_id, position, exc or type(exc).__name__)


# --- HTTP ---------------------------------------------------------------------


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
    """Errors become answers in one place: functions.http.answer_for (imported only on error)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            from functions.http import answer_for, json_answer

            return json_answer(answer_for(exc))

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
        settings = dataclasses.replace(settings, nats_url=nats_url)
    feeds = Feeds()

    @_answered
    async def stream(request: Request) -> Response:
        task_id = _task_id(request)
        after = _resume_after(request)
        connection = await bus.connect(settings)
        last_event = await last_message(connection.js, contract.subject_events(task_id))
        if last_event is None and await last_message(connection.js, contract.subject_logs(task_id)) is None:
            if await connection.registry.get(task_id) is None:
                raise BadInput(f"no task {task_id!r}: nothing was published for it and it is not registered", "task_id", 404)
        finished_at = None
        if last_event is not None:
            try:
                finished_at = last_event.seq if is_terminal(json.loads(last_event.data or b"")) else None
            except ValueError:
                pass

        from sse_starlette import EventSourceResponse

        return EventSourceResponse(
            trace(connection.js, feeds, task_id, after, finished_at=finished_at),
            ping=heartbeat_seconds,
            sep="\n",
            send_timeout=SEND_TIMEOUT_SECONDS,
        )

    @_answered
    async def list_tasks(request: Request) -> Response:
        records = await (await bus.connect(settings)).registry.list()
        records.sort(key=lambda r: (r.get("created_at") or "", r.get("task_id") or ""), reverse=True)
        return JSONResponse(records)

    @_answered
    async def get_task(request: Request) -> Response:
        task_id = _task_id(request)
        record = await (await bus.connect(settings)).registry.get(task_id)
        if record is None:
            raise BadInput(f"no task {task_id!r}", "task_id", 404)
        return JSONResponse(record)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        tracker = asyncio.create_task(_run_tracker(settings)) if run_tracker else None
        try:
            yield
        finally:
            if tracker is not None:
                tracker.cancel()
                await asyncio.gather(tracker, return_exceptions=True)
            await bus.disconnect()

    return Starlette(
        routes=[
            Route("/api/stream/{task_id}", stream),
            Route("/api/tasks", list_tasks),
            Route("/api/tasks/{task_id}", get_task),
            Route("/healthz", healthz),
            *cockpit.routes(settings),
        ],
        lifespan=lifespan,
    )


async def _run_tracker(settings: Settings) -> None:
    """Connect (waiting for NATS as long as it takes), then track until cancelled."""
    from functions.tracker import Tracker

    delay = 0.5
    while True:
        try:
            connection = await bus.connect(settings)
            break
        except bus.Unavailable as exc:
            log.warning("tracker waits for NATS: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    await Tracker(connection.js, connection.registry).run()
