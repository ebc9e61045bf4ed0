"""SSE framing, and the response under stress over real HTTP against a real nats-server.

A stalled client never holds up another one and is dropped (reset) after the
send timeout; a live client that falls behind is cut cleanly; a response
ends cleanly after the max duration; every client resumes with no gap and no
duplicate.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from agent import contract
from functions.cli.sse_client import SSEMessage
from functions.stream.sse import comment, end_frame, frame
from tests.conftest import eventually_async
from tests.functions.stream.support import (
    AUTH,
    RawClient,
    collect,
    collect_into,
    ev,
    finished,
    log_record,
    messages_of,
    publish,
    raw_body,
)

pytestmark = pytest.mark.timeout(90)

PADDING = "x" * 4000
NEVER_CUT = 64 * 1024 * 1024  # a client buffer larger than the feed ever holds: no client is cut for falling behind


def test_frames_split_line_breaks_into_data_lines():
    assert frame(7, b"log", b'{"a": 1}') == b'id: 7\nevent: log\ndata: {"a": 1}\n\n'
    assert frame(8, b"tool", b"one\r\ntwo\rthree\nfour") == b"id: 8\nevent: tool\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    assert end_frame("t-1", 9) == b'event: end\ndata: {"task_id":"t-1","last_id":9}\n\n'
    assert comment("why") == b": why\n\n"
    parsed = messages_of(frame(8, b"log", b"a\nb") + end_frame("t-1", 8))
    assert [(m.id, m.event) for m in parsed] == [(8, "log"), (None, "end")]


async def test_a_stalled_client_does_not_hold_up_another(bus, serve):
    # The stalled client stays connected throughout: no send timeout, and too large a buffer to be cut.
    server = await serve(stream_send_timeout_seconds=600, stream_client_buffer_bytes=NEVER_CUT)
    task = "t-stall"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    received: list[SSEMessage] = []
    healthy = asyncio.create_task(collect_into(url, received))
    stalled = RawClient(server.port, f"/api/stream/{task}")  # sends its request, then never reads
    await eventually_async(lambda: server.feed(task) and server.feed(task).waiting == 2, "both clients wait on the feed")

    for i in range(600):  # ~2.4 MB: far more than the stalled socket's buffers hold
        seqs.append(await publish(bus.js, task, log_record(task, f"record {i} {PADDING}")))
    await eventually_async(lambda: len(received) == len(seqs), "the healthy client has everything")
    # ... while the stalled one still follows, its socket full and unread.
    assert server.feed(task).clients == 2 and not stalled.closed_by_peer()

    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(healthy, 30)
    assert [m.id for m in received] == seqs + [None]  # everything, once, in order
    stalled.close()


async def test_a_stalled_client_is_dropped_after_the_send_timeout_and_resumes_without_a_gap(bus, serve):
    server = await serve(stream_send_timeout_seconds=1.0, stream_client_buffer_bytes=NEVER_CUT)  # only the timeout ends it
    task = "t-drop"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    stalled = RawClient(server.port, f"/api/stream/{task}")
    await eventually_async(lambda: server.feed(task) and server.feed(task).waiting == 1, "the client waits on the feed")
    for i in range(600):
        seqs.append(await publish(bus.js, task, log_record(task, f"record {i} {PADDING}")))
    await eventually_async(stalled.closed_by_peer, "the server closed the stalled connection, unread")

    # What reached the stalled socket before it was dropped, then a resume: no gap, no duplicate.
    await stalled.read()
    stalled.close()
    body, complete = stalled.body()
    assert not complete  # aborted, not ended
    got = [m.id for m in messages_of(body) if m.id is not None]
    assert got == seqs[: len(got)]
    seqs.append(await publish(bus.js, task, finished(task)))
    rest = await collect(url, after=got[-1] if got else None)
    assert got + [m.id for m in rest] == seqs + [None]


async def test_a_client_that_falls_behind_is_cut_cleanly_and_resumes_without_a_gap(bus, serve):
    server = await serve(stream_client_buffer_bytes=64 * 1024, stream_send_timeout_seconds=600)
    task = "t-behind"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    slow = RawClient(server.port, f"/api/stream/{task}")
    await slow.read(until=b"\n\n")
    await eventually_async(lambda: server.feed(task) and server.feed(task).waiting == 1, "it had everything: it is live")
    for i in range(300):  # 1.2 MB while it reads nothing: more than its socket buffers and its 64 KiB
        seqs.append(await publish(bus.js, task, log_record(task, f"record {i} {PADDING.replace('x', 'y')}")))

    def cut_or_behind() -> bool:  # cut already, or blocked in a write while the feed got everything: cut once unblocked
        feed = server.feed(task)
        return feed is None or feed.last == seqs[-1]

    await eventually_async(cut_or_behind, "the client was cut, or the feed holds everything published")
    await slow.read(until=b"\r\n0\r\n\r\n")  # it reads again: the server ends the response
    slow.close()
    body, complete = slow.body()
    assert complete, body[-300:]
    assert b": fell behind the live tail: resume with Last-Event-ID" in body and b"event: end" not in body
    got = [m.id for m in messages_of(body) if m.id is not None]
    assert 1 <= len(got) < len(seqs) and got == seqs[: len(got)]

    seqs.append(await publish(bus.js, task, finished(task)))
    rest = await collect(f"{server.url}/api/stream/{task}", after=got[-1])
    assert got + [m.id for m in rest] == seqs + [None]


async def test_a_response_ends_cleanly_after_the_max_duration_and_the_client_resumes(bus, serve):
    server = await serve(stream_max_seconds=1.0, heartbeat_seconds=0.3)
    task = "t-max"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, log_record(task, "first"))]
    started = time.monotonic()
    body = await raw_body(url)  # no terminal event: the server ends it by itself
    assert time.monotonic() - started >= 0.9  # not before 90% of the max duration (the jitter's floor)
    assert body.endswith(": max-duration: resume with Last-Event-ID\n\n")
    assert [m.id for m in messages_of(body)] == seqs

    requests = []

    async def record(request) -> None:
        requests.append(request.headers.get("last-event-id"))

    client = httpx.AsyncClient(headers=AUTH, timeout=httpx.Timeout(10, read=5), event_hooks={"request": [record]})
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(url, received, client=client))
    while len(requests) < 3:  # live messages until the follower was cut twice and resumed
        seqs.append(await publish(bus.js, task, log_record(task, f"line {len(seqs)}")))
        await eventually_async(lambda: len(received) == len(seqs), f"the follower has {len(seqs)} messages")
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(follower, 30)
    await client.aclose()
    assert [m.id for m in received] == seqs + [None]
    assert requests[0] is None and all(requests[1:])  # every resume sent its Last-Event-ID
