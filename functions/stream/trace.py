"""The trace of one task for one client: catch up on a consumer of its own, then read the shared feed.

Invariants:
- A client's *position* means: every task message at or below it has been
  sent or filtered out. Only messages above it are ever sent, so a client
  resuming after any id gets every later message exactly once, in order.
- A client below what the feed holds, or further behind than its buffer,
  catches up on an ephemeral consumer of its own first, then joins the feed.
- A *live* client (one that has had everything the feed holds) found more
  than `buffer_bytes` behind is cut: a comment says so, and it resumes with
  its Last-Event-ID. A slow client never slows the feed or another client.
- After the terminal status event comes `end`, then the trace ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from agent import contract
from functions.stream import consumers
from functions.stream.feed import MAX_WRITE_BYTES, Feed, Feeds
from functions.stream.filters import EVERYTHING, Filter
from functions.stream.sse import comment, end_frame

log = logging.getLogger(__name__)


async def catch_up(js, task_id: str, position: int, feed: Feed, only: Filter, buffer_bytes: int):
    """Yield (chunk, position, ended) from a consumer of the client's own until it may join the feed."""
    logs_subject = contract.subject_logs(task_id)
    while position < (target := feed.join_point(buffer_bytes)):
        first = await consumers.first_task_message_from(js, task_id, position + 1)
        if first is None or first > target:
            yield b"", target, False  # no message of the task in (position, target]
            return
        sub = await consumers.subscribe(js, task_id, position + 1)  # delivers `first` at once
        try:
            async for batch in consumers.batches(sub):
                redactor = feed.redaction.current()
                chunk: list[bytes] = []
                size = pending = 0
                for msg in batch:
                    m = consumers.encode(msg, logs_subject, redactor)
                    pending = m.pending
                    if m.seq <= position:
                        continue
                    position = m.seq
                    if only.passes(m.kind, m.level):
                        chunk.append(m.frame)
                        size += len(m.frame)
                    if m.terminal:
                        chunk.append(end_frame(task_id, m.seq))
                        yield b"".join(chunk), position, True
                        return
                    if size >= MAX_WRITE_BYTES:
                        yield b"".join(chunk), position, False
                        chunk, size = [], 0
                if chunk:
                    yield b"".join(chunk), position, False
                if position >= feed.join_point(buffer_bytes) or pending == 0:
                    break  # may join the feed, or at the stream's end: check again
        finally:
            await consumers.release(js, sub)


@dataclass(slots=True)
class _Client:
    """Where one client of a trace is: its position (see the invariants), and whether it is live or its trace ended."""

    task_id: str
    position: int
    live: bool = False  # it has had everything the feed held: falling behind now cuts it
    ended: bool = False  # `end` is sent: the trace is over

    async def catch_up(self, js, feed: Feed, only: Filter, buffer_bytes: int) -> AsyncIterator[bytes]:
        """Its chunks from a consumer of its own, until it may join the feed or its trace ends."""
        async with aclosing(catch_up(js, self.task_id, self.position, feed, only, buffer_bytes)) as chunks:
            async for chunk, self.position, self.ended in chunks:
                if chunk:
                    yield chunk
                if self.ended:
                    return

    def take(self, feed: Feed, only: Filter) -> bytes:
        """Its next chunk from the feed (maybe empty), with `end` after the terminal event."""
        chunk, self.position, self.ended = feed.take(self.position, only)
        return chunk + end_frame(self.task_id, self.position) if self.ended else chunk


async def trace(
    js,
    feeds: Feeds,
    task_id: str,
    after: int | None,
    *,
    buffer_bytes: int,
    finished_at: int | None = None,
    only: Filter = EVERYTHING,
) -> AsyncIterator[bytes]:
    """Yield SSE bytes for the task's messages after sequence `after`, through the terminal event.

    `finished_at` is the sequence of a terminal status event known when the
    request came in: a client resuming at or after it gets `end` at once.
    """
    if finished_at is not None and after is not None and after >= finished_at:
        yield end_frame(task_id, finished_at)
        return
    client = _Client(task_id, after or 0)
    try:
        async with feeds.follow(js, task_id) as feed:
            while not client.ended:
                changed = feed.changed
                if client.position < feed.join_point(buffer_bytes):
                    if client.live:  # overflow: the client resumes and catches up on a consumer of its own
                        log.info("a client of task %s fell behind the live tail at %d: its response ends", task_id, client.position)
                        yield comment("fell behind the live tail: resume with Last-Event-ID")
                        return
                    async with aclosing(client.catch_up(js, feed, only, buffer_bytes)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                    continue
                chunk = client.take(feed, only)
                if chunk:
                    yield chunk
                elif client.position >= feed.last:
                    if feed.failed:
                        return  # the client reconnects and resumes from its Last-Event-ID
                    client.live = True
                    await feed.wait(changed)
    except Exception as exc:  # NATS trouble after the response started: end it, the client resumes
        log.warning("stream of task %s ended after %d: %s", task_id, client.position, exc or type(exc).__name__)
