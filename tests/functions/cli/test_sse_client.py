"""The SSE client: the text/event-stream parser, and following a stream that drops and refuses.

The server side here is a tiny Starlette app under uvicorn that drops the
connection on purpose, so reconnection with Last-Event-ID is seen end to end.
"""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from functions.cli.sse_client import SSEError, SSEMessage, SSEParser, follow
from tests.conftest import eventually_async, free_port

pytestmark = pytest.mark.timeout(30)


def parse(*chunks: bytes) -> list[SSEMessage]:
    parser = SSEParser()
    return [m for chunk in chunks for m in parser.feed(chunk)]


def test_parser_fields_comments_and_multiline_data():
    text = (
        b": a comment\n"
        b"id: 7\nevent: log\ndata: {\"a\":\n"
        b"data: 1}\n\n"
        b"retry: 1500\n"
        b"event: end\ndata: {}\n\n"
        b"data:{\"no_space\": true}\n\n"
        b"id: 9\n\n"  # an id alone dispatches nothing
        b"data: not json\n\n"
    )
    parser = SSEParser()
    messages = parser.feed(text)
    assert messages == [
        SSEMessage(7, "log", {"a": 1}),
        SSEMessage(None, "end", {}),
        SSEMessage(None, "message", {"no_space": True}),
        SSEMessage(None, "message", {"text": "not json"}),
    ]
    assert parser.retry_ms == 1500


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_parser_accepts_every_line_ending_split_anywhere(sep):
    text = sep.join([b"id: 1", b"event: status", b'data: {"x": 1}', b"", b"id: 2", b"event: log", b'data: {"y": 2}', b"", b""])
    whole = parse(text)
    assert whole == [SSEMessage(1, "status", {"x": 1}), SSEMessage(2, "log", {"y": 2})]
    for cut in range(1, len(text)):  # every split point, including inside a CRLF
        assert parse(text[:cut], text[cut:]) == whole
    assert parse(*[text[i : i + 1] for i in range(len(text))]) == whole


class FlakyServer:
    """Serves ids 1..total; drops the connection after every `per_connection` messages."""

    def __init__(self, total: int, per_connection: int):
        self.total = total
        self.per_connection = per_connection
        self.last_event_ids: list[str | None] = []
        self.port = free_port()

    async def events(self, request: Request):
        if request.path_params["name"] == "refused":
            return JSONResponse({"error": "no such task", "field": "task_id"}, status_code=404)
        if request.path_params["name"] == "capped" and not self.last_event_ids:
            self.last_event_ids.append("429")
            return JSONResponse({"error": "too many streams", "field": "client"}, status_code=429, headers={"Retry-After": "0.3"})
        header = request.headers.get("last-event-id")
        self.last_event_ids.append(header)
        if len(self.last_event_ids) == 2:
            return JSONResponse({"error": "busy"}, status_code=503)  # transient: retried
        start = int(header) + 1 if header else 1

        async def body():
            for seq in range(start, min(start + self.per_connection, self.total + 1)):
                yield f": ping\n\nid: {seq}\nevent: log\ndata: {{\"n\": {seq}}}\n\n".encode()
            if start + self.per_connection > self.total:
                yield b'event: end\ndata: {"last_id": %d}\n\n' % self.total
                return
            # Replay the last message once more before dropping: the client must not yield it twice.
            last = start + self.per_connection - 1
            yield f"id: {last}\nevent: log\ndata: {{\"n\": {last}}}\n\n".encode()
            raise ConnectionResetError("dropped on purpose")

        return StreamingResponse(body(), media_type="text/event-stream")

    async def __aenter__(self):
        app = Starlette(routes=[Route("/events/{name}", self.events)])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical"))
        self.task = asyncio.create_task(self.server.serve())
        await eventually_async(lambda: self.server.started, f"uvicorn to serve on {self.port}")
        return self

    async def __aexit__(self, *exc):
        self.server.should_exit = True
        await self.task


class Waits(list):
    """The waits `follow` takes between attempts, recorded instead of slept: pass `sleep=waits.sleep`."""

    async def sleep(self, seconds: float) -> None:
        self.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def waits() -> Waits:
    return Waits()


async def test_follow_reconnects_with_last_event_id_and_yields_each_id_once(waits):
    async with FlakyServer(total=10, per_connection=3) as server:
        url = f"http://127.0.0.1:{server.port}/events/t"
        messages = [m async for m in follow(url, backoff=0.01, sleep=waits.sleep)]
        assert [m.id for m in messages] == list(range(1, 11)) + [None]
        assert messages[-1].event == "end"
        assert server.last_event_ids[:3] == [None, "3", "3"]  # the 503 was retried with the same id
        assert waits == [0.01] * 4  # one failure (the 503) between progress: never more than the first backoff

        resumed = [m async for m in follow(url, after=8, backoff=0.01, sleep=waits.sleep)]
        assert [m.id for m in resumed] == [9, 10, None]


async def test_follow_raises_at_once_on_4xx_and_gives_up_after_max_retries(waits):
    async with FlakyServer(total=1, per_connection=1) as server:
        with pytest.raises(SSEError) as refused:
            [m async for m in follow(f"http://127.0.0.1:{server.port}/events/refused", sleep=waits.sleep)]
        assert refused.value.status == 404 and refused.value.body["field"] == "task_id"
        assert waits == []

    dead = f"http://127.0.0.1:{free_port()}/events/t"
    with pytest.raises(ConnectionError):
        [m async for m in follow(dead, max_retries=2, backoff=0.01, sleep=waits.sleep)]
    assert waits == [0.01, 0.02]  # exponential, then given up
    assert [m async for m in follow(dead, reconnect=False, sleep=waits.sleep)] == []


async def test_follow_waits_out_a_429_and_then_streams(waits):
    async with FlakyServer(total=2, per_connection=5) as server:
        messages = [m async for m in follow(f"http://127.0.0.1:{server.port}/events/capped", backoff=0.01, sleep=waits.sleep)]
        assert [m.id for m in messages] == [1, 2, None]
        assert waits == [0.3, 0.02]  # Retry-After honoured over the backoff; then the 503, second failure
        assert server.last_event_ids[0] == "429"
