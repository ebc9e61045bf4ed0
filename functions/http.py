"""The edge: the one place where exceptions become HTTP answers.

    BadInput                         -> its status (400, 404, 409, 413, 415, 422) with {"error", "field"}
    LaunchConflict                   -> 409        (same task id, another spec)
    TaskNotFound                     -> 404
    other RuntimeError_, not transient -> 422
    anything transient (NATS, an agent that does not answer, a transient runtime error) -> 503
    anything else                    -> 500, logged with its traceback: a bug

The broker retries 5xx and never 4xx, so a wrong 5xx costs retries and a
wrong 4xx loses an event; when in doubt a new error type decides explicitly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from cloudevents.http import CloudEvent
from starlette.requests import Request
from starlette.responses import JSONResponse

from functions import cloudevent
from functions.runtime.base import LaunchConflict, RuntimeError_, TaskNotFound
from functions.task import BadInput

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024

Handler = Callable[[CloudEvent, object], Awaitable[dict]]  # (event, Context) -> response body
Answer = tuple[int, dict]  # (status, JSON body)


def _is_transient(exc: BaseException) -> bool:
    if getattr(exc, "transient", False) is True:
        return True
    if isinstance(exc, (asyncio.TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.startswith("nats.")  # nats-py's own errors: the bus is in trouble


def answer_for(exc: BaseException) -> Answer:
    """The (status, body) for an exception raised while handling an event."""
    if isinstance(exc, BadInput):
        return exc.status, exc.body()
    if isinstance(exc, LaunchConflict):
        return 409, {"error": str(exc), "field": "task_id"}
    if isinstance(exc, TaskNotFound):
        return 404, {"error": str(exc), "field": "task_id"}
    if isinstance(exc, RuntimeError_) and not exc.transient:
        return 422, {"error": str(exc), "field": None}
    if _is_transient(exc):
        reason = str(exc) or type(exc).__name__
        log.warning("transient failure, the broker will retry: %s", reason)
        return 503, {"error": f"temporarily unavailable: {reason}; retry later", "field": None}
    log.error("unexpected error (a bug)", exc_info=exc)
    return 500, {"error": f"internal error: {type(exc).__name__}", "field": None}


async def call(handler: Handler, event: CloudEvent, get_context: Callable[[], Awaitable[object]]) -> Answer:
    """Run a handler on a parsed event; never raises (except cancellation)."""
    try:
        ctx = await get_context()
        return 200, await handler(event, ctx)
    except Exception as exc:
        return answer_for(exc)


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
    return cloudevent.parse(request.headers, await read_body(request))


def json_answer(answer: Answer) -> JSONResponse:
    status, body = answer
    return JSONResponse(body, status_code=status)


def endpoint(handler: Handler, get_context: Callable[[], Awaitable[object]]):
    """A Starlette endpoint (`async (Request) -> Response`) running `handler` on the CloudEvent posted to it."""

    async def serve(request: Request) -> JSONResponse:
        try:
            event = await read_event(request)
        except BadInput as exc:
            return json_answer(answer_for(exc))
        return json_answer(await call(handler, event, get_context))

    serve.__name__ = getattr(handler, "__module__", "handler").rsplit(".", 1)[-1]
    return serve
