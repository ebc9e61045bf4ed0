"""The tracker: keeps each task's registry record in step with its status and phase events.

Invariants:
- It reads `events.agent.>` through one durable JetStream consumer, so a restart
  continues after the last acknowledged event. A message is acknowledged only
  after the registry holds its effect.
- Forward-only: a finished record is never changed again (but for its `usage`: the model gateway
  publishes from its own process, so its last event may land after the agent's end), and an event is
  applied only if its stream sequence is above the record's `events_seq`. A
  redelivered event therefore changes nothing, so `attempts` (the count of
  started/resumed events) is not counted twice. Events of one task arrive in
  stream order; only an event the registry refused several times comes back
  later, and is then dropped if a newer one was applied (state is the latest's).

Exactly one tracker runs per deployment (the stream app with `run_tracker=True`).
"""

from __future__ import annotations

import asyncio
import json
import logging

from agent import contract
from functions.core.bus import being_cancelled
from functions.core.registry import TaskRecord

log = logging.getLogger(__name__)

DURABLE = "dockyard-tracker"
TRACKED = (contract.EV_STATUS, contract.EV_PHASE, contract.EV_USAGE)
USAGE_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "tokens")
STATES = (
    contract.STATE_QUEUED,
    contract.STATE_STARTED,
    contract.STATE_RESUMED,
    contract.STATE_RETRYING,
    contract.STATE_FINISHED,
)
ATTEMPT_STATES = (contract.STATE_STARTED, contract.STATE_RESUMED)
END_FIELDS = ("reason", "failure_class", "detail")
APPLY_ATTEMPTS = 5  # registry failures for one event before it is left to redelivery


def apply_event(record: TaskRecord, event: dict, seq: int, *, now: str | None = None) -> TaskRecord | None:
    """The record after `event` (stream sequence `seq`), or None when it changes nothing."""
    kind = event.get("type")
    if seq <= (record.get("events_seq") or 0):
        return None
    if record.get("state") in contract.TERMINAL_STATES and kind != contract.EV_USAGE:
        return None
    updated = {**record, "events_seq": seq}
    if kind == contract.EV_PHASE:
        if isinstance(event.get("phase"), str):
            updated["phase"] = event["phase"]
    elif kind == contract.EV_USAGE:
        updated["usage"] = add_usage(record.get("usage"), event)
    elif kind == contract.EV_STATUS:
        state = event.get("state")
        if state not in STATES:
            return updated  # not understood: only remember that it was seen
        updated["state"] = state
        if state in ATTEMPT_STATES:
            updated["attempts"] = (record.get("attempts") or 0) + 1
        if state in contract.TERMINAL_STATES:
            updated["outcome"] = event.get("outcome") or record.get("outcome")
            updated.update(_end_words(event))
    updated["updated_at"] = now or contract.iso_utc()
    return updated


def _end_words(event: dict) -> dict:
    """The agent's own words for its end (job_finished completes them): strings only, a known class only."""
    words = {name: event[name] for name in END_FIELDS if isinstance(event.get(name), str) and event[name]}
    if words.get("failure_class") not in (None, contract.FAILURE_FATAL, contract.FAILURE_TRANSIENT):
        del words["failure_class"]
    return words


def add_usage(totals: dict | None, event: dict) -> dict:
    """The task's usage after one `usage` event of the model gateway: each call's own counts are summed
    (not the gateway's running totals, which start again in a retried pod's new gateway)."""
    totals = dict(totals or {"calls": 0, "refused": 0, "cost_usd": 0.0, **{name: 0 for name in USAGE_COUNTS}})
    if event.get("refused"):
        totals["refused"] = totals.get("refused", 0) + 1
        return totals
    totals["calls"] = totals.get("calls", 0) + 1
    for name in USAGE_COUNTS:
        value = event.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            totals[name] = totals.get(name, 0) + value
    cost = event.get("cost_usd")
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and 0 <= cost < float("inf"):
        totals["cost_usd"] = round(totals.get("cost_usd", 0.0) + cost, 6)
    return totals


def _task_id(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


class Tracker:
    """`await Tracker(js, registry).run()` until cancelled; or `start()` / `stop()` as a background task."""

    def __init__(self, js, registry, *, durable: str = DURABLE, batch: int = 64, fetch_timeout: float = 1.0):
        self.js = js
        self.registry = registry
        self.durable = durable
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self._task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self.run(), name="dockyard-tracker")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run(self) -> None:
        import nats.errors

        sub = None
        delay = 0.2
        try:
            while True:
                try:
                    if sub is None:
                        sub = await self._subscribe()
                    try:
                        msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
                    except nats.errors.TimeoutError:
                        continue
                    for msg in msgs:
                        await self._handle(msg)
                    delay = 0.2
                except Exception as exc:  # NATS away, consumer or stream gone: subscribe again
                    if being_cancelled():
                        raise  # nats-py turned our cancellation into its own error: stop, do not retry
                    log.warning("tracker: %s; retrying in %.1fs", exc or type(exc).__name__, delay)
                    if sub is not None:
                        await _quietly(sub.unsubscribe())
                    sub = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            # Without interest in its inbox the server hands the next tracker what this one
            # would have been sent; anything delivered and not acked returns after ack_wait.
            if sub is not None:
                await _quietly(sub.unsubscribe())

    async def _subscribe(self):
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=10,  # a message handed to a tracker that died comes back after this
        )
        return await self.js.pull_subscribe(
            contract.subject_events(">"), durable=self.durable, stream=contract.STREAM_NAME, config=config
        )

    async def _handle(self, msg) -> None:
        try:
            event = json.loads(msg.data)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("type") not in TRACKED:
            await msg.ack()
            return
        task_id = _task_id(msg.subject)
        seq = msg.metadata.sequence.stream
        for attempt in range(APPLY_ATTEMPTS):
            try:
                record = await self.registry.update(task_id, lambda r: apply_event(r, event, seq))
                break
            except Exception as exc:
                log.warning("tracker: task %s event %d: %s", task_id, seq, exc or type(exc).__name__)
                await asyncio.sleep(0.1 * 2**attempt)
        else:
            await msg.nak(delay=5)  # left for redelivery; a newer event of the task may supersede it
            return
        if record is None:
            log.debug("tracker: event %d for unregistered task %s", seq, task_id)
        await msg.ack()


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:
        pass
