"""The live tail of a task, read and redacted once, shared by every client following it.

Invariants:
- A task followed by any client has exactly one `Feed` (in `Feeds`), with one
  consumer reading the live tail; it is closed, and its consumer deleted,
  when its last client leaves.
- A feed holds, in stream order, the frames of the task's messages with a
  sequence above `floor`, and every later message of the task reaches it:
  `floor` starts at the stream's last sequence when the feed opens. Trimming
  the oldest frames (beyond MAX_FEED_FRAMES or MAX_FEED_BYTES) raises
  `floor`; so does a change of the known secrets (frames redacted with the old
  values are dropped, and clients below re-read NATS).
- A message at or below `last` is a replay (a recreated consumer) and is
  dropped: nothing is held twice.
- Clients are woken at most every FLUSH_SECONDS, so each write carries every
  frame that arrived; a client reads the frames, it never copies the feed.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left, bisect_right
from contextlib import asynccontextmanager

import anyio

from agent import contract
from agent.redact import Redactor
from functions.stream import consumers
from functions.stream.filters import Filter
from functions.stream.redaction import Redaction

log = logging.getLogger(__name__)

MAX_FEED_FRAMES = 10_000  # recent frames a task's feed keeps for clients that lag behind
MAX_FEED_BYTES = 16 * 1024 * 1024  # ... and at most this many bytes of them
MAX_WRITE_BYTES = 256 * 1024  # one write to a client carries at most this much (a single larger frame goes alone)
FLUSH_SECONDS = 0.005  # clients of a feed are woken at most this often: fewer, larger writes


class Feed:
    """The frames of one task's live tail, above `floor`.

    `starts[i]` counts the bytes of every frame before frame i since the feed
    opened, so how far a client is behind is one subtraction. `waiting` counts
    the clients that have had everything and wait for more.
    """

    def __init__(self, js, task_id: str, redaction: Redaction):
        self.js = js
        self.task_id = task_id
        self.redaction = redaction
        self.floor = 0
        self.last = 0
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.kinds: list[str] = []
        self.levels: list[int] = []
        self.starts: list[int] = []
        self.total = 0  # bytes of every frame appended since the feed opened
        self.terminal: int | None = None
        self.failed = False
        self.clients = 0
        self.waiting = 0
        self.changed = asyncio.Event()
        self._redactor: Redactor | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._sub = None
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        # The task's newest message is looked up before the stream's end, so newest <= floor.
        newest = await consumers.last_message(self.js, consumers.task_subjects(self.task_id))
        self.floor = self.last = (await self.js.stream_info(contract.STREAM_NAME)).state.last_seq
        # Starting at the newest message (delivered at once, dropped as <= last) rather than
        # after floor: nats-py recreates an ordered consumer after the last message it
        # delivered, so a NATS restart before anything new arrives does not replay the task.
        start = newest.seq if newest is not None else self.floor + 1
        self._sub = await consumers.subscribe(self.js, self.task_id, start)
        self._reader = asyncio.create_task(self._read(), name=f"feed-{self.task_id}")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._flush is not None:
            self._flush.cancel()
        if self._sub is not None:
            await consumers.release(self.js, self._sub)

    def join_point(self, buffer_bytes: int) -> int:
        """The lowest position a client may read the feed from: above `floor`, within `buffer_bytes` of the newest."""
        j = bisect_left(self.starts, self.total - buffer_bytes)
        return self.floor if j == 0 else self.seqs[j - 1]

    def take(self, position: int, only: Filter) -> tuple[bytes, int, bool]:
        """(frames to send, the new position, whether the terminal event is among them), at most ~MAX_WRITE_BYTES.

        Filtered-out messages advance the position too; the result may be empty.
        """
        seqs, terminal = self.seqs, self.terminal
        i = bisect_right(seqs, position)
        if i == len(seqs):
            return b"", position, False
        k = max(i + 1, bisect_left(self.starts, self.starts[i] + MAX_WRITE_BYTES))
        k = min(k, len(seqs))
        ends = terminal is not None and position < terminal <= seqs[k - 1]
        if ends:
            k = bisect_right(seqs, terminal, i, k)
        if only.everything:
            chunk = b"".join(self.frames[i:k])
        else:
            kinds, levels, frames = self.kinds, self.levels, self.frames
            chunk = b"".join(frames[j] for j in range(i, k) if only.passes(kinds[j], levels[j]))
        return chunk, seqs[k - 1], ends

    async def wait(self, changed: asyncio.Event) -> None:
        """Wait for frames after `changed` (taken before the client's last read), counted in `waiting`."""
        self.waiting += 1
        try:
            await changed.wait()
        finally:
            self.waiting -= 1

    def _forget(self, cut: int) -> None:
        self.floor = self.seqs[cut - 1]
        del self.seqs[:cut], self.frames[:cut], self.kinds[:cut], self.levels[:cut], self.starts[:cut]

    async def _read(self) -> None:
        logs_subject = contract.subject_logs(self.task_id)
        try:
            async for batch in consumers.batches(self._sub):
                redactor = self.redaction.current()
                if redactor is not self._redactor:
                    if self._redactor is not None and self.seqs:
                        self._forget(len(self.seqs))  # redacted with the old secrets: clients below re-read NATS
                    self._redactor = redactor
                for msg in batch:
                    if msg.metadata.sequence.stream <= self.last:
                        continue  # the newest message at open, or replayed by a recreated consumer
                    m = consumers.encode(msg, logs_subject, redactor)
                    self.last = m.seq
                    self.seqs.append(m.seq)
                    self.frames.append(m.frame)
                    self.kinds.append(m.kind)
                    self.levels.append(m.level)
                    self.starts.append(self.total)
                    self.total += len(m.frame)
                    if m.terminal and self.terminal is None:
                        self.terminal = m.seq
                self._trim()
                if self._flush is None:
                    self._flush = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._wake)
        except Exception as exc:  # the connection is closed: clients end, and resume elsewhere
            log.warning("feed of task %s stopped: %s", self.task_id, exc or type(exc).__name__)
            self.failed = True
            self._wake()

    def _trim(self) -> None:
        cut = 0
        if len(self.seqs) > MAX_FEED_FRAMES:
            cut = len(self.seqs) // 2
        if self.seqs and self.total - self.starts[0] > MAX_FEED_BYTES:
            cut = max(cut, bisect_left(self.starts, self.total - MAX_FEED_BYTES // 2))
        if cut:
            self._forget(min(cut, len(self.seqs)))

    def _wake(self) -> None:
        self._flush = None
        self.changed.set()
        self.changed = asyncio.Event()


class Feeds:
    """The feeds of one app, one per task followed by at least one client."""

    def __init__(self, redaction: Redaction):
        self.redaction = redaction
        self._feeds: dict[str, Feed] = {}
        self._lock = asyncio.Lock()

    def get(self, task_id: str) -> Feed | None:
        """The task's feed, if any client follows the task."""
        return self._feeds.get(task_id)

    @asynccontextmanager
    async def follow(self, js, task_id: str):
        async with self._lock:
            feed = self._feeds.get(task_id)
            if feed is None or feed.failed:
                feed = Feed(js, task_id, self.redaction)
                await feed.open()
                self._feeds[task_id] = feed
            feed.clients += 1
        try:
            yield feed
        finally:
            feed.clients -= 1
            if feed.clients == 0:
                if self._feeds.get(task_id) is feed:
                    del self._feeds[task_id]
                # Runs in a cancelled scope on disconnect; the release inside has its own deadline.
                with anyio.move_on_after(consumers.RELEASE_SECONDS + 1.0, shield=True):
                    await feed.close()
