"""The stream app over real HTTP (uvicorn on a free port) against a real nats-server.

What a client of GET /api/stream/{id} relies on: exact SSE framing in stream
order, resumption after any id with no gap and no duplicate (also across an
app restart), `end` after the terminal event, heartbeats, errors answered by
the one rule (4xx naming the field, 503 while NATS is away), the task
listings, CORS, and a light import.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

from agent import contract
from functions.cli.sse_client import SSEMessage
from functions.core.registry import new_record
from functions.stream.app import create_app
from tests.conftest import eventually_async
from tests.functions.stream.support import (
    AUTH,
    AppServer,
    collect,
    collect_into,
    ev,
    finished,
    log_record,
    publish,
)

pytestmark = pytest.mark.timeout(90)


# --- framing, order, resumption ----------------------------------------------


async def test_frames_are_exact_in_stream_order_with_event_names(bus, serve):
    server = await serve()
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

    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        response = await client.get(f"{server.url}/api/stream/{task}")  # returns once the server closes
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.text == "".join(expected)

    messages = await collect(f"{server.url}/api/stream/{task}")
    assert messages[-3].data == pretty  # the multi-line data parses back to the record
    assert [m.event for m in messages] == [b.get("type", "log") for b in bodies] + ["log", "status", "end"]


async def test_resume_with_last_event_id_or_after_gives_exactly_the_rest(bus, serve):
    server = await serve()
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
    server = await serve()
    task = "t-done"
    await publish(bus.js, task, log_record(task, "work"))
    last = await publish(bus.js, task, finished(task))
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as client:
        response = await client.get(f"{server.url}/api/stream/{task}", headers={"Last-Event-ID": str(last)})
    assert response.text == f'event: end\ndata: {{"task_id":"{task}","last_id":{last}}}\n\n'


async def test_live_messages_reach_a_follower(bus, serve):
    server = await serve()
    task = "t-live"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received))
    await eventually_async(lambda: len(received) == 1, "the follower has the first message")
    for i in range(21):
        seqs.append(await publish(bus.js, task, log_record(task, f"live {i}")))
        if i % 7 == 6:  # several live deliveries, each after the follower had everything before
            await eventually_async(lambda: len(received) == len(seqs), f"the follower has {len(seqs)} messages")
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(follower, 30)
    assert [m.id for m in received] == seqs + [None]


async def test_a_follower_resumes_across_an_app_restart(bus, serve):
    server = await serve(heartbeat_seconds=0.5)
    task = "t-app-restart"
    seqs = [await publish(bus.js, task, log_record(task, f"before {i}")) for i in range(5)]
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received, read_timeout=5, max_retries=None))
    await eventually_async(lambda: len(received) == 5, "the follower has the history")

    await server.stop()  # the client sees its response end and retries with Last-Event-ID
    for i in range(5):
        seqs.append(await publish(bus.js, task, log_record(task, f"while down {i}")))
    await server.start()
    for i in range(3):
        seqs.append(await publish(bus.js, task, log_record(task, f"after {i}")))
    seqs.append(await publish(bus.js, task, finished(task)))

    await asyncio.wait_for(follower, 30)
    assert [m.id for m in received] == seqs + [None]


async def test_registered_task_without_messages_streams_heartbeats(bus, serve):
    server = await serve(heartbeat_seconds=0.2)
    await bus.registry.create("t-quiet", new_record("t-quiet", task=None, spec_hash=None, now=contract.iso_utc()))
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as client:
        async with client.stream("GET", f"{server.url}/api/stream/t-quiet") as response:
            assert response.status_code == 200
            started = time.monotonic()
            comments = 0
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    comments += 1
                    if comments == 2:
                        break
            assert time.monotonic() - started < 2  # 0.2 s heartbeats, not the 15 s default


# --- errors -------------------------------------------------------------------


async def test_unknown_task_is_404_and_bad_input_is_400(bus, serve):
    server = await serve()
    async with httpx.AsyncClient(headers=AUTH, base_url=server.url, timeout=5) as client:
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
    server = await AppServer(create_app(settings)).start()
    try:
        async with httpx.AsyncClient(headers=AUTH, base_url=server.url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            response = await client.get("/api/stream/t-any")
            assert response.status_code == 503 and "error" in response.json()
            response = await client.get("/api/tasks")
            assert response.status_code == 503 and response.json()["field"] is None
    finally:
        await server.stop()
        nats_server.start()


async def test_a_bug_is_a_500_in_the_same_shape(serve, monkeypatch):
    """Anything not in the error tree is answered 500 `{"error", "field"}` (and logged as a bug)."""
    server = await serve()

    async def broken(settings):
        raise KeyError("a bug")

    monkeypatch.setattr("functions.core.bus.connect", broken)
    async with httpx.AsyncClient(headers=AUTH, base_url=server.url, timeout=5) as client:
        response = await client.get("/api/tasks")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: KeyError", "field": None}


# --- task listings ------------------------------------------------------------------


async def test_tasks_are_listed_newest_first(bus, serve):
    server = await serve()
    for i, task_id in enumerate(["t-old", "t-mid", "t-new"]):
        record = new_record(task_id, task={"prompt": f"p{i}"}, spec_hash=f"h{i}", now=f"2030-01-01T00:00:0{i}.000Z")
        await bus.registry.create(task_id, record)
    async with httpx.AsyncClient(headers=AUTH, base_url=server.url, timeout=5) as client:
        assert (await client.get("/healthz")).json()["status"] == "ok"
        listed = (await client.get("/api/tasks")).json()
        assert [r["task_id"] for r in listed] == ["t-new", "t-mid", "t-old"]
        one = await client.get("/api/tasks/t-mid")
        assert one.status_code == 200 and one.json()["task"] == {"prompt": "p1"}


# --- CORS and settings ----------------------------------------------------------------


async def test_cors_lets_configured_origins_read_and_resume(bus, serve):
    task = "t-cors"
    await publish(bus.js, task, log_record(task, "hi"))
    await publish(bus.js, task, finished(task))
    plain = await serve()
    server = await serve(cors_origins=("https://cockpit.example",))
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as client:
        response = await client.get(f"{server.url}/api/stream/{task}", headers={"Origin": "https://cockpit.example"})
        assert response.status_code == 200 and response.text.endswith("\n\n")
        assert response.headers["access-control-allow-origin"] == "https://cockpit.example"
        assert "retry-after" in response.headers["access-control-expose-headers"].lower()
        preflight = await client.options(
            f"{server.url}/api/stream/{task}",
            headers={"Origin": "https://cockpit.example", "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "last-event-id"},
        )  # fmt: skip
        assert preflight.status_code == 200 and "last-event-id" in preflight.headers["access-control-allow-headers"].lower()
        other = await client.get(f"{server.url}/api/tasks", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        unset = await client.get(f"{plain.url}/api/tasks", headers={"Origin": "https://cockpit.example"})
        assert "access-control-allow-origin" not in unset.headers


def test_stream_settings_come_from_the_environment():
    from functions.core.settings import Settings
    from functions.errors import SettingsError

    env = {
        "DOCKYARD_STREAM_MAX_SECONDS": "300",
        "DOCKYARD_STREAM_SEND_TIMEOUT_SECONDS": "12.5",
        "DOCKYARD_STREAM_CLIENT_BUFFER_BYTES": "65536",
        "DOCKYARD_STREAM_MAX_PER_IP": "0",
        "DOCKYARD_CORS_ORIGINS": " https://a.example, https://b.example:8443 ,",
        "DOCKYARD_KNOWN_SECRETS_FILE": "/var/secrets/stream/known",
    }
    settings = Settings.from_env(env)
    assert (settings.stream_max_seconds, settings.stream_send_timeout_seconds) == (300, 12.5)
    assert (settings.stream_client_buffer_bytes, settings.stream_max_per_ip) == (65536, 0)
    assert settings.cors_origins == ("https://a.example", "https://b.example:8443")
    assert settings.known_secrets_file == "/var/secrets/stream/known"
    defaults = Settings.from_env({})
    assert (defaults.stream_max_seconds, defaults.stream_max_per_ip, defaults.cors_origins, defaults.known_secrets_file) == (540, 20, (), "")
    with pytest.raises(SettingsError, match="DOCKYARD_STREAM_MAX_PER_IP"):
        Settings.from_env({"DOCKYARD_STREAM_MAX_PER_IP": "many"})


def test_import_is_light():
    """Cold start: importing the app module must not pull nats-py or uvicorn in."""
    code = "import sys, functions.stream.app; print(any(m in sys.modules for m in ('nats', 'uvicorn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
