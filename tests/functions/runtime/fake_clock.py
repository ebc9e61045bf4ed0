"""A Clock whose time moves only when the test says so.

Hand-written because what it fakes is the local runtime's own `Clock` seam
(two methods), not the event loop: the real child processes, their grace
periods and asyncio itself keep real time. (Libraries that fake the loop's
time, such as looptime, would also fake those waits; time-machine and
freezegun fake `time.time()` but not a sleep.)
"""

from __future__ import annotations

import asyncio

from functions.runtime.local import Clock


class FakeClock(Clock):
    """`time()` is `now`; `sleep(s)` returns once `advance()` has moved `now` past its end."""

    def __init__(self, start: float = 1_750_000_000.0):
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def pending(self) -> list[float]:
        """The seconds left of every sleep in progress, shortest first."""
        return sorted(round(end - self.now, 6) for end, woken in self._sleepers if not woken.done())

    def advance(self, seconds: float) -> None:
        """Move time on, waking every sleep that ends by then."""
        self.now += seconds
        for end, woken in self._sleepers:
            if end <= self.now and not woken.done():
                woken.set_result(None)
