"""The edge of the functions: a handler run on a posted CloudEvent, its outcome an HTTP answer.

Which exception becomes which status is decided once, in
`functions.errors.answer_for`; this module only runs handlers and wraps the
answer. The broker retries 5xx and never 4xx, so a wrong 5xx costs retries and
a wrong 4xx loses an event.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from cloudevents.http import CloudEvent
from starlette.requests import Request
from starlette.responses import JSONResponse

from functions.core.cloudevent import MAX_BODY_BYTES, parse, read_body
from functions.errors import Answer, BadInput, answer_for

Handler = Callable[[CloudEvent, object], Awaitable[dict]]  # (event, Context) -> response body


def body_limit(handler: Handler) -> int:
    """The largest body the handler's target reads: its module's `MAX_BODY_BYTES`, else the default."""
    import sys

    return getattr(sys.modules.get(getattr(handler, "__module__", "")), "MAX_BODY_BYTES", MAX_BODY_BYTES)


async def call(handler: Handler, event: CloudEvent, get_context: Callable[[], Awaitable[object]]) -> Answer:
    """Run a handler on a parsed event; never raises (except cancellation)."""
    try:
        ctx = await get_context()
        return 200, await handler(event, ctx)
    except Exception as exc:
        return answer_for(exc)


def json_answer(answer: Answer) -> JSONResponse:
    status, body = answer
    return JSONResponse(body, status_code=status)


def endpoint(handler: Handler, get_context: Callable[[], Awaitable[object]]):
    """A Starlette endpoint (`async (Request) -> Response`) running `handler` on the CloudEvent posted to it."""

    limit = body_limit(handler)

    async def serve(request: Request) -> JSONResponse:
        try:
            event = parse(request.headers, await read_body(request, limit))
        except BadInput as exc:
            return json_answer(answer_for(exc))
        return json_answer(await call(handler, event, get_context))

    serve.__name__ = getattr(handler, "__module__", "handler").rsplit(".", 1)[-1]
    return serve
