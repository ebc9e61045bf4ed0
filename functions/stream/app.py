"""The stream app: a task's live trace over Server-Sent Events, the task listings, and the cockpit.

    GET /api/stream/{task_id}   the trace (functions/stream/trace.py), as SSE (functions/stream/sse.py)
    GET /api/tasks[/{task_id}]  task records, newest first, redacted
    GET /api/tasks/{task_id}/…  a task's stored files, streamed from the object store (functions/stream/downloads.py)
    GET /healthz                liveness
    POST /api/session           trade a token for an HttpOnly cookie (functions/stream/auth.py)
    /cockpit-config.json, /     the cockpit (functions/stream/cockpit/)

Invariants (docs/stream.md explains the choices):
- Every route but /healthz and the cockpit's page and assets needs an API token
  (functions/stream/auth.py): read for GET, write for POST; 401/403 JSON otherwise.
- Every error becomes an answer by the one rule, `functions.errors.answer_for`,
  in one exception handler; a 429 (the per-address cap) carries Retry-After.
- Nothing leaves unredacted: trace messages are redacted where they are read
  from NATS, task records here (functions/stream/redaction.py).
- Every response ends cleanly when the server shuts down: a shutdown signal
  (functions/stream/serving.py) or the lifespan's exit sets `closing`.
- The app shares the process's NATS connection (`functions.core.bus`), opened
  on first use; nats-py and uvicorn are not imported with this module (cold
  start is measured). Mounted inside another Starlette app its lifespan does
  not run by itself: the parent enters `app.router.lifespan_context(app)` to
  run the tracker and to end open streams on shutdown.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import contract
from functions.core import bus
from functions.core.settings import Settings
from functions.errors import BadInput, DockyardError, answer_for
from functions.stream import cockpit, downloads, serving
from functions.stream.auth import TokenAuth, Tokens, client_address
from functions.stream.consumers import is_terminal, last_message
from functions.stream.feed import Feeds
from functions.stream.filters import Filter
from functions.stream.internals import TRANSPORT_KEY, transport_of
from functions.stream.limits import AddressCap
from functions.stream.redaction import Redaction
from functions.stream.sse import DEFAULT_HEARTBEAT_SECONDS, EventStream
from functions.stream.trace import trace


class StreamApp(Starlette):
    """The stream app. Notes the connection's transport in each request's scope, and ends open streams on demand.

    The transport (functions/stream/internals.py) is taken here, before any
    middleware wraps `send`: a stalled client's connection is aborted with it.
    `feeds` (the shared feeds) and `cap` (streams per address) are its state.
    """

    def __init__(self, *, feeds: Feeds, cap: AddressCap, closing: asyncio.Event, **kwargs):
        super().__init__(**kwargs)
        self.feeds = feeds
        self.cap = cap
        self.closing = closing

    def end_streams(self) -> None:
        """End every open stream cleanly, now and until the lifespan starts again (what a shutdown signal does)."""
        self.closing.set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and TRANSPORT_KEY not in scope:
            scope[TRANSPORT_KEY] = transport_of(send)
        await super().__call__(scope, receive, send)


async def answer(request: Request, exc: Exception) -> Response:
    """The exception handler of the app: `answer_for`'s status and body, plus Retry-After when the error has one."""
    status, body = answer_for(exc)
    response = JSONResponse(body, status)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


# DockyardError and the transient built-ins are answered in Starlette's ExceptionMiddleware;
# anything else (a bug) in ServerErrorMiddleware, which answers the same way and re-raises it
# for the server to log.
EXCEPTION_HANDLERS = {DockyardError: answer, TimeoutError: answer, ConnectionError: answer, Exception: answer}


def task_id_of(request: Request) -> str:
    task_id = request.path_params["task_id"]
    if not contract.is_valid_task_id(task_id):
        raise BadInput(
            f"task id must be 1-{contract.TASK_ID_MAX} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            "task_id",
        )
    return task_id


def resume_after(request: Request) -> int | None:
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


