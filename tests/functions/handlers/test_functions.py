"""The four functions over real HTTP (ASGI), a real NATS, a real registry; the runtime keeps state in memory."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from agent import contract
from agent.storage import open_store
from functions.main import Context, create_app
from functions.core.registry import new_record
from functions.core.settings import Settings
from tests.conftest import eventually_async

SUBMITTED = contract.EVENT_TASK_SUBMITTED
COMMAND = contract.EVENT_TASK_COMMAND


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- malformed input: 4xx naming the field, nothing launched --------------------
RAW_CASES = [
    # (name, target, headers, body, status, field)
    ("plain json, not a CloudEvent", "task_submitted", {"content-type": "application/json"}, b'{"prompt": "x"}', 400, "ce-specversion"),
    ("no body, no headers", "task_submitted", {}, b"", 400, "ce-specversion"),
    (
        "binary without ce-type",
        "task_submitted",
        {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "content-type": "application/json"},
        b'{"prompt": "x"}',
        400,
        "ce-type",
    ),
    (
        "specversion 0.3",
        "task_submitted",
        {"ce-specversion": "0.3", "ce-id": "1", "ce-source": "s", "ce-type": SUBMITTED, "content-type": "application/json"},
        b'{"prompt": "x"}',
        400,
        "ce-specversion",
    ),
    (
        "non-JSON data",
        "task_submitted",
        {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": SUBMITTED, "content-type": "text/plain"},
        b"please fix the bug",
        415,
        "data",
    ),
    (
        "broken JSON data",
        "task_submitted",
        {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": SUBMITTED, "content-type": "application/json"},
        b'{"prompt": ',
        400,
        "data",
    ),
    ("structured, not JSON", "task_submitted", {"content-type": "application/cloudevents+json"}, b"{nope", 400, "body"),
    (
        "structured without type",
        "task_submitted",
        {"content-type": "application/cloudevents+json"},
        json.dumps({"specversion": "1.0", "id": "1", "source": "s", "data": {"prompt": "x"}}).encode(),
        400,
        "type",
    ),
    (
        "structured with text data",
        "task_submitted",
        {"content-type": "application/cloudevents+json"},
        json.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": SUBMITTED, "datacontenttype": "text/plain", "data": "x"}).encode(),
        415,
        "data",
    ),
    ("batch", "task_submitted", {"content-type": "application/cloudevents-batch+json"}, b"[]", 415, "content-type"),
    (
        "body over 256 KiB (1 MB prompt)",
        "task_submitted",
        {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": SUBMITTED, "content-type": "application/json"},
        json.dumps({"prompt": "x" * 1_000_000}).encode(),
        413,
        "body",
    ),
]


@pytest.mark.parametrize("name, target, headers, body, status, field", RAW_CASES, ids=[c[0] for c in RAW_CASES])
async def test_malformed_requests_are_refused(client, bus, runtime, name, target, headers, body, status, field):
    response = await client.post(f"/{target}", headers=headers, content=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert response.json()["error"]
    assert runtime.tasks == {} and await bus.registry.list() == []


EVENT_CASES = [
    # (name, target, type, data, status, field)
    ("wrong type", "task_submitted", COMMAND, {"prompt": "x"}, 400, "ce-type"),
    ("data is a list", "task_submitted", SUBMITTED, [1, 2], 400, "data"),
    ("no data", "task_submitted", SUBMITTED, b"", 400, "data"),
    ("missing prompt", "task_submitted", SUBMITTED, {"repo": "https://e.com/r.git"}, 400, "prompt"),
    ("uppercase task id", "task_submitted", SUBMITTED, {"prompt": "x", "task_id": "Fix-1"}, 400, "task_id"),
    ("dotdot task id", "task_submitted", SUBMITTED, {"prompt": "x", "task_id": ".."}, 400, "task_id"),
    ("41-char task id", "task_submitted", SUBMITTED, {"prompt": "x", "task_id": "a" * 41}, 400, "task_id"),
    ("100 KB prompt", "task_submitted", SUBMITTED, {"prompt": "x" * 100_000}, 413, "prompt"),
    ("bad limits", "task_submitted", SUBMITTED, {"prompt": "x", "limits": {"retries": -1}}, 400, "limits.retries"),
    ("unknown command op", "task_command", COMMAND, {"task_id": "t1", "op": "reboot"}, 400, "op"),
    ("message without text", "task_command", COMMAND, {"task_id": "t1", "op": "message"}, 400, "text"),
    ("command without task id", "task_command", COMMAND, {"op": "cancel"}, 400, "task_id"),
    ("job event that is no object", "job_finished", contract.EVENT_JOB_UPDATE, {"kind": "Job"}, 400, "data.metadata"),
    ("ping to task_command", "task_command", contract.EVENT_PING, {}, 400, "ce-type"),
]


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("name, target, type_, data, status, field", EVENT_CASES, ids=[c[0] for c in EVENT_CASES])
async def test_bad_events_are_refused(post, bus, runtime, name, target, type_, data, status, field, mode):
    if mode == "structured" and isinstance(data, bytes):
        data = None
    response = await post(target, type_, data, mode=mode)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert runtime.tasks == {} and await bus.registry.list() == []


# --- task_submitted ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_submit_registers_launches_and_announces(post, bus, runtime, events, mode):
    response = await post("task_submitted", SUBMITTED, {"prompt": "fix it", "task_id": "fix-1"}, mode=mode)
    assert response.status_code == 200, response.text
    assert response.json() == {"task_id": "fix-1", "status": "submitted"}

    record = await bus.registry.get("fix-1")
    assert record["state"] == contract.STATE_QUEUED
    assert record["task"]["prompt"] == "fix it"
    assert record["spec_hash"] == runtime.specs["fix-1"]
    assert runtime.tasks["fix-1"].state == "queued"
    published = await events("fix-1")
    assert [(e["type"], e["state"]) for e in published] == [(contract.EV_STATUS, contract.STATE_QUEUED)]


async def test_derived_id_and_redelivery(post, bus, runtime):
    first = await post("task_submitted", SUBMITTED, {"prompt": "x"}, source="cli", id="ev-1")
    again = await post("task_submitted", SUBMITTED, {"prompt": "x"}, source="cli", id="ev-1")
    task_id = contract.derive_task_id("cli", "ev-1")
    assert first.json() == {"task_id": task_id, "status": "submitted"}
    assert again.status_code == 200 and again.json() == {"task_id": task_id, "status": "already submitted"}
    assert runtime.created == 1 and list(runtime.tasks) == [task_id]


async def test_twenty_concurrent_deliveries_create_one_task(post, bus, runtime, events):
    data = {"prompt": "once", "task_id": "once"}
    responses = await asyncio.gather(*(post("task_submitted", SUBMITTED, data, id="same-event") for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.json()["status"] for r in responses).count("submitted") == 1
    assert runtime.created == 1
    assert [r["task_id"] for r in await bus.registry.list()] == ["once"]
    assert len([e for e in await events("once") if e.get("state") == contract.STATE_QUEUED]) == 1


async def test_same_id_other_spec_is_a_conflict(post, bus, runtime):
    await post("task_submitted", SUBMITTED, {"prompt": "first", "task_id": "t1"})
    response = await post("task_submitted", SUBMITTED, {"prompt": "second", "task_id": "t1"})
    assert response.status_code == 409
    assert response.json()["field"] == "task_id" and "t1" in response.json()["error"]
    assert (await bus.registry.get("t1"))["task"]["prompt"] == "first"
    assert runtime.created == 1


async def test_redelivery_completes_a_half_done_launch(post, bus, runtime, events):
    """The record was created but the launch never happened (crash): the redelivery launches."""
    data = {"prompt": "x", "task_id": "half"}
    from functions.core.task import parse_task

    task = parse_task(data, source="s", event_id="e")
    await bus.registry.create("half", new_record("half", task=task.to_dict(), spec_hash=task.spec_hash, now="t"))
    response = await post("task_submitted", SUBMITTED, data)
    assert response.json()["status"] == "already submitted"
    assert runtime.tasks["half"].state == "queued" and runtime.created == 1
    assert await events("half") == []  # only the delivery that created the record announces


async def test_redelivery_of_a_finished_task_does_not_relaunch(post, bus, runtime):
    data = {"prompt": "x", "task_id": "done"}
    await post("task_submitted", SUBMITTED, data)
    await bus.registry.update("done", lambda r: {**r, "state": contract.STATE_FINISHED})
    runtime.tasks.clear(), runtime.specs.clear()  # the Job is gone (ttlSecondsAfterFinished)
    response = await post("task_submitted", SUBMITTED, data)
    assert response.json()["status"] == "already finished"
    assert runtime.tasks == {}


# --- job_finished --------------------------------------------------------------
def job(task_id: str, uid: str, condition: str | None, *, managed: bool = True, reason: str | None = None, **status) -> dict:
    labels = contract.agent_labels(task_id) if managed else {"app": "other"}
    conditions = [{"type": condition, "status": "True", "reason": reason}] if condition else []
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": contract.job_name(task_id), "uid": uid, "labels": labels},
        "status": {"conditions": conditions, **status},
    }


def finish_job(runtime, task_id: str, condition: str, **kw) -> dict:
    """The task's Job, finished as the runtime reports it (its uid is the one of the launch)."""
    runtime.finished_jobs[task_id] = job(task_id, runtime.uids.get(task_id) or f"uid-{task_id}", condition, **kw)
    return runtime.finished_jobs[task_id]


