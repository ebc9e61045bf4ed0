"""Finding 4 of issue 9, replayed: forged platform events (Job updates, pings) are believed.

Now: the dev ingress refuses `dev.knative.*` types from outside (403); `job_finished`
reads the Job from the runtime and acts only on the Job recorded at launch, so a
forged update that does reach it (in a cluster, from anything that can post to the
Broker) is answered 200 "ignored" and changes nothing; `snapshot_due` runs one
round per window, kept in NATS, however many pings arrive at however many instances.

Two stacks: `dockyard dev` over HTTP (real agent, local runtime, embedded nats-server),
and the functions over HTTP (ASGI) with a real nats-server.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import nats
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from agent import contract
from functions.cli import client
from functions.cli.demo import EXAMPLE_MODEL, EXAMPLE_TASK
from functions.core.bus import Bus
from functions.core.settings import Settings
from functions.main import HANDLERS, Context, starlette_endpoint
from tests.conftest import eventually, eventually_async
from tests.dev_process import DevServer
from tests.functions.conftest import MemoryRuntime
from tests.functions.conftest import cloudevent_request as ce

ATTACKER_MESSAGE = "pwned by a forged event"
STRUCTURED = {"content-type": "application/cloudevents+json"}


def forged_job(task_id: str, uid: str = "made-up-uid") -> dict:
    """What the attacker posted: a Failed Job with the victim's task-id label and a message of theirs."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": contract.job_name(task_id), "uid": uid, "labels": contract.agent_labels(task_id)},
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "Forged"}],
            "terminationMessage": ATTACKER_MESSAGE,
        },
    }


def structured(type_: str, data, n: int = 0) -> str:
    return json.dumps({"specversion": "1.0", "id": f"forged-{n}", "source": "attacker", "type": type_, "data": data})


# --- dockyard dev over HTTP ------------------------------------------------------
async def _forge_at_the_ingress(url: str, task_id: str, uid: str, auth: dict) -> list[httpx.Response]:
    """Forged platform events, sent with a valid write token: even a token holder cannot post them."""
    async with httpx.AsyncClient(timeout=30, headers=auth) as http:
        updates = [
            http.post(f"{url}/", content=structured(contract.EVENT_JOB_UPDATE, forged_job(task_id, u)), headers=STRUCTURED)
            for u in ("made-up-uid", uid)
        ]
        headers, body = ce(contract.EVENT_JOB_UPDATE, forged_job(task_id))
        updates.append(http.post(f"{url}/", content=body, headers=headers))
        pings = [http.post(f"{url}/", content=structured(contract.EVENT_PING, None, n), headers=STRUCTURED) for n in range(30)]
        return await asyncio.gather(*updates, *pings)


@pytest.fixture
def dev(tmp_path):
    server = DevServer(tmp_path / "data").start()
    yield server
    server.stop()


def test_forged_platform_events_at_the_dev_ingress_are_refused(dev):
    task = {**json.loads(EXAMPLE_TASK.read_text()), "model": EXAMPLE_MODEL, "task_id": "victim"}
    task_id = client.submit_task(dev.url, task, dev.token)

    def started() -> dict | None:
        record = httpx.get(f"{dev.url}/api/tasks/{task_id}", headers=dev.headers, timeout=5).json()
        return record if record.get("state") != contract.STATE_QUEUED else None

    eventually(started, "the victim task to start")
    uid = dev.supervisor_state(task_id)["uid"]
    answers = asyncio.run(_forge_at_the_ingress(dev.url, task_id, uid, dev.headers))
    assert [a.status_code for a in answers] == [403] * 33, [a.text for a in answers]
    assert {a.json()["field"] for a in answers} == {"ce-type"}

    # The victim runs to its own end; what is recorded is the runtime's word, not the attacker's.
    def recorded() -> dict | None:
        record = httpx.get(f"{dev.url}/api/tasks/{task_id}", headers=dev.headers, timeout=5).json()
        return record if record.get("finished_uids") else None

    record = eventually(recorded, "job_finished to record the victim's real end")
    assert record["outcome"] == contract.OUTCOME_DONE
    assert record["finished_uids"] == [uid] and record["job_uid"] == uid
    assert record["termination_message"] != ATTACKER_MESSAGE and record["reason"] != "Forged"
    # No ping got through: at most the timer's own tick (every 5 minutes) ran a round.
    assert dev.output().count("snapshot due: asked") <= 1
    assert not (dev.data_dir / "dead-letter.jsonl").exists() or "forged" not in (dev.data_dir / "dead-letter.jsonl").read_text()


# --- the functions with a real nats-server -----------------------------------------
def instance(settings: Settings, bus: Bus, runtime: MemoryRuntime) -> httpx.AsyncClient:
    """One instance of the functions, mounted as Knative serves them."""
    ctx = Context(settings, bus, runtime)

    async def get_context():
        return ctx

    app = Starlette(routes=[Route(f"/{n}", starlette_endpoint(h, get_context), methods=["POST"]) for n, h in HANDLERS.items()])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://functions")


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, nats_creds=nats_server.creds("functions"), data_dir=tmp_path / "data",
                    snapshot_timeout_seconds=0.5)


