"""Lost acks, decided by the test: a TCP link between the agent and nats-server that swallows replies.

While the link swallows what the server sends, every record reaches the stream
but no ack reaches the agent. Whether a record was stored and unacknowledged is
then a fact the test sets up, not a race: the resend after a reconnect must put
each record in the stream exactly once (the duplicate window drops the copies),
in order.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import nats
import pytest
from nats.js.api import StreamConfig

from agent import contract
from agent.telemetry import Telemetry
from functions.core.bus import ensure_stream
from tests.conftest import eventually, nats_options
from tests.agent.agent_stream import read_stream

TASK = "t-acks"


class Link:
    """A TCP proxy to `upstream_port`. `swallow_replies()` drops, from then on, everything the server
    sends on the connections open now (new connections pass normally); `cut()` closes those."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[dict] = []
        self.accepted = 0
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            conn = {"client": client, "upstream": upstream, "swallow": False}
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(conn, client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, upstream, client, True), daemon=True).start()

    def _pump(self, conn: dict, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_server and conn["swallow"]:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(conn)

    def _close(self, conn: dict) -> None:
        for sock in (conn["client"], conn["upstream"]):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def swallow_replies(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn["swallow"] = True

    def cut(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            self._close(conn)

    def close(self) -> None:
        self._listener.close()
        self.cut()


@pytest.fixture
def link(nats_server):
    proxy = Link(nats_server.port)
    yield proxy
    proxy.close()


def stored_count(url: str) -> int:
    async def main():
        nc = await nats.connect(url, **nats_options(url))
        try:
            return (await nc.jetstream().stream_info(contract.STREAM_NAME)).state.messages
        finally:
            await nc.close()

    return asyncio.run(main())


def test_stored_but_unacknowledged_records_are_resent_and_deduplicated(nats_server, link):
    nats_server.create_agent_stream()  # the link swallows replies: the 503 that would have the agent create it too
    tel = Telemetry(TASK, link.url, auth=nats_server.agent_auth).start()
    eventually(lambda: tel.connected, "connected through the link")
    link.swallow_replies()
    total = 500
    for i in range(total):
        tel.event(contract.EV_TOOL, step=i)
    eventually(lambda: stored_count(nats_server.url) == total, "every record stored, no ack delivered")
    assert tel.published == 0 and tel.stats()["inflight"] == total

    link.cut()  # the agent reconnects and sends all 500 again with their original Nats-Msg-Id
    eventually(lambda: tel.published == total, "all records acknowledged after the reconnect")
    tel.close()

    messages = [(body, headers) for _, body, headers in read_stream(nats_server.url)]
    assert [body["step"] for body, _ in messages] == list(range(total))  # once each, in order
    assert len({headers["Nats-Msg-Id"] for _, headers in messages}) == total
    assert tel.resent >= total and tel.reconnects >= 1 and tel.written_stdout == 0 and tel.failed == 0


def test_ack_timeout_drops_the_connection_and_resends(nats_server, link):
    tel = Telemetry(TASK, link.url, auth=nats_server.agent_auth, ack_timeout=0.5).start()
    log = logging.getLogger(f"dockyard.test.acks.{time.monotonic_ns()}")
    log.propagate = False
    log.addHandler(tel.log_handler())
    eventually(lambda: tel.connected, "connected through the link")
    connections = link.accepted
    link.swallow_replies()  # the connection stays up, silently: only the missing acks tell
    for i in range(200):
        log.warning("n %d", i)
    eventually(lambda: link.accepted > connections, "a new connection after the ack timeout")
    tel.close()
    numbers = [int(body["msg"].split()[1]) for body, _ in [(body, headers) for _, body, headers in read_stream(nats_server.url)]]
    assert numbers == list(range(200))
    assert tel.published == 200 and tel.resent > 0 and tel.reconnects >= 1


def test_the_agent_and_the_functions_create_the_same_stream(nats_server):
    """contract.AGENT_STREAM is the one definition: each side finds the other's stream identical."""

    async def functions_first():
        nc = await nats_server.connect()
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            # The agent's create call on top: the server answers an identical config with success
            # and a different one with error 10058.
            await js.add_stream(StreamConfig(**contract.AGENT_STREAM.config()))
            return (await js.stream_info(contract.STREAM_NAME)).config
        finally:
            await nc.close()

    config = asyncio.run(functions_first())
    assert config.duplicate_window == contract.AGENT_STREAM.duplicate_window_seconds
    assert config.max_age == contract.AGENT_STREAM.max_age_seconds
    assert sorted(config.subjects) == sorted(contract.AGENT_STREAM.subjects)

    async def recreate_by_the_agent():
        nc = await nats_server.connect()
        try:
            await nc.jetstream().delete_stream(contract.STREAM_NAME)
        finally:
            await nc.close()

    asyncio.run(recreate_by_the_agent())
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    tel.event(contract.EV_STATUS, step=0)
    tel.close()
    assert tel.published == 1 and tel.last_error is None

    async def then_functions():
        nc = await nats_server.connect()
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(**contract.AGENT_STREAM.config()))  # identical: no 10058
            return (await js.stream_info(contract.STREAM_NAME)).config
        finally:
            await nc.close()

    assert asyncio.run(then_functions()) == config
