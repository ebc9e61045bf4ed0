"""The tracker against a real nats-server: registry records follow status and phase events.

Forward-only (finished stays finished), idempotent under redelivery (attempts
counted once), and durable (a restarted tracker continues where it stopped).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import contract
from functions.stream import app as stream
from functions.core.registry import new_record
from functions.core.tracker import DURABLE, Tracker, apply_event
from tests.conftest import eventually_async

pytestmark = pytest.mark.timeout(60)

STARTED = {"type": contract.EV_STATUS, "state": contract.STATE_STARTED}


def record(**fields) -> dict:
    return {**new_record("t-1", task=None, spec_hash=None, now="2030-01-01T00:00:00.000Z"), **fields}


# --- apply_event: the rules, as a pure function ---------------------------------


def test_status_and_phase_events_update_the_record():
    r = apply_event(record(), STARTED, 3, now="T1")
    assert (r["state"], r["attempts"], r["events_seq"], r["updated_at"]) == ("started", 1, 3, "T1")
    r = apply_event(r, {"type": contract.EV_PHASE, "phase": contract.PHASE_TACTICAL}, 4, now="T2")
    assert (r["state"], r["phase"], r["attempts"], r["updated_at"]) == ("started", "TACTICAL", 1, "T2")
    r = apply_event(r, {"type": contract.EV_STATUS, "state": contract.STATE_RETRYING}, 5)
    r = apply_event(r, {"type": contract.EV_STATUS, "state": contract.STATE_RESUMED}, 6)
    assert (r["state"], r["attempts"]) == ("resumed", 2)
    done = {"type": contract.EV_STATUS, "state": "finished", "outcome": "failed", "reason": "tests fail"}
    r = apply_event(r, done, 7)
    assert (r["state"], r["outcome"], r["reason"], r["attempts"]) == ("finished", "failed", "tests fail", 2)


def test_redelivered_and_older_events_change_nothing():
    r = apply_event(record(), STARTED, 3)
    assert apply_event(r, STARTED, 3) is None  # the same message again
    assert apply_event(r, {"type": contract.EV_PHASE, "phase": "STRATEGIC"}, 2) is None  # an older one


def test_a_finished_record_never_moves_back():
    r = record(state=contract.STATE_FINISHED, outcome=contract.OUTCOME_DONE, events_seq=5)
    assert apply_event(r, STARTED, 9) is None
    assert apply_event(r, {"type": contract.EV_PHASE, "phase": "TACTICAL"}, 10) is None
    # Finished by someone else (job_finished) without any event seen: still final.
    assert apply_event(record(state=contract.STATE_FINISHED), STARTED, 1) is None
    # Only usage still adds up: the gateway's last event may come after the agent's end.
    late = apply_event(r, {"type": contract.EV_USAGE, "tokens": 7}, 11)
    assert (late["state"], late["outcome"], late["usage"]["tokens"]) == ("finished", "done", 7)


def test_usage_events_are_summed_per_call_and_a_redelivery_counts_once():
    call = {"type": contract.EV_USAGE, "input_tokens": 100, "output_tokens": 20, "cached_tokens": 40, "tokens": 120,
            "cost_usd": 0.0015, "totals": {"tokens": 120}}
    r = apply_event(record(), call, 3)
    r = apply_event(r, {**call, "totals": {"tokens": 120}}, 4)  # a retried pod's gateway counts from 0 again
    assert apply_event(r, call, 4) is None
    r = apply_event(r, {"type": contract.EV_USAGE, "refused": "limits.max_tokens = 200", "tokens": 0}, 5)
    assert r["usage"] == {"calls": 2, "refused": 1, "input_tokens": 200, "output_tokens": 40, "cached_tokens": 80, "tokens": 240, "cost_usd": 0.003}
    # Whatever the agent's commands forge on their own subject: nonsense is not added.
    r = apply_event(r, {"type": contract.EV_USAGE, "tokens": -5, "cost_usd": "lots", "input_tokens": True}, 6)
    assert r["usage"]["tokens"] == 240 and r["usage"]["calls"] == 3


# --- the tracker on a real stream -------------------------------------------------


async def publish(js, task_id: str, type_: str, **fields) -> int:
    body = {"type": type_, "task_id": task_id, "ts": contract.iso_utc(), **fields}
    return (await js.publish(contract.subject_events(task_id), json.dumps(body).encode())).seq


async def acked_through(js, seq: int, durable: str = DURABLE) -> None:
    async def acked() -> bool:
        try:
            info = await js.consumer_info(contract.STREAM_NAME, durable)
        except Exception:  # not created yet, or JetStream not back yet
            return False
        return info.ack_floor.stream_seq >= seq

    await eventually_async(acked, f"tracker {durable} to acknowledge sequence {seq}")


async def register(registry, task_id: str) -> None:
    assert await registry.create(task_id, new_record(task_id, task=None, spec_hash=None, now=contract.iso_utc()))


@pytest.fixture
async def tracker_bus(open_bus):
    """The tracker's own NATS user, as the stream Service runs it."""
    return await open_bus("tracker")