@pytest.fixture
def store(settings):
    return open_store(settings.store)


async def submitted(post, task_id: str) -> None:
    response = await post("task_submitted", SUBMITTED, {"prompt": "x", "task_id": task_id})
    assert response.status_code == 200


async def test_job_finished_ignores_other_and_unfinished_jobs(post, bus, events):
    await submitted(post, "t1")
    running = job("t1", "uid-1", None, active=1)
    suspended = job("t1", "uid-1", None)
    suspended["status"]["conditions"] = [{"type": "Failed", "status": "False"}, {"type": "Suspended", "status": "True"}]
    foreign = job("t1", "uid-1", "Complete", managed=False)
    for data in (running, suspended, foreign):
        response = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
        assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert (await bus.registry.get("t1"))["state"] == contract.STATE_QUEUED
    assert [e["state"] for e in await events("t1")] == [contract.STATE_QUEUED]


async def test_job_complete_with_final_snapshot(post, bus, runtime, events, store, settings):
    await submitted(post, "t1")
    store.put_bytes(contract.checkpoint_key("t1"), b"db")
    store.put_bytes(contract.final_archive_key("t1"), b"tar")
    store.put_bytes(contract.final_result_key("t1"), json.dumps({"outcome": "done", "summary": "fixed it"}).encode())

    uid = runtime.uids["t1"]
    assert (await bus.registry.get("t1"))["job_uid"] == uid  # recorded at launch
    data = finish_job(runtime, "t1", "Complete", reason="CompletionsReached", terminationMessage="bye")
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "done" and response.json()["final_snapshot_missing"] is False

    record = await bus.registry.get("t1")
    assert record["state"] == contract.STATE_FINISHED and record["outcome"] == "done"
    assert record["finished_uids"] == [uid] and record["job_uid"] == uid
    assert record["retention_seconds"] == settings.ttl_succeeded_seconds
    assert record["termination_message"] == "bye"
    assert contract.final_result_key("t1") in record["snapshot_keys"]

    # The same Job again (ApiServerSource sends every update): a no-op.
    again = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
    assert again.json()["status"] == "already handled"
    finished = [e for e in await events("t1") if e["state"] == contract.STATE_FINISHED]
    assert len(finished) == 1
    assert finished[0]["summary"] == "fixed it" and finished[0]["termination_message"] == "bye"
    assert finished[0]["final_snapshot_missing"] is False


