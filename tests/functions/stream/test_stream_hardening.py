"""The stream app under stress, over real HTTP against a real nats-server.

What the hardening promises: no secret reaches a client (secret formats and
known values, also through a real agent run and in task records); a stalled
or slow client is dropped without holding up the others, and resumes with no
gap; responses end cleanly after the max duration and on shutdown, and
clients resume exactly across a restart; limits (per-address cap, CORS) and
filters (`?types=`, `?level=`) that keep resumption exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from agent import contract
from agent.redact import REPLACEMENT
from functions.stream import app as stream
from functions.core.bus import now_iso
from functions.core.registry import new_record
from functions.cli.sse_client import SSEMessage, SSEParser, follow
from tests.conftest import REPO_ROOT, free_port, wait_for_port
from tests.functions.stream.test_stream import AppServer, collect, collect_into, ev, finished, log_record, publish, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def serve(settings):
    """`await serve(heartbeat_seconds=..., **settings_fields)` -> a started AppServer (stopped at teardown)."""
    servers: list[AppServer] = []

    async def start(heartbeat_seconds: float = 60, **fields) -> AppServer:
        app = stream.create_app(settings.model_copy(update=fields), heartbeat_seconds=heartbeat_seconds)
        server = await AppServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def raw_body(url: str, **headers) -> str:
    """The whole response body (the server ends it after `end`)."""
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    return response.text


def messages_of(body: str) -> list[SSEMessage]:
    return SSEParser().feed(body.encode())


# --- redaction -------------------------------------------------------------------

KNOWN = "stream-only-known-value-4711"  # in the stream's known-secrets file only: the agent does not know it
QUOTED_KNOWN = 'quo"ted\\known-value'  # JSON writes it with escapes: raw-text matching would miss it
UNICODE_KNOWN = "pässwörd-known-value"  # and this one as \\u escapes
PEM_BODY = "MIIEowIBAAKCAQEA7secretKeyMaterial"
LEAKS = {  # what must never reach a client -> the text it is written in
    "sk-proj-" + "Ab3x" * 10: "OPENAI_API_KEY=sk-proj-" + "Ab3x" * 10,
    "sk-ant-api03-" + "Zz9q" * 12: "x-api-key: sk-ant-api03-" + "Zz9q" * 12,
    "ghp_" + "a1B2" * 9: "token ghp_" + "a1B2" * 9,
    "github_pat_11ABCDEFG0" + "x" * 60: "GH_TOKEN=github_pat_11ABCDEFG0" + "x" * 60,
    "AKIAIOSFODNN7EXAMPLE": "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    PEM_BODY: f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----",
    "hunter2-url-password": "git clone https://bob:hunter2-url-password@git.example.com/r.git",
    KNOWN: f"the value is {KNOWN} ok",
}
CUT_PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0cutOff"  # no END line: cut off mid-block


def assert_clean(text: str) -> None:
    for secret in [*LEAKS, QUOTED_KNOWN, json.dumps(QUOTED_KNOWN)[1:-1], UNICODE_KNOWN, "p\\u00e4ssw", "cutOff"]:
        assert secret not in text, f"{secret!r} leaked"
    assert REPLACEMENT in text


@pytest.fixture
def secrets_file(tmp_path) -> Path:
    path = tmp_path / "known-secrets"
    path.write_text(f"{KNOWN}\n{QUOTED_KNOWN}\n{UNICODE_KNOWN}\nab\n")
    return path


async def test_secrets_never_reach_a_client_live_replayed_or_in_task_records(bus, serve, secrets_file):
    server = await serve(known_secrets_file=str(secrets_file))
    task = "t-redact"
    text = "\n".join(LEAKS.values())
    record = new_record(task, task={"prompt": f"use {KNOWN}"}, spec_hash="h", now=now_iso())
    record["termination_message"] = f"failed: {LEAKS['ghp_' + 'a1B2' * 9]} {UNICODE_KNOWN}"
    await bus.registry.create(task, record)
    url = f"{server.url}/api/stream/{task}"

    live = asyncio.create_task(raw_body(url))  # reads through the shared feed
    await asyncio.sleep(0.3)
    seqs = [
        await publish(bus.js, task, ev(task, contract.EV_TOOL, name="execute", stage="end", result=text)),
        await publish(bus.js, task, log_record(task, text)),
        await publish(bus.js, task, log_record(task, f"{QUOTED_KNOWN} and {UNICODE_KNOWN}")),
        await publish(bus.js, task, log_record(task, f"key: {CUT_PEM}")),
        await publish(bus.js, task, {}, raw=f"not JSON: {text}".encode()),  # a producer writing plain text
        await publish(bus.js, task, ev(task, contract.EV_RESULT, summary=f"done with {KNOWN}")),
        await publish(bus.js, task, finished(task)),
    ]
    for body in (await asyncio.wait_for(live, 20), await raw_body(url)):  # the second one replays from NATS
        assert_clean(body)
        messages = messages_of(body)
        assert [m.id for m in messages] == seqs + [None]
        assert messages[0].data["result"].startswith(f"OPENAI_API_KEY={REPLACEMENT}")  # JSON stays JSON
        assert messages[2].data["msg"] == f"{REPLACEMENT} and {REPLACEMENT}"
        assert messages[3].data["msg"] == f"key: {REPLACEMENT}"  # the cut block went, the closing quote stayed
        assert "git clone https://bob:[REDACTED]@git.example.com" in messages[4].data["text"]
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        listed = (await client.get("/api/tasks")).text
        one = (await client.get(f"/api/tasks/{task}")).text
    for body in (listed, one):
        assert KNOWN not in body and UNICODE_KNOWN not in body and "ghp_" not in body and REPLACEMENT in body


async def test_the_known_secrets_file_is_read_again_when_it_changes(bus, serve, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SECRETS_CHECK_SECONDS", 0.0)
    path = tmp_path / "known"
    path.write_text("first-known-secret\n")
    server = await serve(known_secrets_file=str(path))
    task = "t-reload"
    url = f"{server.url}/api/stream/{task}"
    await publish(bus.js, task, log_record(task, "start"))
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(url, received))
    assert await wait_until(lambda: _true(len(received) == 1))

    await publish(bus.js, task, log_record(task, "first-known-secret second-known-secret"))
    assert await wait_until(lambda: _true(len(received) == 2))
    assert received[1].data["msg"] == f"{REPLACEMENT} second-known-secret"

    path.write_text("first-known-secret\nsecond-known-secret\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    await publish(bus.js, task, log_record(task, "again second-known-secret"))
    await publish(bus.js, task, finished(task))
    await asyncio.wait_for(follower, 10)
    assert received[2].data["msg"] == f"again {REPLACEMENT}"
    # A client reading the task again gets the older message redacted with the new values too.
    again = await collect(url)
    assert again[1].data["msg"] == f"{REPLACEMENT} {REPLACEMENT}"


def agent_command(task_id: str, workspace: Path, script: Path, nats_url: str) -> list[str]:
    task_file = workspace.parent / "task.json"
    task_file.write_text(json.dumps({"prompt": "show the notes", "limits": {"deadline_seconds": 120}}))
    return [
        sys.executable, "-m", "agent", "run", "--task-id", task_id, "--workspace", str(workspace),
        "--task-file", str(task_file), "--model", f"scripted:{script}", "--home", str(workspace.parent / "home"),
        "--secrets-dir", str(workspace.parent / "secrets"), "--nats", nats_url,
    ]  # fmt: skip


async def test_a_real_agent_run_leaks_no_secret_to_the_stream(bus, serve, secrets_file, tmp_path, agent_env, nats_server):
    """Secrets echoed by a tool go agent -> NATS -> stream -> client; the client never sees one.

    The agent redacts secret formats itself; the value known only to the stream
    reaches NATS in clear and is stopped by the stream.
    """
    server = await serve(known_secrets_file=str(secrets_file))
    task = "t-agent-leak"
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=now_iso()))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (tmp_path / "secrets").mkdir()
    notes = "\n".join([*LEAKS.values(), CUT_PEM])
    (workspace / "notes.txt").write_text(notes + "\n")
    script = tmp_path / "turns.yaml"
    script.write_text(yaml.safe_dump([
        {"tool_calls": [{"name": "plan", "args": {"todos": ["show"], "objective": "show the notes"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": f"cat notes.txt; echo {KNOWN}; echo 'Bearer {'x1Y2' * 6}'"}}]},
        {"content": f"the notes mention {KNOWN}"},
        {"tool_calls": [{"name": "finish", "args": {"summary": f"shown, incl. {KNOWN}"}}]},
    ]))  # fmt: skip
    url = f"{server.url}/api/stream/{task}"
    live = asyncio.create_task(raw_body(url))
    agent = await asyncio.create_subprocess_exec(
        *agent_command(task, workspace, script, nats_server.url), env=agent_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(agent.communicate(), 80)
    assert agent.returncode == 0, err.decode()[-2000:]

    for body in (await asyncio.wait_for(live, 20), await raw_body(url)):
        assert_clean(body)
        assert "x1Y2" * 6 not in body
        messages = messages_of(body)
        tool_ends = [m for m in messages if m.event == "tool" and m.data.get("stage") == "end"]
        assert tool_ends and REPLACEMENT in json.dumps(tool_ends[0].data)
        assert messages[-1].event == "end"
    # The stream, not the agent, stopped the known value: it is in clear on the bus.
    sub = await bus.js.subscribe(contract.subject_events(task), ordered_consumer=True)
    on_the_bus = []
    while True:
        try:
            on_the_bus.append((await sub.next_msg(timeout=0.5)).data.decode())
        except Exception:
            break
    await sub.unsubscribe()
    assert any(KNOWN in data for data in on_the_bus)


# --- slow and stalled clients ------------------------------------------------------


class RawClient:
    """A GET over a plain socket with a small receive buffer, read only when told to."""

    def __init__(self, port: int, path: str, rcvbuf: int = 4096, headers: dict | None = None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        self.sock.connect(("127.0.0.1", port))
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        self.sock.setblocking(False)
        self.raw = b""
        self.reset = False

    def closed_by_peer(self) -> bool:
        """FIN or RST arrived, whether or not what was sent before it has been read."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    async def read(self, until: bytes | None = None, timeout: float = 10) -> None:
        """Read until `until` is in what was read, or the connection ends, or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (until and until in self.raw):
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except ConnectionResetError:
                self.reset = True
                return
            if not chunk:
                return
            self.raw += chunk

    def body(self) -> tuple[bytes, bool]:
        """(the chunked body decoded so far, whether its last chunk arrived)."""
        head, _, rest = self.raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        body = b""
        while rest:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0:
                return body, True
            body += rest[:size]
            rest = rest[size + 2 :]
        return body, False

    def close(self) -> None:
        self.sock.close()


async def test_a_stalled_client_is_dropped_while_another_gets_everything_promptly(bus, serve):
    server = await serve(stream_send_timeout_seconds=1.0)
    task = "t-stall"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    published: dict[int, float] = {}
    arrived: dict[int, float] = {}
    ids: list[int | None] = []

    async def other() -> None:
        async for message in follow(url, backoff=0.05):
            arrived[message.id] = time.monotonic()
            ids.append(message.id)

    healthy = asyncio.create_task(other())
    stalled = RawClient(server.port, f"/api/stream/{task}")  # sends its request, then never reads
    assert await wait_until(lambda: _true(seqs[0] in arrived))
    padding = "x" * 4000
    for i in range(600):  # ~2.4 MB in ~2 s: far more than the stalled socket's buffers hold
        seq = await publish(bus.js, task, log_record(task, f"record {i} {padding}"))
        published[seq] = time.monotonic()
        seqs.append(seq)
        if i % 10 == 9:
            await asyncio.sleep(0.03)
    assert await wait_until(lambda: _true(stalled.closed_by_peer()), timeout=10)  # closed by the server, unread
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(healthy, 20)

    assert ids == seqs + [None]  # everything, once, in order
    lags = sorted(arrived[s] - published[s] for s in published)
    assert lags[len(lags) // 2] < 0.25 and lags[-1] < 1.5, (lags[len(lags) // 2], lags[-1])

    # What reached the stalled socket before it was dropped, then a resume: no gap, no duplicate.
    await stalled.read(timeout=5)
    stalled.close()
    body, complete = stalled.body()
    assert not complete  # aborted, not ended
    got = [m.id for m in SSEParser().feed(body) if m.id is not None]
    assert got == seqs[: len(got)]
    rest = await collect(url, after=got[-1] if got else None)
    assert got + [m.id for m in rest] == seqs + [None]


async def test_a_client_that_falls_behind_is_cut_cleanly_and_resumes_without_a_gap(bus, serve):
    server = await serve(stream_client_buffer_bytes=64 * 1024, stream_send_timeout_seconds=30)
    task = "t-behind"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    slow = RawClient(server.port, f"/api/stream/{task}")
    await slow.read(until=b"\n\n", timeout=10)  # it had everything: it is live
    await asyncio.sleep(0.2)
    padding = "y" * 4000
    for i in range(300):  # 1.2 MB while it reads nothing
        seqs.append(await publish(bus.js, task, log_record(task, f"record {i} {padding}")))
    await asyncio.sleep(0.5)
    await slow.read(until=b"\r\n0\r\n\r\n", timeout=20)  # it reads again: the server ends the response
    slow.close()
    body, complete = slow.body()
    assert complete, body[-300:]
    assert b": fell behind the live tail: resume with Last-Event-ID" in body and b"event: end" not in body
    got = [m.id for m in SSEParser().feed(body) if m.id is not None]
    assert 1 <= len(got) < len(seqs) and got == seqs[: len(got)]

    seqs.append(await publish(bus.js, task, finished(task)))
    rest = await collect(f"{server.url}/api/stream/{task}", after=got[-1])
    assert got + [m.id for m in rest] == seqs + [None]


# --- max duration and shutdown -------------------------------------------------------


async def test_a_response_ends_cleanly_after_the_max_duration_and_the_client_resumes(bus, serve):
    server = await serve(stream_max_seconds=1.0, heartbeat_seconds=0.3)
    task = "t-max"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, log_record(task, "first"))]
    started = time.monotonic()
    body = await raw_body(url)  # no terminal event: the server ends it by itself
    assert 0.85 <= time.monotonic() - started < 2.0
    assert body.endswith(": max-duration: resume with Last-Event-ID\n\n")
    assert [m.id for m in messages_of(body)] == seqs

    requests = []
    client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=5), event_hooks={"request": [lambda r: _record(requests, r)]})
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(url, received, client=client))
    for i in range(100):  # ~3 s of messages: at least two cuts
        seqs.append(await publish(bus.js, task, log_record(task, f"line {i}")))
        await asyncio.sleep(0.03)
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(follower, 20)
    await client.aclose()
    assert [m.id for m in received] == seqs + [None]
    assert len(requests) >= 3


async def _record(into: list, request) -> None:
    into.append(request.headers.get("last-event-id"))


class AppProcess:
    """The stream app under uvicorn in a child process, the way it is deployed; SIGTERM stops it."""

    def __init__(self, nats_url: str, data_dir: Path, log_file: Path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DOCKYARD_NATS_URL": nats_url, "DOCKYARD_DATA_DIR": str(data_dir), **env}
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AppProcess":
        command = [sys.executable, "-m", "uvicorn", "--factory", "functions.stream.app:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        with open(self.log_file, "ab") as log_file:
            self.proc = subprocess.Popen(command, env=self.env, cwd=REPO_ROOT, stdout=log_file, stderr=log_file)
        wait_for_port(self.port, timeout=20)
        return self

    def terminate(self, timeout: float = 30) -> float:
        """SIGTERM; seconds until the process exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def test_followers_get_everything_once_across_a_server_shutdown_and_restart(bus, settings, tmp_path):
    log_file = tmp_path / "app.log"
    app = AppProcess(settings.nats_url, tmp_path / "data", log_file, DOCKYARD_STREAM_MAX_PER_IP="0").start()
    task = "t-shutdown"
    url = f"{app.url}/api/stream/{task}"
    try:
        seqs = [await publish(bus.js, task, log_record(task, "first"))]
        lists: list[list[SSEMessage]] = [[] for _ in range(3)]
        followers = [asyncio.create_task(collect_into(url, into, read_timeout=5, max_retries=None)) for into in lists]
        assert await wait_until(lambda: _true(all(len(into) == 1 for into in lists)), timeout=20)

        async def publish_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                seqs.append(await publish(bus.js, task, log_record(task, f"record {len(seqs)}")))
                await asyncio.sleep(0.01)

        await publish_for(0.5)
        publishing = asyncio.create_task(publish_for(1.0))
        took = await asyncio.to_thread(app.terminate)  # open streams end at once: no graceful timeout needed
        assert took < 3.0, f"shutdown took {took:.1f}s with streams open"
        await publishing
        app.start()  # the same port
        await publish_for(0.5)
        seqs.append(await publish(bus.js, task, finished(task)))
        await asyncio.wait_for(asyncio.gather(*followers), 30)
    finally:
        app.kill()
    for into in lists:
        assert [m.id for m in into] == seqs + [None]
    output = log_file.read_text()
    assert "without completing response" not in output and "Exception in ASGI" not in output, output


