"""The local runtime's own status events (a task is retrying), published where the agent's go.

Invariant: best effort. The events only inform the stream and the CLI; a NATS
that is down is logged and never stops the supervision (it delays a retry by
the bus's bounded connect and publish timeouts at most). The connection is the
functions' `Bus` (one way to reach NATS, its errors translated there), opened
on first use and reused; the events therefore carry `ts` in the one format of
every `ts` field (`contract.iso_utc`).
"""

from __future__ import annotations

import logging
from typing import Any

from agent import contract
from functions.core.bus import Bus

log = logging.getLogger("dockyard.runtime.local")


class StatusEvents:
    """Publishes `{"type": "status", "source": "runtime", ...}` on a task's event subject."""

    def __init__(self, nats_url: str | None, nats_creds: str = ""):
        self.nats_url = nats_url
        self.nats_creds = nats_creds  # the launcher's own NATS user
        self._bus: Bus | None = None

    async def publish(self, task_id: str, **fields: Any) -> None:
        if not self.nats_url:
            return
        try:
            if self._bus is None or self._bus.nc.is_closed:
                self._bus = await Bus.open(self.nats_url, creds=self.nats_creds, name="dockyard-runtime")
            await self._bus.publish_event(task_id, contract.EV_STATUS, source="runtime", **fields)
        except Exception as exc:  # noqa: BLE001 - best effort: Unavailable, or anything else
            log.warning("task %s: could not publish a status event: %s", task_id, exc)

    async def close(self) -> None:
        if self._bus is not None:
            bus, self._bus = self._bus, None
            try:
                await bus.nc.drain()
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.debug("draining the status events' NATS connection: %s", exc)
