"""The stream app over real HTTP (uvicorn on a free port) against a real nats-server.

What a client of GET /api/stream/{id} relies on: exact SSE framing in stream
order, resumption after any id with no gap and no duplicate (also across a
NATS restart and an app restart), `end` after the terminal event, heartbeats,
4xx for bad requests, and no consumer left behind once it is gone.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import uvicorn

from agent import contract
from functions.stream import app as stream
from functions.core.bus import now_iso
from functions.core.registry import new_record
from functions.cli.sse_client import SSEMessage, follow
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)


class AppServer:
    """The stream app under uvicorn in this event loop; stop() and start() again on the same port."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> "AppServer":
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
            self._server = None


@pytest.fixture
async def serve(settings):
    """`await serve(heartbeat_seconds=...)` -> a started AppServer (stopped at teardown)."""
    servers: list[AppServer] = []

    async def start(**kwargs) -> AppServer:
        server = await AppServer(stream.create_app(settings, **kwargs)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def ev(task_id: str, type_: str, **fields) -> dict:
    return {"type": type_, "task_id": task_id, "ts": now_iso(), **fields}


def log_record(task_id: str, msg: str) -> dict:
    return {"ts": now_iso(), "level": "INFO", "logger": "agent", "msg": msg, "task_id": task_id}


async def publish(js, task_id: str, body: dict, raw: bytes | None = None) -> int:
    """Publish an event (body has "type") or a log record; returns its stream sequence."""
    subject = contract.subject_events(task_id) if "type" in body else contract.subject_logs(task_id)
    return (await js.publish(subject, raw if raw is not None else json.dumps(body).encode())).seq


def finished(task_id: str) -> dict:
    return ev(task_id, contract.EV_STATUS, state=contract.STATE_FINISHED, outcome=contract.OUTCOME_DONE)


async def collect(url: str, after: int | None = None, **kwargs) -> list[SSEMessage]:
    return [m async for m in follow(url, after, backoff=0.05, **kwargs)]


async def consumer_count(js) -> int:
    return len(await js.consumers_info(contract.STREAM_NAME))


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


# --- framing, order, resumption ----------------------------------------------


async def test_frames_are_exact_in_stream_order_with_event_names(bus, serve):
    server = await serve(heartbeat_seconds=60)
    task, other = "t-frame", "t-other"
    bodies = [
        ev(task, contract.EV_STATUS, state=contract.STATE_STARTED),
        log_record(task, "cloning"),
        ev(task, contract.EV_PHASE, phase=contract.PHASE_STRATEGIC),
        ev(task, contract.EV_TODO, todos=["a", "b"]),
        ev(task, contract.EV_TOOL, name="execute", args={"command": "ls"}),
        ev(task, contract.EV_SNAPSHOT, key="jobs/t-frame/checkpoints/x.db"),
        ev(task, contract.EV_MESSAGE, text="hello"),
        ev(task, contract.EV_WARNING, text="slow"),
        ev(task, contract.EV_RESULT, summary="done"),
        log_record(task, "two\nlines"),
    ]
    expected = []
    for i, body in enumerate(bodies):
        await publish(bus.js, other, log_record(other, f"noise {i}"))  # another task's messages are skipped
        raw = json.dumps(body).encode()
        seq = await publish(bus.js, task, body, raw)
        expected.append(f"id: {seq}\nevent: {body.get('type', 'log')}\ndata: {raw.decode()}\n\n")
    # Published data with line breaks (pretty-printed JSON) is split into data: lines.
    pretty = log_record(task, "pretty")
    raw = json.dumps(pretty, indent=1).encode()
    seq = await publish(bus.js, task, pretty, raw)
    expected.append(f"id: {seq}\nevent: log\n" + "".join(f"data: {line}\n" for line in raw.decode().split("\n")) + "\n")
    body = finished(task)
    raw = json.dumps(body).encode()
    seq = await publish(bus.js, task, body, raw)
    expected.append(f"id: {seq}\nevent: status\ndata: {raw.decode()}\n\n")
    expected.append(f'event: end\ndata: {{"task_id":"{task}","last_id":{seq}}}\n\n')

    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{server.url}/api/stream/{task}")  # returns once the server closes
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.text == "".join(expected)

    messages = await collect(f"{server.url}/api/stream/{task}")
    assert messages[-3].data == pretty  # the multi-line data parses back to the record
    assert [m.event for m in messages] == [b.get("type", "log") for b in bodies] + ["log", "status", "end"]


async def test_resume_with_last_event_id_or_after_gives_exactly_the_rest(bus, serve):
    server = await serve(heartbeat_seconds=60)
    task = "t-resume"
    seqs = [await publish(bus.js, task, log_record(task, f"line {i}")) for i in range(6)]
    await publish(bus.js, "t-noise", log_record("t-noise", "between"))
    seqs.append(await publish(bus.js, task, finished(task)))
    url = f"{server.url}/api/stream/{task}"

    everything = await collect(url)
    assert [m.id for m in everything] == seqs + [None]
    assert everything[-1].event == "end" and everything[-1].data == {"task_id": task, "last_id": seqs[-1]}
    for k, seq in enumerate(seqs[:-1]):
        by_header = await collect(url, after=seq)  # follow() sends Last-Event-ID
        assert [m.id for m in by_header] == seqs[k + 1 :] + [None]
        by_query = await collect(f"{url}?after={seq}")
        assert [m.id for m in by_query] == seqs[k + 1 :] + [None]
    # A browser's EventSource reconnects to its first URL with the header: the header wins.
    assert [m.id for m in await collect(f"{url}?after=0", after=seqs[3])] == seqs[4:] + [None]


async def test_resume_after_the_terminal_event_ends_at_once(bus, serve):
    server = await serve(heartbeat_seconds=60)
    task = "t-done"
    await publish(bus.js, task, log_record(task, "work"))
    last = await publish(bus.js, task, finished(task))
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{server.url}/api/stream/{task}", headers={"Last-Event-ID": str(last)})
    assert response.text == f'event: end\ndata: {{"task_id":"{task}","last_id":{last}}}\n\n'


async def test_live_messages_reach_a_follower(bus, serve):
    server = await serve(heartbeat_seconds=60)
    task = "t-live"
    first = await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received))
    assert await wait_until(lambda: _true(len(received) == 1))
    seqs = [first]
    for i in range(20):
        seqs.append(await publish(bus.js, task, log_record(task, f"live {i}")))
        if i % 7 == 0:
            await asyncio.sleep(0.02)
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(follower, 10)
    assert [m.id for m in received] == seqs + [None]


