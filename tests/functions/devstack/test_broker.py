"""functions.devstack.broker: routes from eventing/, retries with backoff, dead letters, the ingress, the ping timer.

Backoff is checked through the broker's injected `sleep`, which records each delay instead of waiting."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx
import pytest
from cloudevents.http import CloudEvent

from agent import contract
from functions.devstack.broker import (
    EVENTING_DIR,
    Broker,
    Delivery,
    ManifestError,
    PingTimer,
    Route,
    local_targets,
    parse_duration,
    parse_schedule,
    ping_from_manifests,
    routes_from_manifests,
)
from functions.main import HANDLERS


# --- manifests -----------------------------------------------------------------
def test_routes_from_eventing_match_the_four_functions():
    routes = routes_from_manifests(EVENTING_DIR)
    assert {r.event_type: r.function for r in routes} == {
        contract.EVENT_TASK_SUBMITTED: "task_submitted",
        contract.EVENT_JOB_UPDATE: "job_finished",
        contract.EVENT_PING: "snapshot_due",
        contract.EVENT_TASK_COMMAND: "task_command",
    }
    assert {r.function for r in routes} == set(HANDLERS)
    for route in routes:
        assert route.attributes == {"type": route.event_type}  # filter on type only
        assert route.delivery == Delivery(retry=5, backoff_policy="exponential", backoff_delay=0.5, dead_letter_sink="dead-letter")


def test_ping_source_and_api_server_source_wiring():
    ping = ping_from_manifests(EVENTING_DIR)
    assert (ping.name, ping.every_minutes) == ("snapshot-due", 5)
    assert ping.event()["type"] == contract.EVENT_PING

    import yaml

    docs = [d for f in EVENTING_DIR.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d]
    (source,) = [d for d in docs if d["kind"] == "ApiServerSource"]
    assert source["spec"]["mode"] == "Resource"
    (resource,) = source["spec"]["resources"]
    assert resource["apiVersion"] == "batch/v1" and resource["kind"] == "Job"
    assert resource["selector"]["matchLabels"] == {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == contract.AGENTS_NAMESPACE
    (broker,) = [d for d in docs if d["kind"] == "Broker"]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == broker["spec"]["config"]["name"]]
    assert yaml.safe_load(config["data"]["channel-template-spec"])["kind"] == "NatsJetStreamChannel"
    kustomization = yaml.safe_load((EVENTING_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f.name for f in EVENTING_DIR.glob("*.yaml") if f.name != "kustomization.yaml")


@pytest.mark.parametrize("expr, minutes", [("* * * * *", 1), ("*/5 * * * *", 5), ("*/15  *  * * *", 15)])
def test_parse_schedule(expr, minutes):
    assert parse_schedule(expr) == minutes


@pytest.mark.parametrize("expr", ["0 * * * *", "*/5 1 * * *", "*/0 * * * *", "@hourly", "", "*/5 * * *"])
def test_parse_schedule_refuses_other_forms(expr):
    with pytest.raises(ManifestError, match="understands only"):
        parse_schedule(expr)


def test_durations_and_backoff():
    assert parse_duration("PT0.5S") == 0.5
    assert parse_duration("PT1M30S") == 90
    assert parse_duration("P1DT1H") == 90000
    with pytest.raises(ManifestError):
        parse_duration("0.5s")
    exponential = Delivery(retry=3, backoff_delay=0.5)
    assert [exponential.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    linear = Delivery(retry=3, backoff_policy="linear", backoff_delay=0.5)
    assert [linear.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]


def test_next_ping_fire_time():
    ping = ping_from_manifests(EVENTING_DIR)
    t = datetime(2024, 1, 1, 10, 3, 20, tzinfo=timezone.utc).timestamp()
    assert datetime.fromtimestamp(ping.next_fire(t), timezone.utc).minute == 5
    on_the_tick = datetime(2024, 1, 1, 10, 55, 0, tzinfo=timezone.utc).timestamp()
    assert datetime.fromtimestamp(ping.next_fire(on_the_tick), timezone.utc).hour == 11


# --- delivery ------------------------------------------------------------------
class Function:
    """A target that answers from a script of statuses and records the events it saw."""

    def __init__(self, *statuses: int):
        self.script = list(statuses)
        self.seen: list[str] = []

    async def __call__(self, event: CloudEvent):
        self.seen.append(event["id"])
        status = self.script.pop(0) if self.script else 200
        if status == 500:
            raise RuntimeError("crashed")
        return status, ({"ok": True} if status < 400 else {"error": f"status {status}", "field": None})


@pytest.fixture
def sleeps():
    return []


def recorder(sleeps: list):
    async def sleep(seconds):
        sleeps.append(seconds)

    return sleep


def make_broker(tmp_path, sleeps, routes=None, **functions):
    targets = {name: functions.get(name, Function()) for name in HANDLERS}
    return Broker(routes or routes_from_manifests(EVENTING_DIR), targets, tmp_path / "dead-letter.jsonl", sleep=recorder(sleeps))


def event(type_=contract.EVENT_TASK_SUBMITTED, data=None) -> CloudEvent:
    return CloudEvent({"type": type_, "source": "test"}, data or {"prompt": "x"})


def dead_letters(tmp_path) -> list[dict]:
    path = tmp_path / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_retries_5xx_with_backoff_then_succeeds(tmp_path, sleeps):
    flaky = Function(503, 503, 200)
    broker = make_broker(tmp_path, sleeps, task_submitted=flaky)
    (result,) = await broker.deliver(event())
    assert (result.status, result.attempts) == (200, 3)
    assert len(flaky.seen) == 3 and sleeps == [0.5, 1.0]
    assert dead_letters(tmp_path) == []


async def test_never_retries_4xx_and_dead_letters_it(tmp_path, sleeps):
    picky = Function(400)
    broker = make_broker(tmp_path, sleeps, task_submitted=picky)
    ev = event()
    (result,) = await broker.deliver(ev)
    assert (result.status, result.attempts) == (400, 1)
    assert len(picky.seen) == 1 and sleeps == []
    (letter,) = dead_letters(tmp_path)
    assert letter["event"]["id"] == ev["id"] and letter["status"] == 400 and letter["attempts"] == 1


async def test_dead_letters_after_the_last_retry(tmp_path, sleeps):
    broken = Function(*[503] * 5, 500)  # the last attempt crashes
    broker = make_broker(tmp_path, sleeps, task_command=broken)
    (result,) = await broker.deliver(event(contract.EVENT_TASK_COMMAND, {"task_id": "t", "op": "cancel"}))
    assert (result.status, result.attempts) == (500, 6)  # the first attempt and retry: 5
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    (letter,) = dead_letters(tmp_path)
    assert letter["trigger"] == "task-command" and letter["dead_letter_sink"] == "dead-letter"
    assert letter["event"]["data"] == {"task_id": "t", "op": "cancel"} and "crashed" in letter["error"]


async def test_linear_backoff_and_a_trigger_without_retries(tmp_path, sleeps):
    routes = [
        Route("linear", {"type": contract.EVENT_TASK_SUBMITTED}, "task-submitted", Delivery(retry=3, backoff_policy="linear", backoff_delay=2.0)),
        Route("once", {"type": contract.EVENT_TASK_COMMAND}, "task-command", Delivery()),
    ]
    submitted, commands = Function(503, 503, 503, 200), Function(503)
    broker = make_broker(tmp_path, sleeps, routes, task_submitted=submitted, task_command=commands)
    (result,) = await broker.deliver(event())
    assert (result.status, result.attempts) == (200, 4) and sleeps == [2.0, 4.0, 6.0]
    (result,) = await broker.deliver(event(contract.EVENT_TASK_COMMAND, {"task_id": "t", "op": "cancel"}))
    assert (result.status, result.attempts) == (503, 1) and sleeps == [2.0, 4.0, 6.0]  # no retry, no wait
    assert [letter["trigger"] for letter in dead_letters(tmp_path)] == ["once"]


async def test_unrouted_event_goes_nowhere(tmp_path, sleeps):
    broker = make_broker(tmp_path, sleeps)
    assert await broker.deliver(event("dev.example.other")) == []


def test_triggers_must_name_existing_functions(tmp_path):
    with pytest.raises(ManifestError, match="task_command"):
        Broker(routes_from_manifests(EVENTING_DIR), {n: Function() for n in HANDLERS if n != "task_command"}, tmp_path / "x")


# --- ingress -------------------------------------------------------------------
async def ingress(broker: Broker, headers: dict, body: bytes) -> httpx.Response:
    """POST to the ingress, mounted as `dockyard dev` mounts it (functions/devstack/stack.py)."""
    from starlette.applications import Starlette
    from starlette.routing import Route as HttpRoute

    app = Starlette(routes=[HttpRoute("/", broker.ingress, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker") as c:
        return await c.post("/", headers=headers, content=body)


BINARY = {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "test", "content-type": "application/json"}


async def test_ingress_answers(tmp_path, sleeps):
    submitted, commands = Function(200), Function(404)
    broker = make_broker(tmp_path, sleeps, task_submitted=submitted, task_command=commands)

    ok = await ingress(broker, {**BINARY, "ce-type": contract.EVENT_TASK_SUBMITTED}, b'{"prompt": "x"}')
    assert ok.status_code == 202 and ok.json() == {"accepted": True, "results": {"task_submitted": {"ok": True}}}

    refused = await ingress(broker, {**BINARY, "ce-type": contract.EVENT_TASK_COMMAND}, b"{}")
    assert refused.status_code == 404 and refused.json()["error"] == "status 404"

    unknown = await ingress(broker, {**BINARY, "ce-type": "dev.example.other"}, b"{}")
    assert unknown.status_code == 400 and unknown.json()["field"] == "ce-type"

    garbage = await ingress(broker, {"content-type": "text/plain"}, b"hello")
    assert garbage.status_code == 400 and garbage.json()["field"] == "ce-specversion"
    assert len(submitted.seen) == 1


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("type_", [contract.EVENT_JOB_UPDATE, contract.EVENT_PING, "DEV.Knative.sources.ping", "dev.knative.other"])
async def test_ingress_refuses_platform_types_from_outside(tmp_path, sleeps, type_, mode):
    jobs, pings = Function(200), Function(200)
    broker = make_broker(tmp_path, sleeps, job_finished=jobs, snapshot_due=pings)
    data = {"metadata": {"uid": "made-up", "labels": contract.agent_labels("victim")}}
    if mode == "binary":
        response = await ingress(broker, {**BINARY, "ce-type": type_}, json.dumps(data).encode())
    else:
        event = {"specversion": "1.0", "id": "e1", "source": "test", "type": type_, "data": data}
        response = await ingress(broker, {"content-type": "application/cloudevents+json"}, json.dumps(event).encode())
    assert response.status_code == 403 and response.json()["field"] == "ce-type"
    assert jobs.seen == [] and pings.seen == []
    assert not broker.dead_letter_path.exists()
    # The platform's own path, inside the process, still delivers (the local runtime's job events, the ping timer).
    await broker.emit({"specversion": "1.0", "id": "u1-finished", "source": contract.EVENT_SOURCE_LOCAL_RUNTIME,
                       "type": contract.EVENT_JOB_UPDATE, "data": data})  # fmt: skip
    await PingTimer(broker, ping_from_manifests(EVENTING_DIR)).tick()
    assert jobs.seen == ["u1-finished"] and len(pings.seen) == 1


async def test_ingress_503_when_retries_are_exhausted(tmp_path, sleeps):
    broker = make_broker(tmp_path, sleeps, task_submitted=Function(*[503] * 6))
    response = await ingress(broker, {**BINARY, "ce-type": contract.EVENT_TASK_SUBMITTED}, b'{"prompt": "x"}')
    assert response.status_code == 503 and "dead-letter" in response.json()["error"]
    assert len(dead_letters(tmp_path)) == 1


# --- the real functions behind the broker ----------------------------------------
async def test_broker_delivers_to_the_real_functions(ctx, runtime, tmp_path):
    async def get_context():
        return ctx

    waits: list[float] = []
    broker = Broker.from_manifests(local_targets(HANDLERS, get_context), tmp_path, sleep=recorder(waits))
    headers = {**BINARY, "ce-type": contract.EVENT_TASK_SUBMITTED}
    accepted = await ingress(broker, headers, b'{"prompt": "x", "task_id": "via-broker"}')
    assert accepted.status_code == 202
    assert accepted.json()["results"]["task_submitted"] == {"task_id": "via-broker", "status": "submitted"}
    assert list(runtime.tasks) == ["via-broker"]

    bad = await ingress(broker, headers, b'{"task_id": "no-prompt"}')
    assert bad.status_code == 400 and bad.json()["field"] == "prompt"
    assert dead_letters(tmp_path)[0]["event"]["data"] == {"task_id": "no-prompt"}
    assert waits == []  # 4xx: never retried

    timer = PingTimer(broker, ping_from_manifests(EVENTING_DIR))
    (tick,) = await timer.tick()  # one tick, now: the timer's own waits are tested below
    assert tick.status == 200 and tick.body["asked"] == 1


async def test_ping_timer_ticks_on_the_schedule(tmp_path):
    import asyncio

    snapshots = Function()
    broker = make_broker(tmp_path, [], snapshot_due=snapshots)
    start = datetime(2024, 1, 1, 10, 3, 20, tzinfo=timezone.utc).timestamp()
    now = [start]
    waits: list[float] = []

    async def sleep(seconds):
        if len(waits) == 2:
            raise asyncio.CancelledError
        waits.append(seconds)
        now[0] += seconds

    timer = PingTimer(broker, ping_from_manifests(EVENTING_DIR), clock=lambda: now[0], sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        await timer.run()
    assert waits == [100.0, 300.0]  # to 10:05:00, then every five minutes
    assert len(snapshots.seen) == 2


async def test_emit_raises_when_delivery_failed(tmp_path, sleeps):
    from functions.errors import Unavailable

    jobs = Function(*[503] * 6, 200)
    broker = make_broker(tmp_path, sleeps, job_finished=jobs)
    structured = {"specversion": "1.0", "id": "u1-finished", "source": contract.EVENT_SOURCE_LOCAL_RUNTIME,
                  "type": contract.EVENT_JOB_UPDATE, "data": {"kind": "Job"}}
    with pytest.raises(Unavailable, match="job-finished"):
        await broker.emit(structured)
    await broker.emit(structured)  # the sender's retry
    assert jobs.seen == ["u1-finished"] * 7


# --- the dead-letter file is bounded ------------------------------------------------------


async def test_the_dead_letter_file_keeps_the_newest_within_its_caps_and_counts_the_dropped(tmp_path, sleeps):
    from functions.devstack.broker import DeadLetterFile

    broker = make_broker(tmp_path, sleeps, task_submitted=Function(*[400] * 30))
    broker.dead_letters = DeadLetterFile(broker.dead_letter_path, max_count=10, max_bytes=6000, max_record_bytes=2000)
    sent = [event(data={"prompt": "p" * (100 if n % 2 else 50_000), "n": n}) for n in range(30)]
    for ev in sent:
        await broker.deliver(ev)
    letters = dead_letters(tmp_path)
    assert broker.dead_letter_path.stat().st_size <= 6000 and len(letters) <= 10
    assert [letter["event"]["id"] for letter in letters] == [ev["id"] for ev in sent[-len(letters):]]  # the newest, in order
    assert broker.dead_letters.dropped == 30 - len(letters)
    large, small = letters[-2], letters[-1]  # the large data is left out; its size is kept
    assert "data" not in large["event"] and large["event"]["data_omitted_bytes"] > 50_000
    assert small["event"]["data"]["n"] == 29


async def test_forty_large_rejected_requests_cost_at_most_the_cap(tmp_path, sleeps):
    """Finding 5: 40 rejected requests added 9.8 MB; now the file stays under its cap."""
    from functions.devstack.broker import DEAD_LETTER_MAX_BYTES

    broker = make_broker(tmp_path, sleeps, task_submitted=Function(*[413] * 40))
    for n in range(40):
        await broker.deliver(event(data={"prompt": "x" * 250_000, "n": n}))
    assert broker.dead_letter_path.stat().st_size <= DEAD_LETTER_MAX_BYTES // 10
    assert len(dead_letters(tmp_path)) == 40 and broker.dead_letters.dropped == 0
