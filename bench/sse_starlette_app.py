"""The stream app with sse-starlette's EventSourceResponse in place of functions.stream.sse.EventStream: a bench subject.

    uv pip install --python .venv/bin/python sse-starlette==3.7.0   # not in the lock: for this comparison only
    .venv/bin/python bench/bench_fanout.py --app bench.sse_starlette_app:create_app
    .venv/bin/python bench/bench_stream.py --app bench.sse_starlette_app:create_app

Compare with `--app functions.stream.app:create_app` (the same uvicorn command line
with the app's own response). The adapter does the least sse-starlette needs to
carry the trace: the trace's chunks are already framed bytes, which it passes
through unchanged; `ping` is the heartbeat, `send_timeout` the send timeout,
the release of the per-address slot its background task. It does not end a
response after the max duration or with a comment on shutdown, and does not
abort a stalled client's socket: whatever it costs here, doing all the app
does would cost at least as much.
"""

from __future__ import annotations

from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

import functions.stream.app as stream_app


class SseStarletteStream(EventSourceResponse):
    def __init__(self, chunks, *, heartbeat, send_timeout, max_seconds, closing, on_close=None):
        super().__init__(
            chunks,
            ping=heartbeat,
            send_timeout=send_timeout,
            background=BackgroundTask(on_close) if on_close else None,
            headers={"Cache-Control": "no-store"},
        )


def create_app():
    stream_app.EventStream = SseStarletteStream  # create_app looks the response class up at call time
    return stream_app.create_app()
