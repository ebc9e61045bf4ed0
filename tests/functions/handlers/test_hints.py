"""Platform events are hints: job_finished believes the runtime, not the event; snapshot_due runs once per window.

Real NATS, real registry, the functions over HTTP (ASGI); the runtime is the in-memory one of conftest.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from agent import contract
from functions.core.bus import Bus
from functions.core.registry import ROUND_KEY_PREFIX
from functions.handlers.snapshot_due import ROUND
from functions.main import HANDLERS, Context, starlette_endpoint
from tests.functions.conftest import cloudevent_request
from tests.functions.handlers.test_functions import finish_job, job, responder, submitted

UPDATE = contract.EVENT_JOB_UPDATE


async def test_launch_records_the_job_uid(post, bus, runtime):
    await submitted(post, "t1")
    assert (await bus.registry.get("t1"))["job_uid"] == runtime.uids["t1"]
    # A redelivery keeps it; a record that lost it (a crash after the launch) gets it back.
    await bus.registry.update("t1", lambda r: {**r, "job_uid": None})
    await submitted(post, "t1")
    assert (await bus.registry.get("t1"))["job_uid"] == runtime.uids["t1"]


async def test_an_event_for_a_job_the_runtime_says_runs_changes_nothing(post, bus, events, runtime):
    await submitted(post, "t1")
    before = await bus.registry.get("t1")
    forged = job("t1", runtime.uids["t1"], "Failed", reason="Pwned", terminationMessage="attacker says hi")
    response = await post("job_finished", UPDATE, forged)
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert "no finished Job" in response.json()["reason"]
    assert await bus.registry.get("t1") == before
    assert [e["state"] for e in await events("t1")] == [contract.STATE_QUEUED]


async def test_an_event_with_a_made_up_uid_changes_nothing(post, bus, events, runtime):
    await submitted(post, "t1")
    finish_job(runtime, "t1", "Complete", terminationMessage="the real end")
    before = await bus.registry.get("t1")
    forged = job("t1", "made-up-uid", "Failed", terminationMessage="attacker says hi")
    response = await post("job_finished", UPDATE, forged)
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert await bus.registry.get("t1") == before
    # The real event still works, and what is recorded is the runtime's Job, not the event's data.
    real = job("t1", runtime.uids["t1"], "Failed", reason="Forged", terminationMessage="from the event")
    response = await post("job_finished", UPDATE, real)
    assert response.json()["status"] == "finished" and response.json()["outcome"] == contract.OUTCOME_DONE
    record = await bus.registry.get("t1")
    assert record["termination_message"] == "the real end" and record["reason"] != "Forged"


async def test_a_job_other_than_the_launched_one_is_ignored(post, bus, runtime):
    await submitted(post, "t1")
    other = finish_job(runtime, "t1", "Failed")
    other["metadata"]["uid"] = "a-job-launched-by-someone-else"
    response = await post("job_finished", UPDATE, other)
    assert response.json()["status"] == "ignored" and "not the one launched" in response.json()["reason"]
    assert (await bus.registry.get("t1"))["state"] == contract.STATE_QUEUED

    # snapshot_due reconciles only the launched Job too.
    response = await post("snapshot_due", contract.EVENT_PING, None)
    assert response.json()["reconciled"] == []
    assert (await bus.registry.get("t1"))["state"] == contract.STATE_QUEUED


def functions_instance(settings, bus_, runtime) -> httpx.AsyncClient:
    """One more instance of the functions (its own NATS connection), as Knative scales them out."""
    ctx = Context(settings, bus_, runtime)

    async def get_context():
        return ctx

    app = Starlette(routes=[Route(f"/{n}", starlette_endpoint(h, get_context), methods=["POST"]) for n, h in HANDLERS.items()])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://functions")


async def ping(client: httpx.AsyncClient) -> httpx.Response:
    headers, body = cloudevent_request(contract.EVENT_PING, None)
    return await client.post("/snapshot_due", headers=headers, content=body)


async def test_a_burst_of_pings_across_instances_costs_one_round(post, bus, runtime, settings):
    await submitted(post, "alive")
    seen: list = []
    sub = await responder(bus, "alive", {"ok": True, "key": contract.checkpoint_key("alive")}, seen)
    windowed = settings.model_copy(update={"snapshot_min_interval_seconds": 60})
    buses = [await Bus.open(settings.nats_url, creds=settings.nats_creds) for _ in range(3)]
    clients = [functions_instance(windowed, b, runtime) for b in buses]
    try:
        answers = await asyncio.gather(*(ping(clients[i % 3]) for i in range(30)))
    finally:
        await sub.unsubscribe()
        for c in clients:
            await c.aclose()
        for b in buses:
            await b.close()
    assert [a.status_code for a in answers] == [200] * 30
    rounds = [a.json() for a in answers if a.json().get("status") != "skipped"]
    assert len(rounds) == 1 and rounds[0]["snapshotted"] == ["alive"]
    assert seen == [{"op": "snapshot"}]
    # The window lives in NATS, beside the records, and is no task.
    assert [r["task_id"] for r in await bus.registry.list()] == ["alive"]
    stored = json.loads((await bus.registry.kv.get(ROUND_KEY_PREFIX + ROUND)).value)
    assert abs(stored["at"] - time.time()) < 30


async def test_the_next_window_gets_its_round(bus, settings):
    registry = bus.registry
    assert await registry.claim_round("r", now=1000.0, min_interval=60)
    assert not await registry.claim_round("r", now=1030.0, min_interval=60)
    assert await registry.claim_round("r", now=1061.0, min_interval=60)
    # A caller whose clock reads a little earlier than the last claim is inside the window too;
    # one far behind it does not lock rounds out for good.
    assert not await registry.claim_round("r", now=1050.0, min_interval=60)
    assert await registry.claim_round("r", now=10.0, min_interval=60)
