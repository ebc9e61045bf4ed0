"""`Telemetry`: the agent's threads enqueue; one background thread publishes, reconnects or prints.

Invariants:
* Never blocks the caller. `event()` and the log handler append a small tuple to
  a deque (plus, when the telemetry thread sleeps, one `call_soon_threadsafe`
  to wake it). Encoding, redaction of log text, network I/O and stdout writes
  happen on the telemetry thread, which runs its own asyncio loop.
* Bounded buffer, counted drops: at most `buffer_size` records wait in the
  queue; a record that finds it full is dropped and counted (`dropped`).
  Records sent and not yet acknowledged are held apart (publisher.py).
* Ordered: one thread publishes everything one instance enqueued, events and
  logs interleaved, on one connection at a time, and after a reconnect the
  unacknowledged records go out again before any new one (publisher.py).
* NATS down is not an error. Without a URL, while NATS has never been reached
  since start, or after an outage longer than `hold_seconds`, records are
  written to stdout as JSON lines, in order, so a local run still shows its
  trace. A shorter outage after a working connection holds the records and
  delivers them after the reconnect.
* Flush at exit. `close()` publishes everything queued, waits for the acks,
  closes the connection and stops the thread within its timeout; whatever could
  not reach NATS by then is written to stdout. `start()` also registers a close
  at interpreter exit, for a caller that forgot.
* Redaction before publishing: event fields on the caller's thread (which also
  copies them), log text and command replies on the telemetry thread.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import sys
import threading
import time
import uuid
import weakref
from typing import Any

from agent import contract
from agent.redact import Redactor
from agent.telemetry.commands import Callback, CommandServer
from agent.telemetry.connection import NatsAuth, connect, public_url, server_list
from agent.telemetry.publisher import SEND_BATCH, AckedPublisher
from agent.telemetry.records import EVENT, Encoder, LogHandler

ACK_WINDOW = 2048  # records sent and not yet acknowledged
ACK_TIMEOUT = 5.0  # no ack for the oldest record this long: drop the connection, reconnect, resend
CONNECT_TIMEOUT = 2.0
RECONNECT_MAX_WAIT = 2.0
CLOSE_TIMEOUT = 1.0  # closing one nats-py connection
_TICK = 0.25
# Idle (nothing queued, nothing unacked): a record, close or a lost connection kicks the thread;
# the timeout is only a safety net. At _TICK, 20 waiting agents spent ~2 % of a core waking (bench_idle).
_IDLE_WAIT = 30.0


def _close_at_exit(ref: weakref.ref[Telemetry]) -> None:
    telemetry = ref()
    if telemetry is not None:
        telemetry.close(timeout=2.0)


class Telemetry:
    """Publishes a task's events and log records to NATS JetStream from a background thread.

    Usage::

        tel = Telemetry(task_id, nats_url, Redactor.from_secrets_dir(contract.SECRETS_DIR),
                        auth=NatsAuth.load(creds_file, nkey_file))
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
        stream_max_age_seconds: float = contract.STREAM_MAX_AGE_SECONDS,
        hold_seconds: float = 30.0,
        auth: NatsAuth | None = None,
        ack_timeout: float = ACK_TIMEOUT,
        ack_window: int = ACK_WINDOW,
    ):
        self.task_id = task_id
        self.nats_url = nats_url or None
        self.redactor = redactor or Redactor()
        self.buffer_size = buffer_size
        self.hold_seconds = hold_seconds
        self.auth = auth or NatsAuth()
        self.ack_timeout = ack_timeout
        self._servers = server_list(nats_url)

        # Shared between threads: appends on callers' threads, pops on the telemetry thread.
        self._q: collections.deque = collections.deque()
        self._idle = False  # the telemetry thread sleeps waiting for records: wake it on the next put
        self._drop_lock = threading.Lock()
        self._dropped = 0
        self._lock = threading.Lock()  # start/close
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed = False
        self._close_deadline = 0.0

        # Telemetry thread only.
        self._encoder = Encoder(task_id, self.redactor)
        self._publisher = AckedPublisher(uuid.uuid4().hex[:12], ack_window, stream_max_age_seconds,
                                         self._set_error, self._give_up, self._kick_set)
        self._commands = CommandServer(task_id, self._encoder, self._set_error)
        self._kick: asyncio.Event | None = None
        self._connected = False
        self._ever_connected = False
        self._down_since = time.monotonic()

        self.written_stdout = 0  # records written to stdout instead of NATS
        self.reconnects = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public API

    @property
    def dropped(self) -> int:
        """Records dropped because the buffer was full."""
        return self._dropped

    @property
    def published(self) -> int:
        """Records the stream acknowledged."""
        return self._publisher.published

    @property
    def resent(self) -> int:
        """Records sent again after a reconnect, an ack timeout or an error ack."""
        return self._publisher.resent

    @property
    def failed(self) -> int:
        """Records given up after repeated error acks (also written to stdout)."""
        return self._publisher.failed

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self._q),
            "inflight": len(self._publisher.inflight),
            "published": self.published,
            "dropped": self._dropped,
            "written_stdout": self.written_stdout,
            "failed": self.failed,
            "resent": self.resent,
            "reconnects": self.reconnects,
            "connected": self._connected,
            "last_error": self.last_error,
        }

    def start(self) -> Telemetry:
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
        body = {"type": type, "task_id": self.task_id, "ts": contract.iso_utc()}
        body.update(fields)
        self._put((EVENT, self.redactor.redact_obj(body)))

    def log_handler(self, level: int = logging.INFO) -> logging.Handler:
        """A logging.Handler that publishes JSON records to logs.agent.<id>."""
        return LogHandler(self._put, level)

    def on_command(self, callback: Callback) -> None:
        """Serve cmd.agent.<id> with `callback(request)` (see commands.py). Calling again replaces it."""
        self._commands.callback = callback
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._commands.subscribe()))
            except RuntimeError:  # loop closed
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Publish everything queued, close the connection, stop the thread. Idempotent."""
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

    # ------------------------------------------------------------------ stdout

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
                lines.append(self._encoder.encode(item)[1])
            except Exception:  # never let one weird record stop the trace
                continue
        self._write_stdout(lines)

    def _write_stdout(self, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            out = sys.stdout
            out.write(b"\n".join(lines).decode() + "\n")
            out.flush()
        except Exception:
            pass
        self.written_stdout += len(lines)

    def _give_up(self, data: bytes) -> None:
        self._write_stdout([data])

    def _spill_to_stdout(self) -> None:
        """Write whatever is in flight (oldest first) and queued to stdout, in order."""
        self._write_stdout(self._publisher.take_unacked())
        self._write_stdout_items(self._pop_all())

    def _set_error(self, message: str) -> None:
        self.last_error = message

    # ------------------------------------------------------------------ telemetry thread

    def _thread_main(self) -> None:
        try:
            # asyncio.run also cancels and awaits what nats-py left running (its subscription
            # tasks), so nothing is destroyed pending when the loop closes.
            asyncio.run(self._main())
        except BaseException as exc:  # a bug here must not take the agent down; keep the trace
            self.last_error = f"telemetry thread failed: {exc!r}"
            try:
                self._spill_to_stdout()
            except Exception:
                pass
        finally:
            self._loop = None
            self._connected = False

    async def _main(self) -> None:
        self._kick = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        backoff = 0.05
        attempts = 0
        while True:
            nc = None
            # While closing, try once more only if NATS was up before (or was never tried yet).
            if self._servers and not (self._closing and not self._ever_connected and attempts):
                url = self._servers[attempts % len(self._servers)]
                attempts += 1
                nc = await self._connect(url)
            if nc is not None:
                result = await self._session(nc)
                if result is True:
                    return
                if result is False:  # worked, then the connection was lost: reconnect at once
                    backoff = 0.05
                    continue
                # None: connected but unusable (e.g. JetStream unavailable): wait like when offline
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
            except TimeoutError:
                pass
        kick.clear()

    async def _connect(self, url: str):
        timeout = CONNECT_TIMEOUT
        if self._closing:
            timeout = max(0.05, min(timeout, self._close_deadline - time.monotonic()))

        async def on_closed() -> None:
            self._kick_set()

        async def on_error(exc: Exception) -> None:
            self.last_error = f"nats {public_url(url)}: {type(exc).__name__}: {exc}"

        try:
            return await connect(url, self.auth, name=f"dockyard-agent-{self.task_id}", timeout=timeout,
                                 inbox_prefix=contract.inbox_prefix(self.task_id), on_closed=on_closed, on_error=on_error)
        except Exception as exc:  # refused, timed out, authorization violation, ...
            self.last_error = f"connect {public_url(url)}: {type(exc).__name__}: {exc}"
            return None

    async def _session(self, nc) -> bool | None:
        """Publish on one connection. True: closing and done. False: the connection was lost. None: setup failed."""
        if not await self._attach(nc):
            return None
        if self._ever_connected:
            self.reconnects += 1
        self._connected = True
        self._ever_connected = True
        try:
            return await self._publish_loop(nc)
        except Exception as exc:
            self.last_error = f"session: {type(exc).__name__}: {exc}"
            return False
        finally:
            await self._end_session(nc)

    async def _attach(self, nc) -> bool:
        """Attach the publisher (it schedules the resend of what is unacked) and the command server; on failure close `nc`."""
        try:
            await self._publisher.attach(nc)
            await self._commands.attach(nc)
        except Exception as exc:
            self.last_error = f"session setup: {type(exc).__name__}: {exc}"
            self._publisher.detach()
            self._commands.detach()
            await self._close_nc(nc, CLOSE_TIMEOUT)
            return False
        return True

    async def _publish_loop(self, nc) -> bool:
        """Send in order until closing is done (True) or the connection is lost or stalls (False).

        Resends come before new records, so the stream sees one order; what is
        unacked when this returns False stays with the publisher for the next
        connection.
        """
        publisher = self._publisher
        while True:
            if nc.is_closed:
                self.last_error = f"connection lost: {nc.last_error!r}"
                return False
            now = time.monotonic()
            if publisher.resend_at is not None and now >= publisher.resend_at:
                await publisher.resend()  # first: it restarts the ack clock of what it sends
                continue
            oldest = publisher.oldest_sent_at()
            if oldest is not None and now - oldest > self.ack_timeout:
                self.last_error = "ack timeout"
                return False  # reconnect; everything unacked is resent in order
            await self._send_queued(nc)
            if nc.is_closed:
                continue
            if self._close_complete():
                return True
            await self._wait_for_work()

    def _close_complete(self) -> bool:
        """While closing: True once everything is acked, or at the close deadline after the rest went to stdout."""
        if not self._closing:
            return False
        if not self._q and not self._publisher.inflight:
            return True
        if time.monotonic() >= self._close_deadline:
            self._spill_to_stdout()
            return True
        return False

    async def _wait_for_work(self) -> None:
        """Sleep until the next resend, an ack that frees the window (or, closing, the last acks), or a new record."""
        publisher = self._publisher
        if publisher.resend_at is not None:
            await self._wait(min(_TICK, max(0.0, publisher.resend_at - time.monotonic())))
        elif publisher.inflight and (publisher.room <= 0 if self._q else self._closing):
            publisher.wake_on_ack = True  # the window is full, or closing waits for the last acks
            await self._wait(_TICK)
            publisher.wake_on_ack = False
        elif not self._q:
            self._idle = True
            if not self._q:  # else a record slipped in between the check and the flag
                await self._wait(_TICK if publisher.inflight else _IDLE_WAIT)  # unacked: the ack timeout is checked
            self._idle = False
        else:
            await asyncio.sleep(0)  # let acks and commands in between batches

    async def _end_session(self, nc) -> None:
        """Mark the connection down (the hold time starts now), detach, and close `nc` within the close deadline."""
        self._connected = False
        self._down_since = time.monotonic()
        self._publisher.detach()
        self._commands.detach()
        remaining = self._close_deadline - time.monotonic() if self._closing else CLOSE_TIMEOUT
        await self._close_nc(nc, max(0.1, min(CLOSE_TIMEOUT, remaining)))

    async def _send_queued(self, nc) -> None:
        """Encode and publish queued records while the window has room (one batch at most)."""
        q = self._q
        publisher = self._publisher
        encode = self._encoder.encode
        max_payload = publisher.max_payload
        room = min(publisher.room, SEND_BATCH)
        while q and room > 0 and publisher.resend_at is None and not nc.is_closed:
            item = q.popleft()
            room -= 1
            try:
                subject, data = encode(item, max_payload)
            except Exception as exc:
                self.last_error = f"encode: {exc!r}"
                continue
            await publisher.send(subject, data)

    async def _close_nc(self, nc, timeout: float) -> None:
        """Close a connection (flushing what it buffered, e.g. command replies) within `timeout`."""
        try:
            await asyncio.wait_for(nc.close(), timeout)
        except Exception as exc:
            self.last_error = self.last_error or f"close: {exc!r}"
