"""Acknowledged, ordered publishing into the AGENT stream over nats-py, across connections.

Invariants:
* A record leaves memory only once the stream has acknowledged it, or once it
  was given up after `MAX_ERROR_ATTEMPTS` error acks (then it goes to stdout and
  counts as `failed`, so the rest can flow).
* At most `window` records are sent and unacknowledged. They are held in send
  order with consecutive sequence numbers, so an ack finds its record by index.
* Each record carries `Nats-Msg-Id: <instance>-<seq>`, fixed for its life. On a
  new connection (`attach`) and after an error ack, every unacknowledged record
  is sent again, in order, with that id; the stream's duplicate window
  (`contract.AGENT_STREAM`) drops those it had stored already. The stream holds
  each record once, in the order it was enqueued. (One exception: a record the
  server rejects while it accepts later ones lands after them when retried; its
  id still carries its original sequence.)
* Acks come back on one wildcard inbox, `<inbox>.<seq>`, through one nats-py
  subscription; publishing is `nc.publish` with that reply subject. nats-py's
  `js.publish_async` does the same with a future and a semaphore per record and
  cost 2.5x the CPU (see the package docstring).
* A missing stream (no responders, 503) is not the record's fault: the stream
  is created again and the records resent without counting an error.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import contract

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

MAX_ERROR_ATTEMPTS = 5  # error acks for one record before it is given up
REQUEST_TIMEOUT = 2.0  # JetStream API calls (stream creation)
SEND_BATCH = 256  # records published between two yields to the event loop

# States of an in-flight entry.
_SENT, _ACKED, _GIVEN_UP = 0, 1, 2


class AckedPublisher:
    """The in-flight window of one Telemetry: survives connections; `attach` each new one."""

    def __init__(
        self,
        instance: str,
        window: int,
        stream_max_age_seconds: float,
        on_error: Callable[[str], None],
        on_give_up: Callable[[bytes], None],
        kick: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.instance = instance
        self.window = window
        self.stream_max_age_seconds = stream_max_age_seconds
        self._on_error = on_error
        self._on_give_up = on_give_up
        self._kick = kick
        self._clock = clock
        # [seq, subject, data, sent_at, state, error acks], in send order, consecutive seqs.
        self.inflight: collections.deque[list] = collections.deque()
        self.seq = 0
        self.resend_at: float | None = None  # when to send every unacknowledged record again
        self.need_stream = False
        self.wake_on_ack = False  # the sender waits for room or for the last acks: kick it on the next
        self._nc: Client | None = None
        self._prefix = ""
        self._plen = 0
        # Counters, read from any thread.
        self.published = 0  # acknowledged by the stream
        self.resent = 0
        self.failed = 0

    # -- connection

    async def attach(self, nc: Client) -> None:
        """Publish on `nc` from now on: subscribe the ack inbox, schedule the resend.

        The stream is created only when a publish finds none (a 503 ack): a task's own
        credentials allow no JetStream API call, and the platform creates the stream
        before it launches a task."""
        self._prefix = nc.new_inbox() + "."
        self._plen = len(self._prefix)
        await nc.subscribe(self._prefix + "*", cb=self._on_ack_msg)
        self._nc = nc
        self.resend_at = self._clock() if self.inflight else None

    def detach(self) -> None:
        self._nc = None

    @property
    def max_payload(self) -> int:
        return self._nc.max_payload if self._nc is not None else 1024 * 1024

    async def ensure_stream(self) -> None:
        """Create the AGENT stream (`contract.AGENT_STREAM`); one that exists with another config is fine."""
        from nats.js.api import StreamConfig
        from nats.js.errors import APIError

        js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
        try:
            await js.add_stream(StreamConfig(**contract.AGENT_STREAM.config(self.stream_max_age_seconds)))
        except APIError as exc:
            # 10058: the name is in use with another config (another max age, made elsewhere): fine.
            # Anything else (e.g. the subjects belong to another stream): publishing may still
            # work; error acks will tell. (No responders, JetStream off, is not an APIError: it
            # fails the session setup.)
            if exc.err_code != 10058:
                self._on_error(f"stream create: {exc.description}")
        self.need_stream = False

    # -- sending

    @property
    def room(self) -> int:
        return self.window - len(self.inflight)

    def oldest_sent_at(self) -> float | None:
        return self.inflight[0][3] if self.inflight else None

    async def send(self, subject: str, data: bytes) -> None:
        """Publish one new record; it stays in flight until acked. Raises if the connection is gone."""
        self.seq += 1
        entry = [self.seq, subject, data, self._clock(), _SENT, 0]
        self.inflight.append(entry)  # before publishing: if that fails, the next connection resends it
        await self._publish(entry)

    async def _publish(self, entry: list) -> None:
        seq = entry[0]
        await self._nc.publish(entry[1], entry[2], reply=f"{self._prefix}{seq}",
                               headers={"Nats-Msg-Id": f"{self.instance}-{seq}"})

    async def resend(self) -> None:
        """Send every unacknowledged record again, in order (dedup by Nats-Msg-Id drops stored ones)."""
        self.resend_at = None
        if self.need_stream:
            await self.ensure_stream()
        now = self._clock()
        count = 0
        for entry in list(self.inflight):
            if entry[4] != _SENT:
                continue
            entry[3] = now
            await self._publish(entry)
            count += 1
            if count % SEND_BATCH == 0:
                await asyncio.sleep(0)  # let acks in
        self.resent += count

    def take_unacked(self) -> list[bytes]:
        """Everything still in flight, oldest first, forgotten here (the caller writes it elsewhere)."""
        out = [entry[2] for entry in self.inflight if entry[4] == _SENT]
        self.inflight.clear()
        return out

    # -- acks

    async def _on_ack_msg(self, msg: Msg) -> None:
        try:
            seq = int(msg.subject[self._plen:])
        except ValueError:
            return
        data = msg.data
        headers = msg.headers
        if not headers and data and b'"error"' not in data:
            self._ack(seq)
        else:
            self._error_ack(seq, headers, data)
        self._pop_acked()

    def _entry(self, seq: int) -> list | None:
        inflight = self.inflight
        if not inflight:
            return None
        idx = seq - inflight[0][0]  # seqs in flight are consecutive
        if idx < 0 or idx >= len(inflight):
            return None  # acked already (a second ack after a resend)
        entry = inflight[idx]
        return entry if entry[4] == _SENT else None

    def _ack(self, seq: int) -> None:
        entry = self._entry(seq)
        if entry is not None:
            entry[4] = _ACKED

    def _pop_acked(self) -> None:
        inflight = self.inflight
        n = 0
        while inflight and inflight[0][4] != _SENT:
            n += inflight.popleft()[4] == _ACKED
        self.published += n
        if n and self.wake_on_ack:
            self.wake_on_ack = False
            self._kick()

    def _error_ack(self, seq: int, headers: dict | None, data: bytes) -> None:
        entry = self._entry(seq)
        if entry is None:
            return
        status = (headers or {}).get("Status")
        if status == "503":
            # No responders: no stream yet (or gone: create it), or JetStream is not ready yet.
            self.need_stream = True
            self._schedule_resend(0.1)
            return
        self._on_error(f"publish error ack: {status or ''} {data[:200]!r}".replace("  ", " "))
        entry[5] += 1
        if entry[5] >= MAX_ERROR_ATTEMPTS:
            entry[4] = _GIVEN_UP
            self.failed += 1
            self._on_give_up(entry[2])
            return
        self._schedule_resend(0.05 * 2 ** entry[5])  # 0.1, 0.2, 0.4, 0.8 s

    def _schedule_resend(self, delay: float) -> None:
        if self.resend_at is None:
            self.resend_at = self._clock() + delay
            self._kick()
