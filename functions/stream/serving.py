"""How the stream app is served: open streams end on a shutdown signal, the tracker keeps running, the GC stays quiet.

Invariants:
- When the server is told to stop (SIGTERM, or SIGINT), open streams end at
  once, cleanly: `on_shutdown_signal` chains a handler in front of the
  server's own. uvicorn runs the lifespan shutdown only after every response
  ended (or after --timeout-graceful-shutdown, by cancelling them mid-frame),
  so a stream must learn of the shutdown from the signal itself. Only public
  API: whatever handler the server installed (uvicorn installs its own before
  the lifespan starts) still runs, and is put back when the lifespan ends.
- The tracker waits for NATS as long as it takes, with a backoff from 0.5 s
  doubling up to 10 s; `sleep` is injectable so a test checks it without the
  wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

from functions.core import bus
from functions.core.bus import being_cancelled
from functions.errors import Unavailable

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the ones uvicorn handles
TRACKER_FIRST_DELAY_SECONDS = 0.5
TRACKER_MAX_DELAY_SECONDS = 10.0
GC_THRESHOLDS = (50_000, 20, 100)  # young collections every 50,000 allocations instead of 700


@contextmanager
def on_shutdown_signal(callback: Callable[[], None]):
    """While inside, a shutdown signal first schedules `callback` on this event loop, then runs the server's handler.

    Only signals some Python handler already handles are chained (a default
    action ends the process anyway); signals can be handled in the main
    thread only, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    chained: dict[int, tuple[Callable, Callable]] = {}

    def notify() -> None:
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nothing is left to end
            pass

    for sig in SHUTDOWN_SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous) -> None:
            notify()
            previous(signum, frame)

        signal.signal(sig, handler)
        chained[sig] = (handler, previous)
    try:
        yield
    finally:
        for sig, (handler, previous) in chained.items():
            if signal.getsignal(sig) is handler:  # the server may have restored its own already
                signal.signal(sig, previous)


async def connect_with_backoff(settings, *, connect=bus.connect, sleep: Callable[[float], Awaitable] = asyncio.sleep):
    """The process's NATS connection, waiting for NATS as long as it takes."""
    delay = TRACKER_FIRST_DELAY_SECONDS
    while True:
        try:
            return await connect(settings)
        except Unavailable as exc:
            if being_cancelled():
                raise  # a stop while connecting, reported as NATS trouble: stop, do not wait on
            log.warning("tracker waits for NATS: %s", exc)
            await sleep(delay)
            delay = min(delay * 2, TRACKER_MAX_DELAY_SECONDS)


async def run_tracker(settings, *, connect=bus.connect, sleep: Callable[[float], Awaitable] = asyncio.sleep) -> None:
    """Connect (waiting for NATS as long as it takes), then track until cancelled."""
    from functions.core.tracker import Tracker

    # The tracker connects as its own NATS user: it writes the registry, the stream only reads.
    if settings.tracker_nats_creds:
        settings = settings.model_copy(update={"nats_creds": settings.tracker_nats_creds})
    connection = await connect_with_backoff(settings, connect=connect, sleep=sleep)
    await Tracker(connection.js, connection.registry).run()


def quiet_gc() -> None:
    """Keep the garbage collector from pausing every stream at once; once per process, after imports.

    With 200 clients a full collection walks tens of thousands of connection
    objects and stops the event loop for 30-60 ms, the whole p99 of a fan-out
    (bench/bench_fanout.py). Freezing what start-up made (modules, the app)
    takes it out of every collection, and rarer young collections promote
    fewer short-lived objects into the old generation.
    """
    import gc

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