# --- limits --------------------------------------------------------------------------


async def test_streams_per_address_are_capped_with_429_and_retry_after(bus, serve):
    server = await serve(stream_max_per_ip=2)
    task = "t-cap"
    await publish(bus.js, task, log_record(task, "hi"))
    url = f"{server.url}/api/stream/{task}"
    async with httpx.AsyncClient(timeout=5) as client:
        held = [client.stream("GET", url) for _ in range(2)]
        for cm in held:
            assert (await cm.__aenter__()).status_code == 200
        refused = await client.get(url)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(stream.RETRY_AFTER_SECONDS)
        assert refused.json()["field"] == "client" and "127.0.0.1" in refused.json()["error"]
        assert (await client.get(f"{server.url}/api/tasks")).status_code == 200  # listings are not streams
        await held[0].__aexit__(None, None, None)  # one closes: a new one is let in

        async def admitted() -> bool:
            async with client.stream("GET", url) as response:
                return response.status_code == 200

        assert await wait_until(admitted, timeout=5)
        await held[1].__aexit__(None, None, None)


async def test_cors_lets_configured_origins_read_and_resume(bus, serve):
    task = "t-cors"
    await publish(bus.js, task, log_record(task, "hi"))
    await publish(bus.js, task, finished(task))
    plain = await serve()
    server = await serve(cors_origins=("https://cockpit.example",))
    async with httpx.AsyncClient(timeout=5) as client:
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


