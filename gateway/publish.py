"""Usage events onto each task's event subject (`events.agent.<id>`), never in a call's way.

Invariants
- `publish` only enqueues (bounded: past MAX_QUEUED events the oldest is dropped and counted);
  one background task connects (nats-py, reconnecting on its own) and publishes each event
  through JetStream with an ack, so the event is in the AGENT stream when it is acknowledged.
- An event that cannot be published after a few tries is logged and dropped: usage events
  feed the trace and the registry's totals; the budget is enforced by the gateway's own count.
- Without a NATS URL events are logged only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging

from agent import contract

log = logging.getLogger("gateway.publish")
MAX_QUEUED = 10_000
ATTEMPTS = 5


class Publisher:
    def __init__(self, nats_url: str | None, *, creds_file: str | None = None, inbox_prefix: str | None = None):
        self.nats_url = nats_url
        self.creds_file = creds_file
        self.inbox_prefix = inbox_prefix
        self.dropped = 0
        self.published = 0
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._nc = None

    def publish(self, task_id: str, event: dict) -> None:
        data = json.dumps(event, separators=(",", ":")).encode()
        if not self.nats_url:
            log.info("usage %s", data.decode())
            return
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((contract.subject_events(task_id), data))
        self._ready.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-publisher")

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the queue is empty (or `timeout`): for a clean stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue and loop.time() < deadline and self._task is not None and not self._task.done():
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    async def _connect(self):
        import sys

        # nats-py imports aiohttp (present in the image for the Kubernetes client) only for its websocket
        # transport, which the gateway does not use (nats:// or tls://): 11 MB of the sidecar's RSS.
        sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
        import nats

        options: dict = {"name": "dockyard-gateway", "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5}
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        return await nats.connect(self.nats_url, **options)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                if self._nc is None:
                    self._nc = await self._connect()
                js = self._nc.jetstream()
                while True:
                    if not self._queue:
                        self._ready.clear()
                        await self._ready.wait()
                    subject, data = self._queue[0]
                    await self._send(js, subject, data)
                    self._queue.popleft()
                    delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS away: try again
                log.warning("gateway: cannot reach NATS (%s); retrying in %.1fs", exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _send(self, js, subject: str, data: bytes) -> None:
        for attempt in range(ATTEMPTS):
            try:
                await js.publish(subject, data, timeout=2)
                self.published += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if attempt == ATTEMPTS - 1:
                    log.warning("gateway: dropping a usage event for %s: %s", subject, exc or type(exc).__name__)
                    self.dropped += 1
                    return
                await asyncio.sleep(0.1 * 2**attempt)
