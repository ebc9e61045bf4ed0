"""The agent's trace: events and log records to NATS JetStream, never in the agent's way.

The agent's loop is synchronous; all NATS work happens on one daemon thread that
runs its own asyncio loop. Invariants:

* Never blocks the agent. `Telemetry.event` and the handler returned by
  `Telemetry.log_handler` only append a small tuple to a deque (plus, when the
  publisher sleeps, one `call_soon_threadsafe` to wake it). JSON encoding,
  redaction of log text, network I/O and stdout writes happen on the telemetry
  thread. `bench/bench_logs.py` measures the cost on the caller's thread.
* Bounded buffer, counted drops. At most `buffer_size` records wait in the
  queue; a record that finds it full is dropped and counted (`dropped`).
  Records sent but not yet acknowledged are held apart, at most `ACK_WINDOW`.
* Ordered. Everything one instance publishes reaches the stream in the order
  it was enqueued, events and logs interleaved: one thread sends on one
  connection, and the server stores one connection's messages in the order it
  reads them. After a reconnect or an ack timeout every unacknowledged record
  is sent again, in order, with its original `Nats-Msg-Id` header
  (`<instance>-<seq>`), so the stream's duplicate window drops those that had
  been stored already. (One exception: a record the server rejects with an
  error ack while it accepts later ones lands after them when retried; its
  `Nats-Msg-Id` still carries its original sequence.)
* Lossless publishing: JetStream publishes with pipelined acks. Every message
  carries a reply subject under one wildcard inbox; up to `ACK_WINDOW` are in
  flight; a record leaves memory only when the stream has acknowledged it.
  Plain core publishes are not lossless: bursts of 1,000,000 core
  `nc.publish` calls into the stream's subjects left 14-37% of them out of the
  stream (the server's ingest queue overflowed and said nothing; 200,000 went
  through whole, so the loss depends on load), while every acked variant
  stored all of them.
  The acked path is spoken by a small NATS protocol client in this module
  (`_Wire`: CONNECT, SUB, HPUB, PING/PONG, MSG/HMSG parsing, acks parsed in
  bulk) instead of nats-py, because of CPU. Measured on the 2-core dev
  machine, 200,000 records, publisher thread alone: nats-py's
  `js.publish_async` 23,000-34,000 records/s for publish+ack only (no
  encoding); the first version of this module on nats-py (encode + redact +
  `nc.publish` with a reply subject + acks through a nats-py subscription)
  28,000 records/s; `_Wire` with everything 73,000-131,000 records/s. The
  agent's own thread shares the GIL, so only the latter sustains 50,000
  records/s (bench/bench_logs.py: 150,000 records at ~50,000/s, 0 lost).
  `_Wire` supports `nats://` and `tls://` URLs with user:password or token
  credentials in the URL; nkeys/JWT credentials files are not supported.
* NATS down is not an error. Without `nats_url`, while NATS has never been
  reached since start, or after an outage longer than `hold_seconds`, records
  are written to stdout as JSON lines (one per line, in order) so a local run
  still shows its trace. A shorter outage after a working connection holds the
  records and delivers them after the reconnect.
* Flush at exit. `close()` publishes everything queued, waits for the acks,
  flushes, closes the connection and stops the thread within its timeout;
  whatever could not reach NATS by then is written to stdout. `start()` also
  registers a close at interpreter exit, for a caller that forgot.
* Redaction before publishing. Event fields are redacted on the caller's thread
  (which also copies them, so later mutation cannot leak); log text is
  redacted on the telemetry thread before encoding. Command replies too.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import re
import ssl
import sys
import threading
import time
import uuid
import weakref
from json.encoder import encode_basestring_ascii as _jstr
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from agent import contract
from agent.redact import Redactor

ACK_WINDOW = 2048  # records sent and not yet acknowledged, per connection
ACK_TIMEOUT = 5.0  # no ack for the oldest record this long: drop the connection, reconnect, resend
MAX_ERROR_ATTEMPTS = 5  # error acks for one record before it is given up (written to stdout, counted as failed)
CONNECT_TIMEOUT = 1.0
REQUEST_TIMEOUT = 2.0
RECONNECT_MAX_WAIT = 2.0
PING_INTERVAL = 20.0
MAX_STRING = 64 * 1024  # longer strings in a record are cut (tools cap output anyway)
DUPLICATE_WINDOW_SECONDS = 120
_TICK = 0.25
_SEND_BATCH = 256

_LOG = 0
_EVENT = 1

_SID_ACK = 1
_SID_CMD = 2
_SID_API = 3


iso_utc = contract.iso_utc


class _TsCache:
    """iso_utc with the per-second prefix cached (records come in bursts within one second)."""

    __slots__ = ("sec", "prefix")

    def __init__(self) -> None:
        self.sec = -1
        self.prefix = ""

    def __call__(self, ts: float) -> str:
        sec = int(ts)
        if sec != self.sec:
            self.sec = sec
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self.prefix}.{int((ts - sec) * 1000):03d}Z"


def _cut(value: str) -> str:
    if len(value) > MAX_STRING:
        return value[:MAX_STRING] + f"...[truncated {len(value) - MAX_STRING} chars]"
    return value


_EXC_FORMATTER = logging.Formatter()


class _Handler(logging.Handler):
    """Enqueues (created, level, logger, message, exception text); everything else happens later."""

    def __init__(self, telemetry: "Telemetry", level: int):
        super().__init__(level)
        self._telemetry = telemetry

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            exc = None
            if record.exc_info:
                exc = record.exc_text or (self.formatter or _EXC_FORMATTER).formatException(record.exc_info)
            if record.stack_info:
                exc = f"{exc}\n{record.stack_info}" if exc else record.stack_info
            self._telemetry._put((_LOG, record.created, record.levelname, record.name, msg, exc))
        except Exception:
            self.handleError(record)


class _WireError(Exception):
    pass


class _Wire(asyncio.Protocol):
    """A minimal NATS protocol connection: enough to publish with acks, subscribe and answer requests.

    Incoming messages are dispatched synchronously from `data_received` to the handler
    registered for their subscription id: handler(subject, reply, headers, payload).
    """

    def __init__(self, on_lost: Callable[[], None]):
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handlers: dict[int, Callable[[bytes, bytes, bytes | None, bytes], None]] = {}
        self.info: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pongs: collections.deque = collections.deque()
        self.pings_out = 0
        self.closed = False
        self.error: str | None = None
        self.max_payload = 1024 * 1024
        self._writable = asyncio.Event()
        self._writable.set()
        self._on_lost = on_lost
        # Fast path for publish acks (plain MSG on sid 1 under one prefix): ack_re matches the
        # control line; on_ack(seq, ok) per ack, then on_acks_done() once per read.
        self.ack_re: re.Pattern | None = None
        self.on_ack: Callable[[int, bool], None] | None = None
        self.on_acks_done: Callable[[], None] | None = None

    def set_ack_prefix(self, prefix: bytes, sid: int, on_ack, on_acks_done) -> None:
        self.ack_re = re.compile(rb"MSG " + re.escape(prefix) + rb"(\d+) " + str(sid).encode() + rb" (\d+)\r\n")
        self.on_ack = on_ack
        self.on_acks_done = on_acks_done

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if exc is not None and self.error is None:
            self.error = repr(exc)
        if not self.info.done():
            self.info.set_exception(_WireError(self.error or "connection closed"))
        while self.pongs:
            fut = self.pongs.popleft()
            if not fut.done():
                fut.set_exception(_WireError(self.error or "connection closed"))
        self._writable.set()
        self._on_lost()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        n = len(buf)
        handlers = self.handlers
        ack_match = self.ack_re.match if self.ack_re is not None else None
        acks = 0
        while pos < n:
            if ack_match is not None:
                m = ack_match(buf, pos)
                if m is not None:
                    start = m.end()
                    size = int(m.group(2))
                    if start + size + 2 > n:
                        break  # wait for the rest of the payload
                    ok = size > 0 and buf.find(b'"error"', start, start + size) < 0
                    try:
                        self.on_ack(int(m.group(1)), ok, None if ok else bytes(buf[start:start + size]))
                    except Exception as exc:
                        self.error = f"ack handler: {exc!r}"
                    acks += 1
                    pos = start + size + 2
                    continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            op = buf[pos:pos + 4]
            if op == b"MSG " or op == b"HMSG":
                args = bytes(buf[pos + (4 if op == b"MSG " else 5):eol]).split()
                if op == b"MSG ":
                    hsize, size = 0, int(args[-1])
                else:
                    hsize, size = int(args[-2]), int(args[-1])
                    args = args[:-1]
                end = eol + 2 + size + 2
                if end > n:
                    break  # wait for the rest of the payload
                start = eol + 2
                headers = bytes(buf[start:start + hsize]) if hsize else None
                payload = bytes(buf[start + hsize:start + size])
                pos = end
                handler = handlers.get(int(args[1]))
                if handler is not None:
                    try:
                        handler(args[0], args[2] if len(args) == 4 else b"", headers, payload)
                    except Exception as exc:  # a handler bug must not kill the connection
                        self.error = f"handler: {exc!r}"
                continue
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if line == b"PING":
                self.write(b"PONG\r\n")
            elif line == b"PONG":
                self.pings_out = 0
                if self.pongs:
                    fut = self.pongs.popleft()
                    if not fut.done():
                        fut.set_result(True)
            elif line.startswith(b"INFO "):
                try:
                    info = json.loads(line[5:])
                except ValueError:
                    info = {}
                self.max_payload = int(info.get("max_payload", self.max_payload))
                if not self.info.done():
                    self.info.set_result(info)
            elif line.startswith(b"-ERR"):
                self.error = line[5:].decode(errors="replace").strip(" '")
                # The server closes the connection after fatal errors; an outstanding ping fails with it.
            # +OK and anything unknown: ignore
        if pos:
            del buf[:pos]
        if acks and self.on_acks_done is not None:
            self.on_acks_done()

    # writing
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()

    async def ping(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.pongs.append(fut)
        self.write(b"PING\r\n")
        await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _close_at_exit(ref: "weakref.ref[Telemetry]") -> None:
    telemetry = ref()
    if telemetry is not None:
        telemetry.close(timeout=2.0)


def _server_list(nats_url: str | None) -> list[str]:
    if not nats_url:
        return []
    return [u.strip() for u in nats_url.split(",") if u.strip()]


class Telemetry:
    """Publishes a task's events and log records to NATS JetStream from a background thread.

    Usage::

        tel = Telemetry(task_id, nats_url, Redactor.from_secrets_dir(contract.SECRETS_DIR))
        tel.start()
        logging.getLogger().addHandler(tel.log_handler())
        tel.on_command(handle_command)       # quick, thread-safe; return a dict to reply
        tel.event(contract.EV_PHASE, phase=contract.PHASE_STRATEGIC)
        ...
        tel.close()
    """

    def __init__(
        self,
        task_id: str,
        nats_url: str | None,
        redactor: Redactor | None = None,
        buffer_size: int = 100_000,
        stream_max_age_seconds: int = contract.STREAM_MAX_AGE_SECONDS,
        hold_seconds: float = 30.0,
    ):
        self.task_id = task_id
        self.nats_url = nats_url or None
        self.redactor = redactor or Redactor()
        self.buffer_size = buffer_size
        self.stream_max_age_seconds = stream_max_age_seconds
        self.hold_seconds = hold_seconds
        self._servers = _server_list(nats_url)
        self._subject_events = contract.subject_events(task_id).encode()
        self._subject_logs = contract.subject_logs(task_id).encode()
        self._subject_cmd = contract.subject_cmd(task_id).encode()
        self._task_json = _jstr(task_id)

        # Shared between threads: appends on callers' threads, pops on the telemetry thread.
        self._q: collections.deque = collections.deque()
        self._idle = False  # the publisher sleeps waiting for records: wake it on the next put
        self._drop_lock = threading.Lock()
        self._dropped = 0
        self._lock = threading.Lock()  # start/close
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed = False
        self._close_deadline = 0.0
        self._cmd_callback: Callable[[dict], dict | None] | None = None

        # Telemetry thread only.
        self._instance = uuid.uuid4().hex[:12].encode()
        self._seq = 0
        # In flight, in send order, consecutive seqs: [seq, subject, data, sent_at, state, errors];
        # state 0 sent, 1 acked, 2 given up.
        self._inflight: collections.deque = collections.deque()
        self._kick: asyncio.Event | None = None
        self._window_wait = False
        self._resend_at: float | None = None
        self._need_stream = False
        self._wire: _Wire | None = None
        self._ack_prefix = b""
        self._ack_plen = 0
        self._api_waiters: dict[bytes, asyncio.Future] = {}
        self._api_prefix = b""
        self._connected = False
        self._ever_connected = False
        self._down_since = time.monotonic()
        self._encoder = json.JSONEncoder(default=str, separators=(",", ":"))
        self._ts = _TsCache()

        # Counters (written on the telemetry thread; read anywhere).
        self.published = 0  # acknowledged by the stream
        self.written_stdout = 0  # records written to stdout instead of NATS
        self.failed = 0  # given up after repeated error acks (also written to stdout)
        self.resent = 0  # records sent again after a reconnect, timeout or error ack
        self.reconnects = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public API

    @property
    def dropped(self) -> int:
        """Records dropped because the buffer was full."""
        return self._dropped

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self._q),
            "inflight": len(self._inflight),
            "published": self.published,
            "dropped": self._dropped,
            "written_stdout": self.written_stdout,
            "failed": self.failed,
            "resent": self.resent,
            "reconnects": self.reconnects,
            "connected": self._connected,
            "last_error": self.last_error,
        }

    def start(self) -> "Telemetry":
        """Start the telemetry thread; returns at once (connecting happens in the background)."""
        with self._lock:
            if self._thread is not None or self._closing:
                return self
            self._thread = threading.Thread(target=self._thread_main, name=f"telemetry-{self.task_id}", daemon=True)
            self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))
        return self

    def event(self, type: str, **fields: Any) -> None:
        """Queue an event for events.agent.<id>. Never blocks; dropped (counted) when the buffer is full."""
        body = {"type": type, "task_id": self.task_id, "ts": iso_utc(time.time())}
        body.update(fields)
        self._put((_EVENT, self.redactor.redact_obj(body)))

    def log_handler(self, level: int = logging.INFO) -> logging.Handler:
        """A logging.Handler that publishes JSON records to logs.agent.<id>."""
        return _Handler(self, level)

    def on_command(self, callback: Callable[[dict], dict | None]) -> None:
        """Serve cmd.agent.<id>: `callback(request)` runs on the telemetry thread; a dict return is the reply.

        Bad JSON gets `{"ok": false, "error": ...}`; an exception in the callback too. A None
        return sends no reply (another subscriber answers, e.g. the snapshotter for
        `op: snapshot`). Calling again replaces the callback. Works before or after start()
        and across reconnects.
        """
        self._cmd_callback = callback
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._subscribe_cmd)
            except RuntimeError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Publish everything queued, flush and close the connection, stop the thread. Idempotent."""
        with self._lock:
            first = not self._closing
            if first:
                self._closing = True
                self._close_deadline = time.monotonic() + max(0.0, timeout * 0.9)
            thread = self._thread
        if thread is None:
            if first:  # never started: nothing can reach NATS any more, keep the trace on stdout
                self._write_stdout_items(self._pop_all())
                self._closed = True
            return
        self._wake()
        if thread is not threading.current_thread():
            thread.join(max(0.0, self._close_deadline - time.monotonic()) + max(0.2, timeout * 0.1))
        self._closed = True

    # ------------------------------------------------------------------ callers' side

    def _put(self, item: tuple) -> None:
        q = self._q
        if len(q) >= self.buffer_size:
            with self._drop_lock:
                self._dropped += 1
            return
        if self._closed:
            # After close(): nothing publishes any more; do not lose the record silently.
            self._write_stdout_items([item])
            return
        q.append(item)
        if self._idle:
            self._idle = False
            self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._kick_set)
            except RuntimeError:  # loop closed
                pass

    def _kick_set(self) -> None:
        if self._kick is not None:
            self._kick.set()

    # ------------------------------------------------------------------ encoding

    def _encode(self, item: tuple) -> tuple[bytes, bytes]:
        if item[0] == _LOG:
            _, created, level, name, msg, exc = item
            redact = self.redactor.redact
            if exc:
                tail = ',"exc":%s}' % _jstr(_cut(redact(exc)))
            else:
                tail = "}"
            data = '{"ts":"%s","level":%s,"logger":%s,"msg":%s,"task_id":%s%s' % (
                self._ts(created), _jstr(level), _jstr(name), _jstr(_cut(redact(msg))), self._task_json, tail)
            return self._subject_logs, data.encode()
        body = item[1]
        for key, value in body.items():
            if isinstance(value, str) and len(value) > MAX_STRING:
                body[key] = _cut(value)
        try:
            data = self._encoder.encode(body)
        except (TypeError, ValueError) as exc:  # e.g. a circular structure
            data = self._encoder.encode({k: body.get(k) for k in ("type", "task_id", "ts")}
                                        | {"error": f"unencodable event: {exc}"})
        limit = self._wire.max_payload - 1024 if self._wire is not None else 1024 * 1024 - 1024
        if len(data) > limit:
            data = self._encoder.encode({k: body.get(k) for k in ("type", "task_id", "ts")}
                                        | {"truncated": True, "bytes": len(data)})
        return self._subject_events, data.encode()

    def _pop_all(self) -> list:
        items = []
        q = self._q
        while True:
            try:
                items.append(q.popleft())
            except IndexError:
                return items

    def _write_stdout_items(self, items: list) -> None:
        lines = []
        for item in items:
            try:
                lines.append(self._encode(item)[1].decode())
            except Exception:  # never let one weird record stop the trace
                continue
        self._write_stdout_lines(lines)

    def _write_stdout_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            out = sys.stdout
            out.write("\n".join(lines) + "\n")
            out.flush()
        except Exception:
            pass
        self.written_stdout += len(lines)

    def _spill_to_stdout(self) -> None:
        """Write whatever is in flight (oldest first) and queued to stdout, in order."""
        if self._inflight:
            self._write_stdout_lines([e[2].decode() for e in self._inflight])
            self._inflight.clear()
        self._write_stdout_items(self._pop_all())

    # ------------------------------------------------------------------ telemetry thread

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException as exc:  # a bug here must not take the agent down; keep the trace
            self.last_error = f"telemetry thread failed: {exc!r}"
            try:
                self._spill_to_stdout()
            except Exception:
                pass
        finally:
            self._loop = None
            self._connected = False
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:
                pass
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._kick = asyncio.Event()
        self._loop = loop
        backoff = 0.05
        server_index = 0
        while True:
            wire = None
            # While closing, try once more only if NATS was up before (or was never tried yet).
            if self._servers and not (self._closing and not self._ever_connected and server_index):
                url = self._servers[server_index % len(self._servers)]
                server_index += 1
                wire = await self._connect(url)
            if wire is not None:
                result = await self._session(wire)
                if result is True:
                    return
                if result is False:  # worked, then the connection was lost: reconnect at once
                    backoff = 0.05
                    continue
                # None: connected but unusable (e.g. JetStream unavailable): wait like when offline
            # Offline until the next attempt.
            next_attempt = time.monotonic() + backoff
            backoff = min(backoff * 2, RECONNECT_MAX_WAIT)
            while True:
                now = time.monotonic()
                if self._closing and (not self._ever_connected or now >= self._close_deadline):
                    self._spill_to_stdout()
                    return
                if self._offline_to_stdout(now):
                    self._spill_to_stdout()
                if self._servers and now >= next_attempt:
                    break
                self._idle = not self._q
                await self._wait(min(_TICK, next_attempt - now) if self._servers else _TICK)
                self._idle = False

    def _offline_to_stdout(self, now: float) -> bool:
        if not self._servers or not self._ever_connected:
            return True
        return now - self._down_since > self.hold_seconds

    async def _wait(self, timeout: float) -> None:
        """Sleep until kicked (a record while idle, an ack freeing the window, close, connection lost) or timeout."""
        kick = self._kick
        if not kick.is_set() and timeout > 0:
            try:
                await asyncio.wait_for(kick.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        kick.clear()

    async def _connect(self, url: str) -> _Wire | None:
        loop = asyncio.get_running_loop()
        timeout = CONNECT_TIMEOUT
        if self._closing:
            timeout = max(0.05, min(timeout, self._close_deadline - time.monotonic()))
        wire = None
        try:
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            host, port = parts.hostname or "127.0.0.1", parts.port or 4222
            transport, wire = await asyncio.wait_for(
                loop.create_connection(lambda: _Wire(self._kick_set), host, port), timeout)
            info = await asyncio.wait_for(wire.info, timeout)
            if parts.scheme == "tls" or info.get("tls_required"):
                ctx = ssl.create_default_context()
                transport = await asyncio.wait_for(
                    loop.start_tls(transport, wire, ctx, server_hostname=host), timeout)
                wire.transport = transport
            connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                       "protocol": 1, "lang": "python-dockyard-telemetry", "version": "1",
                       "name": f"dockyard-agent-{self.task_id}"}
            if parts.username and parts.password is not None:
                connect["user"] = unquote(parts.username)
                connect["pass"] = unquote(parts.password)
            elif parts.username:
                connect["auth_token"] = unquote(parts.username)
            wire.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
            await wire.ping(timeout)  # the server answers PONG once CONNECT was accepted
            return wire
        except Exception as exc:
            if wire is not None:
                self.last_error = f"connect {url}: {wire.error or repr(exc)}"
                wire.close()
            else:
                self.last_error = f"connect {url}: {exc!r}"
            return None

    # -- JetStream API over the wire

    def _on_api_reply(self, subject: bytes, reply: bytes, headers: bytes | None, payload: bytes) -> None:
        fut = self._api_waiters.pop(subject, None)
        if fut is not None and not fut.done():
            fut.set_result((headers, payload))

    async def _api_request(self, wire: _Wire, subject: str, body: dict) -> dict:
        inbox = self._api_prefix + uuid.uuid4().hex.encode()
        fut = asyncio.get_running_loop().create_future()
        self._api_waiters[inbox] = fut
        data = json.dumps(body).encode()
        wire.write(b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), inbox, len(data), data))
        try:
            headers, payload = await asyncio.wait_for(fut, REQUEST_TIMEOUT)
        finally:
            self._api_waiters.pop(inbox, None)
        if headers and headers.startswith(b"NATS/1.0 503"):
            raise _WireError("JetStream not available (no responders)")
        return json.loads(payload) if payload else {}

    async def _ensure_stream(self, wire: _Wire) -> None:
        config = {
            "name": contract.STREAM_NAME,
            "subjects": list(contract.STREAM_SUBJECTS),
            "retention": "limits",
            "discard": "old",
            "storage": "file",
            "num_replicas": 1,
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": -1,
            "max_msg_size": -1,
            "max_age": int(self.stream_max_age_seconds * 1_000_000_000),
            "duplicate_window": DUPLICATE_WINDOW_SECONDS * 1_000_000_000,
        }
        resp = await self._api_request(wire, f"$JS.API.STREAM.CREATE.{contract.STREAM_NAME}", config)
        error = resp.get("error")
        # 10058: the name is in use with another config (another max age, created elsewhere): fine.
        if error and error.get("err_code") != 10058:
            # e.g. the subjects belong to another stream: publishing may still work; error acks tell.
            self.last_error = f"stream create: {error.get('description')}"
        self._need_stream = False

    # -- one connection

    async def _session(self, wire: _Wire) -> bool | None:
        """Publish on one connection. True: closing and done. False: the connection was lost. None: setup failed."""
        try:
            inbox = b"_INBOX." + uuid.uuid4().hex.encode()
            self._ack_prefix = inbox + b".a."
            self._ack_plen = len(self._ack_prefix)
            self._api_prefix = inbox + b".j."
            wire.handlers[_SID_ACK] = self._on_ack_msg  # acks with headers (no responders): slow path
            wire.set_ack_prefix(self._ack_prefix, _SID_ACK, self._on_ack, self._pop_acked)
            wire.handlers[_SID_API] = self._on_api_reply
            wire.write(b"SUB %s* %d\r\nSUB %s* %d\r\n" % (self._ack_prefix, _SID_ACK, self._api_prefix, _SID_API))
            await self._ensure_stream(wire)
            self._wire = wire
            self._subscribe_cmd()
        except Exception as exc:
            self.last_error = f"session setup: {wire.error or repr(exc)}"
            self._wire = None
            wire.close()
            return None
        if self._ever_connected:
            self.reconnects += 1
        self._connected = True
        self._ever_connected = True
        self._resend_at = time.monotonic() if self._inflight else None
        next_ping = time.monotonic() + PING_INTERVAL
        try:
            while True:
                if wire.closed:
                    self.last_error = f"connection lost: {wire.error}"
                    return False
                now = time.monotonic()
                if now >= next_ping:
                    next_ping = now + PING_INTERVAL
                    if wire.pings_out >= 2:
                        self.last_error = "stale connection (no PONG)"
                        return False
                    wire.pings_out += 1
                    wire.write(b"PING\r\n")
                inflight = self._inflight
                if inflight and now - inflight[0][3] > ACK_TIMEOUT:
                    self.last_error = "ack timeout"
                    return False  # reconnect; everything unacked is resent in order
                if self._resend_at is not None and now >= self._resend_at:
                    self._resend_at = None
                    if self._need_stream:
                        await self._ensure_stream(wire)
                    await self._resend(wire)
                    continue
                await self._send_queued(wire)
                if wire.closed:
                    continue
                if self._closing:
                    if not self._q and not self._inflight:
                        await self._finish(wire)
                        return True
                    if time.monotonic() >= self._close_deadline:
                        self._spill_to_stdout()
                        await self._finish(wire)
                        return True
                if self._resend_at is not None:
                    await self._wait(min(_TICK, max(0.0, self._resend_at - time.monotonic())))
                elif self._q and len(self._inflight) >= ACK_WINDOW:
                    self._window_wait = True
                    await self._wait(_TICK)
                    self._window_wait = False
                elif not self._q:
                    self._idle = True
                    if not self._q:  # else a record slipped in between the check and the flag
                        await self._wait(_TICK)
                    self._idle = False
        except Exception as exc:
            self.last_error = f"session: {exc!r}"
            return False
        finally:
            self._connected = False
            self._wire = None
            self._down_since = time.monotonic()
            for fut in self._api_waiters.values():
                if not fut.done():
                    fut.cancel()
            self._api_waiters.clear()
            wire.close()

    async def _send_queued(self, wire: _Wire) -> None:
        q = self._q
        inflight = self._inflight
        prefix = self._ack_prefix
        instance = self._instance
        encode = self._encode
        while q and len(inflight) < ACK_WINDOW and self._resend_at is None and not wire.closed:
            now = time.monotonic()
            chunk = []
            room = min(_SEND_BATCH, ACK_WINDOW - len(inflight))
            while q and room:
                item = q.popleft()
                room -= 1
                try:
                    subject, data = encode(item)
                except Exception as exc:
                    self.last_error = f"encode: {exc!r}"
                    continue
                self._seq += 1
                seq = self._seq
                inflight.append([seq, subject, data, now, 0, 0])
                hdr = b"NATS/1.0\r\nNats-Msg-Id: %s-%d\r\n\r\n" % (instance, seq)
                chunk.append(b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (subject, prefix, seq, len(hdr), len(hdr) + len(data), hdr, data))
            if chunk:
                wire.write(b"".join(chunk))
            await wire.drain()
            await asyncio.sleep(0)  # let acks in

    async def _resend(self, wire: _Wire) -> None:
        """Send every unacknowledged record again, in order (dedup by Nats-Msg-Id drops stored ones)."""
        now = time.monotonic()
        chunk = []
        count = 0
        for entry in list(self._inflight):
            if entry[4]:
                continue
            entry[3] = now
            seq = entry[0]
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s-%d\r\n\r\n" % (self._instance, seq)
            chunk.append(b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (entry[1], self._ack_prefix, seq, len(hdr), len(hdr) + len(entry[2]), hdr, entry[2]))
            count += 1
            if len(chunk) >= _SEND_BATCH:
                wire.write(b"".join(chunk))
                chunk = []
                await wire.drain()
        if chunk:
            wire.write(b"".join(chunk))
        self.resent += count

    async def _finish(self, wire: _Wire) -> None:
        try:
            await wire.ping(max(0.1, min(2.0, self._close_deadline - time.monotonic())))  # flush
        except Exception as exc:
            self.last_error = f"flush: {exc!r}"
        wire.close()

    def _on_ack(self, seq: int, ok: bool, payload: bytes | None = None, headers: bytes | None = None) -> None:
        inflight = self._inflight
        if not inflight:
            return
        idx = seq - inflight[0][0]  # seqs in flight are consecutive
        if idx < 0 or idx >= len(inflight):
            return  # already acked (a duplicate ack after a resend)
        entry = inflight[idx]
        if entry[4]:
            return
        if ok:
            entry[4] = 1
        else:
            self._ack_error(entry, headers, payload or b"")

    def _on_ack_msg(self, subject: bytes, reply: bytes, headers: bytes | None, payload: bytes) -> None:
        """Acks that miss the fast path: with headers (503 no responders) or otherwise unusual."""
        try:
            seq = int(subject[self._ack_plen:])
        except ValueError:
            return
        ok = headers is None and bool(payload) and b'"error"' not in payload
        self._on_ack(seq, ok, payload, headers)
        self._pop_acked()

    def _pop_acked(self) -> None:
        inflight = self._inflight
        n = 0
        while inflight and inflight[0][4]:
            n += inflight.popleft()[4] == 1
        if n:
            self.published += n
        if self._window_wait and len(inflight) < ACK_WINDOW:
            self._window_wait = False
            self._kick.set()

    def _ack_error(self, entry: list, headers: bytes | None, payload: bytes) -> None:
        self.last_error = f"publish error ack: {(headers or b'')[:40]!r} {payload[:200]!r}"
        if headers and headers.startswith(b"NATS/1.0 503"):
            # No responders: the stream is gone (re-create it) or JetStream is not ready yet.
            # Not the record's fault: retry without counting it against the record.
            self._need_stream = True
            if self._resend_at is None:
                self._resend_at = time.monotonic() + 0.1
                self._kick.set()
            return
        entry[5] += 1
        if entry[5] >= MAX_ERROR_ATTEMPTS:
            # Give up on this one so the rest can flow; keep it visible on stdout.
            entry[4] = 2
            self.failed += 1
            self._write_stdout_lines([entry[2].decode()])
            self._pop_acked()
            return
        if self._resend_at is None:
            self._resend_at = time.monotonic() + 0.05 * 2 ** entry[5]  # 0.1, 0.2, 0.4, 0.8 s
            self._kick.set()

    # ------------------------------------------------------------------ commands

    def _subscribe_cmd(self) -> None:
        wire = self._wire
        if wire is None or wire.closed or self._cmd_callback is None or _SID_CMD in wire.handlers:
            return
        wire.handlers[_SID_CMD] = self._on_cmd
        wire.write(b"SUB %s %d\r\n" % (self._subject_cmd, _SID_CMD))

    def _on_cmd(self, subject: bytes, reply: bytes, headers: bytes | None, payload: bytes) -> None:
        try:
            request = json.loads(payload)
            if not isinstance(request, dict):
                raise ValueError("a command is a JSON object")
        except ValueError as exc:
            response: Any = {"ok": False, "error": f"bad command: {exc}"}
        else:
            callback = self._cmd_callback
            if callback is None:
                return
            try:
                response = callback(request)
            except Exception as exc:
                response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if not isinstance(response, dict) or not reply or self._wire is None:
            return
        try:
            data = self._encoder.encode(self.redactor.redact_obj(response)).encode()
        except (TypeError, ValueError) as exc:
            data = json.dumps({"ok": False, "error": f"unencodable reply: {exc}"}).encode()
        self._wire.write(b"PUB %s %d\r\n%s\r\n" % (reply, len(data), data))