def leveled(task_id: str, level: str, msg: str) -> dict:
    return {**log_record(task_id, msg), "level": level}


async def test_filters_send_only_what_was_asked_and_resume_exactly(bus, serve, monkeypatch):
    monkeypatch.setattr(stream, "MAX_FEED_FRAMES", 4)  # late readers catch up on their own consumer: both paths
    server = await serve()
    task = "t-filter"
    url = f"{server.url}/api/stream/{task}"
    bodies = [
        ev(task, contract.EV_STATUS, state=contract.STATE_STARTED),
        leveled(task, "DEBUG", "d"),
        leveled(task, "INFO", "i"),
        ev(task, contract.EV_PHASE, phase=contract.PHASE_STRATEGIC),
        leveled(task, "WARNING", "w"),
        ev(task, contract.EV_TOOL, name="execute", stage="start"),
        leveled(task, "ERROR", "e"),
        ev(task, contract.EV_TODO, todos=["x"]),
        {**log_record(task, "no level"), "level": None},
        ev(task, contract.EV_TOOL, name="execute", stage="end"),
        leveled(task, "CRITICAL", "c"),
    ]
    cases = {
        "types=events": lambda b: "type" in b,
        "types=logs": lambda b: "type" not in b,
        "types=phase,tool": lambda b: b.get("type") in ("phase", "tool"),
        "level=warning": lambda b: "type" in b or b["level"] in ("WARNING", "ERROR", "CRITICAL"),
        "types=logs,tool&level=ERROR": lambda b: b.get("type") == "tool" or b.get("level") in ("ERROR", "CRITICAL"),
        "types=todo,logs&level=info": lambda b: b.get("type") == "todo" or ("type" not in b and b["level"] != "DEBUG"),
    }
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=now_iso()))
    live = {query: [] for query in cases}
    followers = [asyncio.create_task(collect_into(f"{url}?{q}", into)) for q, into in live.items()]
    # Each filtered client starts with an empty stream: only heartbeats until something passes.
    seqs = [await publish(bus.js, task, body) for body in bodies]
    seqs.append(await publish(bus.js, task, finished(task)))
    bodies.append(finished(task))
    await asyncio.wait_for(asyncio.gather(*followers), 20)

    for query, wanted in cases.items():
        expected = [seq for seq, body in zip(seqs, bodies) if wanted(body)]
        assert [m.id for m in live[query]] == expected + [None], query  # `end` whatever the filter
        assert [m.id for m in await collect(f"{url}?{query}")] == expected + [None], query
        for after in seqs[:-1]:  # resuming anywhere, also where the next messages are filtered out
            resumed = await collect(f"{url}?{query}", after=after)
            assert [m.id for m in resumed] == [s for s in expected if s > after] + [None], (query, after)

    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        for query, field in (("types=phse", "types"), ("types=", "types"), ("level=loud", "level")):
            response = await client.get(f"/api/stream/{task}?{query}")
            assert (response.status_code, response.json()["field"]) == (400, field), query
        assert "phase" in (await client.get(f"/api/stream/{task}?types=phse")).json()["error"]


async def _true(value: bool) -> bool:
    return value


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