async def test_job_failed_without_snapshot(post, bus, runtime, events, settings):
    await submitted(post, "t2")
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, finish_job(runtime, "t2", "Failed", reason="BackoffLimitExceeded"))
    assert response.status_code == 200
    record = await bus.registry.get("t2")
    assert record["outcome"] == contract.OUTCOME_FAILED and record["failure_class"] == contract.FAILURE_TRANSIENT
    assert record["reason"] == "the agent failed, retries used up; the last time: it exited with an error"
    assert record["retention_seconds"] == settings.ttl_failed_seconds
    assert record["final_snapshot_missing"] is True
    (finished,) = [e for e in await events("t2") if e["state"] == contract.STATE_FINISHED]
    assert finished["final_snapshot_missing"] is True and finished["outcome"] == "failed"


async def test_an_oom_killed_agent_s_reason_and_last_words_reach_the_record_and_the_trace(post, bus, runtime, events):
    """Issue 11, defect 7: the runtime reads the agent container's end from its pod (`status.agentExit`,
    `status.terminationMessage`: FallbackToLogsOnError's last lines); job_finished records them."""
    await submitted(post, "t-oom")
    data = finish_job(runtime, "t-oom", "Failed", reason="BackoffLimitExceeded",
                      agentExit={"reason": "OOMKilled", "exitCode": 137}, terminationMessage="step 41: cloning\nKilled")
    assert (await post("job_finished", contract.EVENT_JOB_UPDATE, data)).status_code == 200
    record = await bus.registry.get("t-oom")
    oom = "the agent failed, retries used up; the last time: OOMKilled (exit code 137)"
    assert (record["outcome"], record["reason"], record["detail"]) == (contract.OUTCOME_FAILED, oom, "step 41: cloning\nKilled")
    assert record["termination_message"] == "step 41: cloning\nKilled"
    (finished,) = [e for e in await events("t-oom") if e["state"] == contract.STATE_FINISHED]
    assert finished["reason"] == oom and finished["termination_message"].endswith("Killed")