async def last_event_of(connection, task_id: str):
    """The task's last status event, or None; a 404 if nothing was published for the task and it is not registered.

    An unknown task gets an answer at once, not a stream that waits for nothing.
    """
    last_event = await last_message(connection.js, contract.subject_events(task_id))
    if (
        last_event is None
        and await last_message(connection.js, contract.subject_logs(task_id)) is None
        and await connection.registry.get(task_id) is None
    ):
        raise BadInput(f"no task {task_id!r}: nothing was published for it and it is not registered", "task_id", 404)
    return last_event


def terminal_seq(last_event) -> int | None:
    """The sequence of the task's last status event if it is terminal: a client resuming at or after it gets `end` at once."""
    if last_event is None:
        return None
    try:
        return last_event.seq if is_terminal(json.loads(last_event.data or b"")) else None
    except ValueError:
        return None


def cors_middleware(settings: Settings) -> list:
    """CORS for `cors_origins` (none by default: same origin only); EventSource resumes with Last-Event-ID."""
    if not settings.cors_origins:
        return []
    from starlette.middleware.cors import CORSMiddleware

    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD"],
            allow_headers=["Last-Event-ID", "Cache-Control"],  # EventSource sends Last-Event-ID when it reconnects
            expose_headers=["Retry-After"],
            max_age=600,
        )
    ]


def create_app(
    settings: Settings | None = None,
    *,
    nats_url: str | None = None,
    run_tracker: bool = False,
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
) -> StreamApp:
    """The stream app. `run_tracker=True` runs the registry tracker in its lifespan (one per deployment)."""
    settings = settings or Settings.from_env()
    if nats_url:
        settings = settings.model_copy(update={"nats_url": nats_url})
    redaction = Redaction(settings.known_secrets_file or None)
    feeds = Feeds(redaction)
    closing = asyncio.Event()  # set when the server shuts down: open streams end
    cap = AddressCap(settings.stream_max_per_ip)

    async def stream(request: Request) -> Response:
        task_id = task_id_of(request)
        after = resume_after(request)
        only = Filter.from_query(request.query_params.get("types"), request.query_params.get("level"))
        peer = request.client.host if request.client else None
        release = cap.admit(client_address(peer, request.headers.get("x-forwarded-for"), settings.trusted_proxies))
        try:
            connection = await bus.connect(settings)
            last_event = await last_event_of(connection, task_id)
        except BaseException:
            release()
            raise
        chunks = trace(
            connection.js, feeds, task_id, after,
            finished_at=terminal_seq(last_event), only=only, buffer_bytes=settings.stream_client_buffer_bytes,
        )  # fmt: skip
        return EventStream(
            chunks,
            heartbeat=heartbeat_seconds,
            send_timeout=settings.stream_send_timeout_seconds,
            max_seconds=settings.stream_max_seconds,
            closing=closing,
            on_close=release,
        )

    async def list_tasks(request: Request) -> Response:
        records = await (await bus.connect(settings)).registry.list()
        records.sort(key=lambda r: (r.get("created_at") or "", r.get("task_id") or ""), reverse=True)
        return JSONResponse(redaction.current().redact_obj(records))

    async def get_task(request: Request) -> Response:
        task_id = task_id_of(request)
        record = await (await bus.connect(settings)).registry.get(task_id)
        if record is None:
            raise BadInput(f"no task {task_id!r}", "task_id", 404)
        return JSONResponse(redaction.current().redact_obj(record))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: StreamApp):
        closing.clear()  # an app served again after a shutdown (tests restart it) streams again
        tracker = asyncio.create_task(serving.run_tracker(settings)) if run_tracker else None
        try:
            with serving.on_shutdown_signal(closing.set):
                yield
        finally:
            closing.set()
            if tracker is not None:
                tracker.cancel()
                await asyncio.gather(tracker, return_exceptions=True)
            await bus.disconnect()

    return StreamApp(
        feeds=feeds,
        cap=cap,
        closing=closing,
        routes=[
            Route("/api/stream/{task_id}", stream),
            Route("/api/tasks", list_tasks),
            Route("/api/tasks/{task_id}", get_task),
            *downloads.routes(settings, task_id_of),
            Route("/healthz", healthz),
            *cockpit.routes(settings, redaction),
        ],
        middleware=[*cors_middleware(settings), Middleware(TokenAuth, tokens=Tokens(settings.api_tokens_file or None))],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