async def collect_into(url: str, into: list, after: int | None = None, **kwargs) -> None:
    async for message in follow(url, after, backoff=0.05, **kwargs):
        into.append(message)


async def _true(value: bool) -> bool:
    return value


# --- errors -------------------------------------------------------------------


async def test_unknown_task_is_404_and_bad_input_is_400(bus, serve):
    server = await serve(heartbeat_seconds=60)
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        response = await client.get("/api/stream/t-nobody")
        assert response.status_code == 404
        assert response.json()["field"] == "task_id" and "t-nobody" in response.json()["error"]
        for bad in ("Upper", "under_score", "-lead", "x" * 41):
            response = await client.get(f"/api/stream/{bad}")
            assert response.status_code == 400, bad
            assert response.json()["field"] == "task_id"
        await publish(bus.js, "t-known", log_record("t-known", "hi"))
        response = await client.get("/api/stream/t-known?after=ten")
        assert (response.status_code, response.json()["field"]) == (400, "after")
        response = await client.get("/api/stream/t-known", headers={"Last-Event-ID": "-1"})
        assert (response.status_code, response.json()["field"]) == (400, "Last-Event-ID")
        response = await client.get("/api/tasks/t-nobody")
        assert (response.status_code, response.json()["field"]) == (404, "task_id")
        assert (await client.get("/api/tasks/Bad")).status_code == 400