async def test_tracker_follows_events_and_never_regresses(bus, tracker_bus):
    task = "t-track"
    await register(bus.registry, task)
    tracker = Tracker(tracker_bus.js, tracker_bus.registry, fetch_timeout=0.2)
    tracker.start()
    try:
        await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_STARTED)
        await publish(bus.js, task, contract.EV_PHASE, phase=contract.PHASE_STRATEGIC)
        await publish(bus.js, task, contract.EV_TOOL, name="execute")  # not tracked
        await publish(bus.js, task, contract.EV_PHASE, phase=contract.PHASE_TACTICAL)
        await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_RETRYING)
        await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_RESUMED)
        await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_FINISHED, outcome=contract.OUTCOME_DONE)
        # Late stragglers after the end must not reopen the task.
        await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_STARTED)
        last = await publish(bus.js, task, contract.EV_PHASE, phase=contract.PHASE_STRATEGIC)
        await publish(bus.js, "t-unregistered", contract.EV_STATUS, state=contract.STATE_STARTED)  # skipped, acked
        await acked_through(bus.js, last + 1)
    finally:
        await tracker.stop()

    r = await bus.registry.get(task)
    assert (r["state"], r["outcome"], r["phase"], r["attempts"]) == ("finished", "done", "TACTICAL", 2)
    assert await bus.registry.get("t-unregistered") is None


async def test_a_restarted_tracker_continues_and_redelivery_is_idempotent(bus, tracker_bus):
    task = "t-durable"
    await register(bus.registry, task)
    first = Tracker(tracker_bus.js, tracker_bus.registry, fetch_timeout=0.2)
    first.start()
    seq = await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_STARTED)
    await acked_through(bus.js, seq)
    await first.stop()

    # While no tracker runs, the task goes on.
    await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_RETRYING)
    await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_RESUMED)
    last = await publish(bus.js, task, contract.EV_PHASE, phase=contract.PHASE_TACTICAL)
    second = Tracker(tracker_bus.js, tracker_bus.registry, fetch_timeout=0.2)
    second.start()
    await acked_through(bus.js, last)
    await second.stop()
    after_restart = await bus.registry.get(task)
    assert (after_restart["state"], after_restart["phase"], after_restart["attempts"]) == ("resumed", "TACTICAL", 2)

    # Every event delivered again (a consumer starting from the beginning): nothing changes.
    replay = Tracker(tracker_bus.js, tracker_bus.registry, durable="replay-everything", fetch_timeout=0.2)
    replay.start()
    await acked_through(bus.js, last, durable="replay-everything")
    await replay.stop()
    assert await bus.registry.get(task) == after_restart


async def test_the_stream_app_runs_the_tracker_in_its_lifespan(settings, bus):
    task = "t-lifespan"
    await register(bus.registry, task)
    app = stream.create_app(settings, run_tracker=True)
    async with app.router.lifespan_context(app):
        await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_STARTED)
        last = await publish(bus.js, task, contract.EV_PHASE, phase=contract.PHASE_STRATEGIC)
        await acked_through(bus.js, last)
    r = await bus.registry.get(task)
    assert (r["state"], r["phase"], r["attempts"]) == ("started", "STRATEGIC", 1)


async def test_tracker_survives_a_nats_restart(bus, tracker_bus, nats_server):
    task = "t-track-restart"
    await register(bus.registry, task)
    tracker = Tracker(tracker_bus.js, tracker_bus.registry, fetch_timeout=0.2)
    tracker.start()
    try:
        seq = await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_STARTED)
        await acked_through(bus.js, seq)
        await asyncio.to_thread(nats_server.restart)

        async def published() -> int | None:  # once JetStream is back
            try:
                return await publish(bus.js, task, contract.EV_STATUS, state=contract.STATE_FINISHED, outcome="done")
            except Exception:
                return None

        last = await eventually_async(published, "a publish after the restart", interval=0.1)
        await acked_through(bus.js, last)
    finally:
        await tracker.stop()
    r = await bus.registry.get(task)
    assert (r["state"], r["outcome"], r["attempts"]) == ("finished", "done", 1)


async def test_a_cancel_that_nats_py_turns_into_its_own_error_still_stops_the_tracker():
    """nats-py may catch the CancelledError inside a fetch and raise its own error instead; the
    tracker's retry loop must not take that for NATS trouble and go on (a stop would hang)."""
    import nats.errors

    from functions.core.tracker import Tracker

    fetching = asyncio.Event()

    class SwallowingSubscription:
        async def fetch(self, batch, timeout):
            fetching.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise nats.errors.ConnectionClosedError() from None

        async def unsubscribe(self):
            pass

    class Js:
        async def pull_subscribe(self, *args, **kwargs):
            return SwallowingSubscription()

    tracker = Tracker(Js(), registry=None)
    task = tracker.start()
    await asyncio.wait_for(fetching.wait(), 30)
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
    assert task.done()