async def post(http: httpx.AsyncClient, target: str, type_: str, data) -> httpx.Response:
    headers, body = ce(type_, data)
    return await http.post(f"/{target}", headers=headers, content=body)


async def test_a_forged_update_that_reaches_job_finished_changes_nothing(settings):
    runtime = MemoryRuntime()
    bus = await Bus.open(settings.nats_url, creds=settings.nats_creds)
    http = instance(settings, bus, runtime)
    try:
        submitted = await post(http, "task_submitted", contract.EVENT_TASK_SUBMITTED, {"prompt": "x", "task_id": "victim"})
        assert submitted.status_code == 200
        await bus.registry.update("victim", lambda r: {**r, "state": contract.STATE_STARTED})
        before = await bus.registry.get("victim")
        assert before["job_uid"] == runtime.uids["victim"]

        # A made-up uid, then the victim's real uid while its Job runs: both ignored, with a 200 (no retry).
        for uid in ("made-up-uid", runtime.uids["victim"]):
            answer = await post(http, "job_finished", contract.EVENT_JOB_UPDATE, forged_job("victim", uid))
            assert answer.status_code == 200 and answer.json()["status"] == "ignored", answer.text
        assert await bus.registry.get("victim") == before
        assert runtime.tasks["victim"].state == "queued"  # nothing stopped it
    finally:
        await http.aclose()
        await bus.close()


async def test_job_finished_s_larger_body_limit_gives_a_forger_nothing_more(settings):
    """`job_finished` reads bodies up to 2 MiB (a real Job carries the task twice); anything else stays at
    256 KiB. A forged Job padded near the limit is still only a hint (ignored); one over it is a 413."""
    from functions.core.cloudevent import MAX_BODY_BYTES
    from functions.handlers.job_finished import MAX_BODY_BYTES as JOB_EVENT_MAX

    runtime = MemoryRuntime()
    bus = await Bus.open(settings.nats_url, creds=settings.nats_creds)
    http = instance(settings, bus, runtime)
    try:
        assert (await post(http, "task_submitted", contract.EVENT_TASK_SUBMITTED, {"prompt": "x", "task_id": "victim"})).status_code == 200
        before = await bus.registry.get("victim")
        padded = forged_job("victim", runtime.uids["victim"])
        padded["metadata"]["annotations"] = {"pad": "x" * (JOB_EVENT_MAX - 64 * 1024)}
        answer = await post(http, "job_finished", contract.EVENT_JOB_UPDATE, padded)
        assert answer.status_code == 200 and answer.json()["status"] == "ignored", answer.text[:200]
        padded["metadata"]["annotations"] = {"pad": "x" * JOB_EVENT_MAX}
        too_large = await post(http, "job_finished", contract.EVENT_JOB_UPDATE, padded)
        assert too_large.status_code == 413 and too_large.json()["field"] == "body"
        submit = await post(http, "task_submitted", contract.EVENT_TASK_SUBMITTED, {"prompt": "x" * MAX_BODY_BYTES})
        assert submit.status_code == 413
        assert await bus.registry.get("victim") == before
    finally:
        await http.aclose()
        await bus.close()


async def test_thirty_forged_pings_cost_one_snapshot_round(settings, nats_server):
    runtime = MemoryRuntime()
    buses = [await Bus.open(settings.nats_url, creds=settings.nats_creds) for _ in range(3)]  # three instances of the function
    clients = [instance(settings, b, runtime) for b in buses]
    asked: list[bytes] = []
    try:
        await post(clients[0], "task_submitted", contract.EVENT_TASK_SUBMITTED, {"prompt": "x", "task_id": "victim"})

        async def snapshotter(msg):
            asked.append(msg.data)
            await msg.respond(json.dumps({"ok": True, "key": contract.checkpoint_key("victim")}).encode())

        # The victim's snapshotter, with the credentials its launch gave it.
        victim = await nats.connect(settings.nats_url, user_credentials=nats_server.launch_creds("victim", "snapshotter"),
                                    inbox_prefix=contract.inbox_prefix("victim"))
        await victim.subscribe(contract.subject_cmd("victim"), cb=snapshotter)
        await victim.flush()
        answers = await asyncio.gather(*(post(clients[i % 3], "snapshot_due", contract.EVENT_PING, None) for i in range(30)))
        await victim.close()
        assert [a.status_code for a in answers] == [200] * 30
        assert [a.json().get("status") for a in answers].count("skipped") == 29
        await eventually_async(lambda: len(asked) >= 1, "the one round to reach the snapshotter")
        assert len(asked) == 1
    finally:
        for c in clients:
            await c.aclose()
        for b in buses:
            await b.close()