async def test_nats_down_is_503(settings, nats_server):
    nats_server.stop()
    server = await AppServer(stream.create_app(settings)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            response = await client.get("/api/stream/t-any")
            assert response.status_code == 503 and "error" in response.json()
    finally:
        await server.stop()
        nats_server.start()


async def test_registered_task_without_messages_streams_heartbeats(bus, serve):
    server = await serve(heartbeat_seconds=0.2)
    await bus.registry.create("t-quiet", new_record("t-quiet", task=None, spec_hash=None, now=now_iso()))
    async with httpx.AsyncClient(timeout=5) as client:
        async with client.stream("GET", f"{server.url}/api/stream/t-quiet") as response:
            assert response.status_code == 200
            started = time.monotonic()
            comments = 0
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    comments += 1
                    if comments == 2:
                        break
            assert time.monotonic() - started < 2


# --- consumers ------------------------------------------------------------------


async def test_consumers_are_shared_per_task_and_released_after_disconnect(bus, serve):
    server = await serve(heartbeat_seconds=60)
    task = "t-release"
    for i in range(5):
        await publish(bus.js, task, log_record(task, f"history {i}"))
    before = await consumer_count(bus.js)

    async def first_message(client: httpx.AsyncClient) -> httpx.Response:
        cm = client.stream("GET", f"{server.url}/api/stream/{task}")
        response = await cm.__aenter__()
        lines = response.aiter_lines()
        while (await anext(lines)) != "":
            pass
        return cm

    async with httpx.AsyncClient(timeout=5) as one, httpx.AsyncClient(timeout=5) as two:
        streams = [await first_message(one), await first_message(two)]
        # Both caught up from history and now share the task's one live consumer.
        assert await wait_until(lambda: _equals(consumer_count(bus.js), before + 1))
        for cm in streams:
            await cm.__aexit__(None, None, None)
    assert await wait_until(lambda: _equals(consumer_count(bus.js), before), timeout=5)


async def _equals(awaitable, value) -> bool:
    return (await awaitable) == value


async def test_clients_behind_a_small_feed_still_get_everything_once(bus, serve, monkeypatch):
    monkeypatch.setattr(stream, "MAX_FEED_FRAMES", 8)  # the feed forgets fast: late clients catch up on their own
    server = await serve(heartbeat_seconds=60)
    task = "t-fanout"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    early: list[SSEMessage] = []
    followers = [asyncio.create_task(collect_into(url, early))]
    assert await wait_until(lambda: _true(len(early) == 1))
    late_lists: list[list[SSEMessage]] = []
    for i in range(60):
        seqs.append(await publish(bus.js, task, log_record(task, f"record {i}")))
        if i % 15 == 14:  # a new client joins from the start while the feed is ahead
            late_lists.append([])
            followers.append(asyncio.create_task(collect_into(url, late_lists[-1])))
            await asyncio.sleep(0.05)
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(asyncio.gather(*followers), 20)
    for received in [early, *late_lists]:
        assert [m.id for m in received] == seqs + [None]


# --- restarts -------------------------------------------------------------------


async def publish_when_back(js, task_id: str, body: dict, timeout: float = 20) -> int:
    """Publish once JetStream answers again; Nats-Msg-Id makes a retried publish land once."""
    msg_id = f"{task_id}-{body.get('msg') or body.get('state')}"
    subject = contract.subject_events(task_id) if "type" in body else contract.subject_logs(task_id)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ack = await js.publish(subject, json.dumps(body).encode(), timeout=1, headers={"Nats-Msg-Id": msg_id})
            return ack.seq
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_follower_gets_everything_once_across_a_nats_restart(bus, serve, nats_server, monkeypatch):
    monkeypatch.setattr(stream, "CONSUMER_IDLE_HEARTBEAT_SECONDS", 0.5)  # notice the lost consumer quickly
    server = await serve(heartbeat_seconds=0.5)
    task = "t-nats-restart"
    seqs = [await publish(bus.js, task, log_record(task, f"before {i}")) for i in range(5)]
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received, read_timeout=5, max_retries=None))
    assert await wait_until(lambda: _true(len(received) == 5))

    await asyncio.to_thread(nats_server.restart)
    for i in range(5):
        seqs.append(await publish_when_back(bus.js, task, log_record(task, f"after {i}")))
    seqs.append(await publish_when_back(bus.js, task, finished(task)))

    await asyncio.wait_for(follower, 30)
    assert [m.id for m in received] == seqs + [None]


async def test_follower_resumes_across_an_app_restart(bus, serve):
    server = await serve(heartbeat_seconds=0.5)
    task = "t-app-restart"
    seqs = [await publish(bus.js, task, log_record(task, f"before {i}")) for i in range(5)]
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received, read_timeout=5, max_retries=None))
    assert await wait_until(lambda: _true(len(received) == 5))

    await server.stop()  # the client sees its connection end and retries with Last-Event-ID
    for i in range(5):
        seqs.append(await publish(bus.js, task, log_record(task, f"while down {i}")))
    await server.start()
    for i in range(3):
        seqs.append(await publish(bus.js, task, log_record(task, f"after {i}")))
    seqs.append(await publish(bus.js, task, finished(task)))

    await asyncio.wait_for(follower, 30)
    assert [m.id for m in received] == seqs + [None]


# --- task listings ------------------------------------------------------------------


async def test_tasks_are_listed_newest_first(bus, serve):
    server = await serve()
    for i, task_id in enumerate(["t-old", "t-mid", "t-new"]):
        record = new_record(task_id, task={"prompt": f"p{i}"}, spec_hash=f"h{i}", now=f"2030-01-01T00:00:0{i}.000Z")
        await bus.registry.create(task_id, record)
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        assert (await client.get("/healthz")).json()["status"] == "ok"
        listed = (await client.get("/api/tasks")).json()
        assert [r["task_id"] for r in listed] == ["t-new", "t-mid", "t-old"]
        one = await client.get("/api/tasks/t-mid")
        assert one.status_code == 200 and one.json()["task"] == {"prompt": "p1"}


def test_import_is_light():
    """Cold start: importing the app module must not pull nats-py or uvicorn in."""
    import subprocess
    import sys

    code = "import sys, functions.stream.app; print(any(m in sys.modules for m in ('nats', 'uvicorn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