async def test_job_failed_outcome_from_result_and_deadline(post, bus, runtime, store):
    await submitted(post, "t3")
    store.put_bytes(contract.final_archive_key("t3"), b"tar")
    store.put_bytes(contract.final_result_key("t3"), json.dumps({"outcome": "budget_exhausted"}).encode())
    await post("job_finished", contract.EVENT_JOB_UPDATE, finish_job(runtime, "t3", "Failed"))
    assert (await bus.registry.get("t3"))["outcome"] == contract.OUTCOME_BUDGET

    await submitted(post, "t4")
    await post("job_finished", contract.EVENT_JOB_UPDATE, finish_job(runtime, "t4", "Failed", reason="DeadlineExceeded"))
    record = await bus.registry.get("t4")
    assert record["outcome"] == contract.OUTCOME_DEADLINE
    deadline = record["task"]["limits"]["deadline_seconds"]
    assert record["reason"] == f"the deadline of {deadline} s passed, counted from the first start"  # the limit, in words
    assert (record["deadline_seconds"], record["failure_class"]) == (deadline, contract.FAILURE_TRANSIENT)


async def test_job_of_an_unknown_task_rebuilds_its_record(post, bus, runtime):
    data = finish_job(runtime, "lost", "Complete")
    data["metadata"]["annotations"] = {contract.ANNOTATION_TASK: json.dumps({"task_id": "lost", "prompt": "p"})}
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
    assert response.status_code == 200
    record = await bus.registry.get("lost")
    assert record["state"] == contract.STATE_FINISHED and record["task"]["prompt"] == "p"


async def test_job_with_bad_task_label_is_refused(post, bus):
    data = job("t1", "u1", "Complete")
    data["metadata"]["labels"][contract.LABEL_TASK_ID] = "Not/Valid"
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
    assert response.status_code == 400 and response.json()["field"] == "data.metadata.labels"


# --- snapshot_due --------------------------------------------------------------
async def responder(bus, task_id: str, reply: dict, seen: list):
    """A snapshotter stand-in on real NATS: answers requests on cmd.agent.<id>."""

    async def answer(msg):
        seen.append(json.loads(msg.data))
        await msg.respond(json.dumps(reply).encode())

    return await bus.nc.subscribe(contract.subject_cmd(task_id), cb=answer)


