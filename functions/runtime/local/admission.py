"""Admission: at most N tasks run at once on this machine; the rest wait their turn (Kueue, imitated).

Invariants
- At most `limit` tasks hold a slot. A task waits in the order of its key:
  tasks that had started before a restart first, then by submit time (the
  launch's `created_at`, persisted), then by arrival in this process.
- A slot is granted only to a waiter that is still waiting; a waiter that gives
  up (cancel, shutdown) holds nothing afterwards, even if a slot was granted in
  the same instant.
- Nothing here is persisted: the task folders are the arbiter. A task whose
  `supervisor.json` says `queued` was launched but never admitted; the next
  process queues it again in the same order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os

Key = tuple[int, float]


def default_limit() -> int:
    """The number of cores."""
    return os.cpu_count() or 1


class Admission:
    """Slots for running tasks, granted in key order."""

    def __init__(self, limit: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"max_running={limit}: at least 1 task must be able to run")
        self.limit = limit or default_limit()
        self._holders: set[str] = set()
        self._waiting: list[tuple[Key, int, str, asyncio.Future]] = []
        self._arrival = itertools.count()

    @property
    def running(self) -> int:
        return len(self._holders)

    def queued(self) -> list[str]:
        """The waiting tasks, next first."""
        return [entry[2] for entry in sorted(self._waiting) if not entry[3].done()]

    def enqueue(self, task_id: str, key: Key) -> asyncio.Future | None:
        """Take a slot now (None), or join the queue: the future resolves once a slot is granted."""
        if task_id in self._holders:
            return None
        if len(self._holders) < self.limit and not self._waiting:
            self._holders.add(task_id)
            return None
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (key, next(self._arrival), task_id, future))
        self._grant()
        return future

    def position(self, task_id: str) -> int | None:
        """1 for the next task to run; None if the task is not waiting."""
        queue = self.queued()
        return queue.index(task_id) + 1 if task_id in queue else None

    async def wait(self, task_id: str, future: asyncio.Future | None, interrupt: asyncio.Event) -> bool:
        """Wait for the slot `enqueue` promised, or for `interrupt`. True: the slot is held."""
        if future is None:
            return True
        stop = asyncio.ensure_future(interrupt.wait())
        held = False
        try:
            await asyncio.wait({future, stop}, return_when=asyncio.FIRST_COMPLETED)
            held = future.done() and not interrupt.is_set()
            return held
        finally:
            stop.cancel()
            if not future.done():
                future.cancel()  # gives up its place
                self._waiting = [entry for entry in self._waiting if entry[3] is not future]
                heapq.heapify(self._waiting)
            elif not held:
                self.release(task_id)  # granted in the same instant as the interrupt: hand it on

    def release(self, task_id: str) -> None:
        """Give the slot back (no-op if not held) and admit the next waiter."""
        self._holders.discard(task_id)
        self._grant()

    def _grant(self) -> None:
        while self._waiting and len(self._holders) < self.limit:
            _, _, task_id, future = heapq.heappop(self._waiting)
            if future.done():
                continue
            self._holders.add(task_id)
            future.set_result(None)
