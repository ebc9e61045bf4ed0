"""functions.core.registry over a real NATS KV bucket."""

from __future__ import annotations

import asyncio

from agent import contract
from functions.core.registry import TaskRegistry, new_record


def record(task_id: str, **fields) -> dict:
    return {**new_record(task_id, task={"prompt": "x"}, spec_hash="h1", now="2024-01-01T00:00:00.000Z"), **fields}


async def test_open_creates_the_bucket_once(bus):
    again = await TaskRegistry.open(bus.js)  # the bucket exists already: opened, not recreated
    assert await again.create("a", record("a"))
    assert (await bus.registry.get("a"))["task_id"] == "a"
    assert (await bus.js.key_value(contract.KV_BUCKET)) is not None


async def test_create_get_and_missing(bus):
    registry = bus.registry
    assert await registry.get("nope") is None
    assert isinstance(await registry.create("t1", record("t1")), int)  # created: its revision
    assert await registry.create("t1", record("t1", spec_hash="other")) is None
    stored = await registry.get("t1")
    assert stored["spec_hash"] == "h1" and stored["state"] == contract.STATE_QUEUED
    assert stored["finished_uids"] == [] and stored["snapshot_keys"] == []


async def test_concurrent_creates_have_one_winner(bus):
    results = await asyncio.gather(*(bus.registry.create("race", record("race", attempts=i)) for i in range(20)))
    assert sum(result is not None for result in results) == 1


async def test_update_is_compare_and_set(bus):
    registry = bus.registry
    await registry.create("t1", record("t1"))

    def bump(current):
        return {**current, "attempts": current["attempts"] + 1}

    await asyncio.gather(*(registry.update("t1", bump) for _ in range(20)))
    assert (await registry.get("t1"))["attempts"] == 20


async def test_update_without_change_and_of_unknown_task(bus):
    registry = bus.registry
    await registry.create("t1", record("t1"))
    revision = (await registry.kv.get("t1")).revision
    assert (await registry.update("t1", lambda r: None))["task_id"] == "t1"
    assert (await registry.kv.get("t1")).revision == revision  # nothing written
    assert await registry.update("ghost", lambda r: {**r, "state": "finished"}) is None


async def test_list_and_delete(bus):
    registry = bus.registry
    assert await registry.list() == []
    for name in ("b", "a", "c"):
        await registry.create(name, record(name))
    await registry.update("b", lambda r: {**r, "phase": contract.PHASE_TACTICAL})
    await registry.delete("c")
    listed = {r["task_id"]: r for r in await registry.list()}
    assert set(listed) == {"a", "b"}
    assert listed["b"]["phase"] == contract.PHASE_TACTICAL
    assert await registry.get("c") is None
    assert await registry.create("c", record("c"))  # a deleted id can be created again


async def test_an_update_from_a_known_revision_skips_the_read_and_falls_back_on_a_conflict(bus):
    registry = bus.registry
    created = record("k1")
    revision = await registry.create("k1", created)
    reads = []
    entry = registry._entry

    async def counted(task_id):
        reads.append(task_id)
        return await entry(task_id)

    registry._entry = counted
    stored = await registry.update("k1", lambda r: {**r, "job_uid": "u1"}, (created, revision))
    assert stored["job_uid"] == "u1" and reads == []  # one round trip: the write
    assert (await registry.get("k1"))["job_uid"] == "u1"

    # Someone (the tracker) wrote after the caller's create: the known revision is stale, so the
    # update reads the record again and keeps both changes.
    stale = await registry.create("k2", record("k2"))
    await registry.update("k2", lambda r: {**r, "state": contract.STATE_STARTED})
    reads.clear()
    stored = await registry.update("k2", lambda r: {**r, "job_uid": "u2"}, (record("k2"), stale))
    assert reads == ["k2"]  # the stale write was refused, then one read
    assert stored["job_uid"] == "u2" and stored["state"] == contract.STATE_STARTED