async def test_snapshot_due_asks_running_tasks_and_warns_about_stale_ones(post, bus, events, settings):
    for task_id in ("alive", "silent", "fresh", "over"):
        await submitted(post, task_id)
    long_ago = iso(datetime.now(timezone.utc) - timedelta(seconds=settings.snapshot_stale_seconds + 60))
    await bus.registry.update("silent", lambda r: {**r, "created_at": long_ago, "last_snapshot_at": long_ago})
    await bus.registry.update("over", lambda r: {**r, "state": contract.STATE_FINISHED})
    seen: list = []
    key = contract.checkpoint_key("alive")
    sub = await responder(bus, "alive", {"ok": True, "key": key, "uploaded": True}, seen)
    over_seen: list = []
    over_sub = await responder(bus, "over", {"ok": True}, over_seen)
    try:
        response = await post("snapshot_due", contract.EVENT_PING, {"reason": "snapshot-due"})
    finally:
        await sub.unsubscribe()
        await over_sub.unsubscribe()
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["asked"] == 3
    assert summary["snapshotted"] == ["alive"]
    assert summary["stale"] == ["silent"]
    assert summary["no_reply"] == ["fresh"]
    assert seen == [{"op": "snapshot"}] and over_seen == []

    alive = await bus.registry.get("alive")
    assert alive["last_snapshot_key"] == key and key in alive["snapshot_keys"] and alive["last_snapshot_at"]
    warnings = [e for e in await events("silent") if e["type"] == contract.EV_WARNING]
    assert len(warnings) == 1 and warnings[0]["reason"] == "snapshot_stale"
    assert [e for e in await events("fresh") if e["type"] == contract.EV_WARNING] == []


async def test_snapshot_due_records_a_finished_job_whose_event_never_came(post, bus, runtime, events, store):
    await submitted(post, "missed")
    await submitted(post, "running")
    store.put_bytes(contract.final_result_key("missed"), json.dumps({"outcome": "done", "summary": "ok"}).encode())
    finish_job(runtime, "missed", "Complete", reason="CompletionsReached")
    response = await post("snapshot_due", contract.EVENT_PING, None)
    assert response.status_code == 200, response.text
    assert response.json()["reconciled"] == ["missed"] and response.json()["asked"] == 1
    record = await bus.registry.get("missed")
    assert (record["state"], record["outcome"], record["finished_uids"]) == ("finished", "done", [runtime.uids["missed"]])
    assert [e["state"] for e in await events("missed")][-1] == contract.STATE_FINISHED
    assert (await bus.registry.get("running"))["state"] == contract.STATE_QUEUED

    # The event arriving late after all changes nothing.
    late = await post("job_finished", contract.EVENT_JOB_UPDATE, runtime.finished_jobs["missed"])
    assert late.json()["status"] == "already handled"


async def test_snapshot_due_drops_expired_finished_records(post, bus):
    await submitted(post, "old")
    await submitted(post, "recent")
    old = iso(datetime.now(timezone.utc) - timedelta(hours=2))
    await bus.registry.update("old", lambda r: {**r, "state": "finished", "finished_at": old, "retention_seconds": 3600})
    now = iso(datetime.now(timezone.utc))
    await bus.registry.update("recent", lambda r: {**r, "state": "finished", "finished_at": now, "retention_seconds": 3600})
    response = await post("snapshot_due", contract.EVENT_PING, None)
    assert response.json()["expired"] == ["old"] and response.json()["asked"] == 0
    assert await bus.registry.get("old") is None and await bus.registry.get("recent") is not None


# --- task_command --------------------------------------------------------------
async def test_command_for_unknown_task_is_404(post):
    response = await post("task_command", COMMAND, {"task_id": "ghost", "op": "cancel"})
    assert response.status_code == 404 and response.json()["field"] == "task_id"


async def test_cancel_falls_back_to_the_runtime_when_the_agent_is_silent(post, bus, runtime):
    await submitted(post, "t1")
    response = await post("task_command", COMMAND, {"task_id": "t1", "op": "cancel"})
    assert response.status_code == 200 and response.json()["via"] == "runtime"
    assert runtime.tasks["t1"].outcome == "cancelled"
    record = await bus.registry.get("t1")
    assert record["cancel_requested_at"]
    # No job-finished event follows a runtime stop, so the function records the end itself.
    assert (record["state"], record["outcome"]) == ("finished", "cancelled")


