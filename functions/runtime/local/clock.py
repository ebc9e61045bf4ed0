"""The time the local runtime waits on: backoff, the deadline, job-event redelivery, the TTL janitor.

Invariant: every wait of the Job-controller imitation goes through a `Clock`,
and every timestamp it persists comes from the same clock, so a test can move
time by hand and see backoff, deadlines and TTLs act without waiting for them.
The child processes themselves run on real time: their grace periods (SIGTERM,
then SIGKILL) are about a real process and use the real clock.
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Real time: `time()` for what is persisted (it must survive a restart), `sleep()` to wait."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0))


async def sleep_unless(clock: Clock, event: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` on `clock`, waking early when `event` is set. True if it was set."""
    if event.is_set():
        return True
    woken = asyncio.ensure_future(event.wait())
    timer = asyncio.ensure_future(clock.sleep(max(seconds, 0)))
    try:
        await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        timer.cancel()
    return event.is_set()
