"""What the stream tests share: the app under uvicorn, publishing, reading SSE, a raw slow client."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time

import httpx
import uvicorn

from agent import contract
from functions.cli.sse_client import SSEMessage, SSEParser, follow
from functions.stream.auth import token_line
from tests.conftest import eventually_async, free_port

# The API tokens of the stream tests (the `settings` fixture of conftest.py writes their tokens file).
WRITE_TOKEN, READ_TOKEN = "dy_test-write-token", "dy_test-read-token"
AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}
READ_AUTH = {"Authorization": f"Bearer {READ_TOKEN}"}


def write_tokens_file(path) -> str:
    """A tokens file with the write token `tests` and the read token `reader`; its path."""
    path.write_text(f"{token_line('tests', 'write', WRITE_TOKEN)}\n{token_line('reader', 'read', READ_TOKEN)}\n")
    return str(path)


class AppServer:
    """An app (the stream app, or a stand-in) under uvicorn in this event loop; stop() and start() again on the same port."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> AppServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())

        def started() -> bool:
            if self._task.done():
                self._task.result()  # it failed: say why
            return self._server.started

        await eventually_async(started, f"uvicorn serves on port {self.port}")
        return self

    async def stop(self) -> None:
        """Stop the way a SIGTERM does: open streams end, then the server exits."""
        if self._server is not None:
            if hasattr(self.app, "end_streams"):
                self.app.end_streams()
            self._server.should_exit = True
            await self._task
            self._server = None

    def feed(self, task_id: str):
        """The app's feed of the task, if a client follows it."""
        return self.app.feeds.get(task_id)


def replace_settings(settings, **fields):
    """A copy of `settings` with `fields` changed."""
    return settings.model_copy(update=fields)


# --- publishing -------------------------------------------------------------------------


def ev(task_id: str, type_: str, **fields) -> dict:
    return {"type": type_, "task_id": task_id, "ts": contract.iso_utc(), **fields}


def log_record(task_id: str, msg: str, level: str = "INFO") -> dict:
    return {"ts": contract.iso_utc(), "level": level, "logger": "agent", "msg": msg, "task_id": task_id}


def finished(task_id: str) -> dict:
    return ev(task_id, contract.EV_STATUS, state=contract.STATE_FINISHED, outcome=contract.OUTCOME_DONE)


async def publish(js, task_id: str, body: dict, raw: bytes | None = None) -> int:
    """Publish an event (body has "type") or a log record; returns its stream sequence."""
    subject = contract.subject_events(task_id) if "type" in body else contract.subject_logs(task_id)
    return (await js.publish(subject, raw if raw is not None else json.dumps(body).encode())).seq


async def publish_when_back(js, task_id: str, body: dict) -> int:
    """Publish once JetStream answers again; Nats-Msg-Id makes a retried publish land once."""
    msg_id = f"{task_id}-{body.get('msg') or body.get('state')}"
    subject = contract.subject_events(task_id) if "type" in body else contract.subject_logs(task_id)

    async def attempt():
        try:
            return (await js.publish(subject, json.dumps(body).encode(), timeout=1, headers={"Nats-Msg-Id": msg_id})).seq
        except Exception:  # NATS not back yet
            return None

    return await eventually_async(attempt, f"JetStream takes a message for {task_id} again")


async def consumer_count(js) -> int:
    return len(await js.consumers_info(contract.STREAM_NAME))


# --- reading ------------------------------------------------------------------------------


async def collect(url: str, after: int | None = None, **kwargs) -> list[SSEMessage]:
    """Every message of a followed task through `end` (follow() resumes by itself after a cut)."""
    kwargs.setdefault("headers", AUTH)
    return [m async for m in follow(url, after, backoff=0.05, **kwargs)]


async def collect_into(url: str, into: list, after: int | None = None, **kwargs) -> None:
    kwargs.setdefault("headers", AUTH)
    async for message in follow(url, after, backoff=0.05, **kwargs):
        into.append(message)


async def raw_body(url: str, **headers) -> str:
    """The whole response body (the server ends it after `end`)."""
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.get(url, headers={**AUTH, **headers})
    assert response.status_code == 200, response.text
    return response.text


def messages_of(body: str | bytes) -> list[SSEMessage]:
    return SSEParser().feed(body if isinstance(body, bytes) else body.encode())


class OpenStream:
    """A GET of a stream held open after its first message; the line iterator is kept so nothing closes it early.

    (An abandoned `aiter_lines()` generator is closed whenever the garbage
    collector gets to it, and closing it closes the connection.)
    """

    def __init__(self, client: httpx.AsyncClient, url: str):
        self._cm = client.stream("GET", url, headers=AUTH)
        self.response: httpx.Response | None = None
        self._lines = None

    async def first_message(self) -> OpenStream:
        self.response = await self._cm.__aenter__()
        self._lines = self.response.aiter_lines()
        while (await anext(self._lines)) != "":
            pass
        return self

    async def close(self) -> None:
        await self._lines.aclose()
        await self._cm.__aexit__(None, None, None)


class RawClient:
    """A GET over a plain socket with a small receive buffer, read only when told to."""

    def __init__(self, port: int, path: str, rcvbuf: int = 4096, headers: dict | None = None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        self.sock.connect(("127.0.0.1", port))
        extra = "".join(f"{k}: {v}\r\n" for k, v in {**AUTH, **(headers or {})}.items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        self.sock.setblocking(False)
        self.raw = b""
        self.reset = False

    def closed_by_peer(self) -> bool:
        """FIN or RST arrived, whether or not what was sent before it has been read."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    async def read(self, until: bytes | None = None, timeout: float = 30) -> None:
        """Read until `until` is in what was read, or the connection ends, or `timeout` (a bound, not a pace)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while not (until and until in self.raw):
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
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