async def test_cancel_through_the_agent(post, bus, runtime):
    await submitted(post, "t1")
    seen: list = []
    sub = await responder(bus, "t1", {"ok": True, "detail": "stopping"}, seen)
    try:
        response = await post("task_command", COMMAND, {"task_id": "t1", "op": "cancel"})
    finally:
        await sub.unsubscribe()
    assert response.json() == {"task_id": "t1", "status": "cancelling", "via": "agent"}
    assert seen == [{"op": "cancel"}]
    assert runtime.tasks["t1"].outcome is None  # the agent stops itself; the runtime was not asked


async def test_cancel_of_a_finished_task_is_a_no_op(post, bus, runtime):
    await submitted(post, "t1")
    await bus.registry.update("t1", lambda r: {**r, "state": "finished", "outcome": "done"})
    response = await post("task_command", COMMAND, {"task_id": "t1", "op": "cancel"})
    assert response.status_code == 200 and response.json()["status"] == "already finished"
    assert runtime.tasks["t1"].outcome is None


async def test_message_needs_the_agent(post, bus):
    await submitted(post, "t1")
    silent = await post("task_command", COMMAND, {"task_id": "t1", "op": "message", "text": "use pytest"})
    assert silent.status_code == 503  # transient: the broker retries

    seen: list = []
    sub = await responder(bus, "t1", {"ok": True}, seen)
    try:
        response = await post("task_command", COMMAND, {"task_id": "t1", "op": "message", "text": "use pytest"})
    finally:
        await sub.unsubscribe()
    assert response.status_code == 200 and response.json()["status"] == "delivered"
    assert seen == [{"op": "message", "text": "use pytest"}]


async def test_message_refused_by_the_agent_is_422(post, bus):
    await submitted(post, "t1")
    sub = await responder(bus, "t1", {"ok": False, "error": "busy"}, [])
    try:
        response = await post("task_command", COMMAND, {"task_id": "t1", "op": "message", "text": "hi"})
    finally:
        await sub.unsubscribe()
    assert response.status_code == 422 and "busy" in response.json()["error"]


# --- the functions-framework entry points ---------------------------------------
async def test_functions_framework_app_maps_errors(settings, runtime, monkeypatch):
    from functions.core import bus as bus_module
    from functions import main

    monkeypatch.setattr(main, "_settings", settings)
    monkeypatch.setattr(main, "_runtime", runtime)
    monkeypatch.setattr(main, "_context", None)
    app = create_app("task_submitted")
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": SUBMITTED, "content-type": "application/json"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ff") as c:
            bad = await c.post("/", headers=headers, content=b'{"task_id": "x"}')
            good = await c.post("/", headers=headers, content=b'{"task_id": "ff-1", "prompt": "p"}')
    finally:
        await bus_module.disconnect()
    assert bad.status_code == 400 and bad.json()["field"] == "prompt"
    assert good.status_code == 200 and good.json()["task_id"] == "ff-1"
    assert list(runtime.tasks) == ["ff-1"]


async def test_nats_down_is_503(settings, runtime, tmp_path, monkeypatch):
    from functions.main import HANDLERS, starlette_endpoint
    from functions.core import bus as bus_module

    from tests.conftest import free_port

    monkeypatch.setattr(bus_module, "CONNECT_TIMEOUT_SECONDS", 0.5)
    dead = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=tmp_path)

    async def get_context():
        return Context(dead, await bus_module.connect(dead), runtime)

    from starlette.applications import Starlette
    from starlette.routing import Route

    app = Starlette(routes=[Route("/", starlette_endpoint(HANDLERS["task_submitted"], get_context), methods=["POST"])])
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": SUBMITTED, "content-type": "application/json"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        response = await c.post("/", headers=headers, content=b'{"prompt": "p"}')
    assert response.status_code == 503 and "not reachable" in response.json()["error"]
    assert runtime.tasks == {}


async def test_survives_a_nats_restart(post, bus, runtime, nats_server):
    await submitted(post, "before")
    nats_server.restart()
    statuses = []

    async def accepted() -> bool:  # 503 (transient) until the bus is back, then 200
        response = await post("task_submitted", SUBMITTED, {"prompt": "x", "task_id": "after"})
        statuses.append(response.status_code)
        return response.status_code == 200

    await eventually_async(accepted, "a submission accepted after the restart", interval=0.2)
    assert set(statuses) <= {200, 503}, statuses
    assert {r["task_id"] for r in await bus.registry.list()} == {"before", "after"}
