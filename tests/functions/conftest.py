"""Fixtures for the functions: a real NATS (bus, registry), a Context, and the endpoints over real HTTP (ASGI)."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from functions.core.bus import Bus
from functions.core.registry import TaskRecord
from functions.errors import LaunchConflict, TaskNotFound
from functions.core.settings import Settings
from functions.core.task import Task


@dataclass
class MemoryTask:
    """What the in-memory runtime knows of a task: launched (queued), or cancelled."""

    task_id: str
    state: str = "queued"
    outcome: str | None = None


class MemoryRuntime:
    """A Runtime whose state is a dict: what was launched, with which spec, and what was cancelled.

    `launch` checks and records without yielding in between, so like the API
    server's AlreadyExists it is the arbiter between racing launches."""

    def __init__(self):
        self.tasks: dict[str, MemoryTask] = {}
        self.specs: dict[str, str] = {}
        self.created = 0  # launches that created a task
        self.finished_jobs: dict[str, dict] = {}  # Jobs that finished, as the ApiServerSource would send them
        self.uids: dict[str, str] = {}  # each launched task's Job uid

    async def launch(self, task: Task) -> bool:
        await asyncio.sleep(0)  # let concurrent deliveries interleave here
        if task.task_id in self.specs:
            if self.specs[task.task_id] != task.spec_hash:
                raise LaunchConflict(f"task {task.task_id} exists with another spec")
            return False
        self.specs[task.task_id] = task.spec_hash
        self.tasks[task.task_id] = MemoryTask(task.task_id)
        self.uids[task.task_id] = f"uid-{task.task_id}-{uuid.uuid4().hex[:8]}"
        self.created += 1
        return True

    async def cancel(self, task_id: str) -> None:
        if task_id not in self.tasks:
            raise TaskNotFound(task_id)
        task = self.tasks[task_id]
        task.state, task.outcome = "finished", "cancelled"

    async def finished_job(self, task_id: str) -> dict | None:
        return self.finished_jobs.get(task_id)

    async def job_uid(self, task_id: str) -> str | None:
        return self.uids.get(task_id)


@pytest.fixture
def settings(base_settings):
    return base_settings


@pytest.fixture
def base_settings(nats_server, tmp_path):
    """The functions' test settings (a real nats-server); `settings` unless a folder overrides it."""
    return Settings(
        nats_url=nats_server.url,
        nats_creds=nats_server.creds("functions"),
        tracker_nats_creds=nats_server.creds("tracker"),
        nats_account=nats_server.auth.account,
        nats_signing_key_file=str(nats_server.auth.signing_key_file),
        data_dir=tmp_path / "data",
        snapshot_timeout_seconds=0.5,
        cancel_timeout_seconds=0.3,
        command_timeout_seconds=0.3,
        snapshot_stale_seconds=900,
        snapshot_min_interval_seconds=0,  # every ping a round; tests of the window set it
    )


@pytest.fixture
async def open_bus(settings, nats_server):
    """`await open_bus(user)`: a Bus as one of the trust chain's users (closed at teardown)."""
    opened: list[Bus] = []

    async def open_as(user: str) -> Bus:
        opened.append(await Bus.open(settings.nats_url, creds=nats_server.creds(user)))
        return opened[-1]

    yield open_as
    for connected in opened:
        await connected.close()


@pytest.fixture
async def bus(settings, nats_server):
    """The test's own hands on NATS (the admin user): it plays agents and reads what the code under test wrote."""
    connected = await Bus.open(settings.nats_url, creds=nats_server.creds("admin"))
    yield connected
    try:
        # Whatever the writers left in the registry holds only TaskRecord's keys (functions.core.registry).
        undeclared = {key for record in await connected.registry.list() for key in record} - set(TaskRecord.__annotations__)
    finally:
        await connected.close()
    assert not undeclared, f"registry records hold keys TaskRecord does not declare: {sorted(undeclared)}"


@pytest.fixture
def runtime():
    return MemoryRuntime()


@pytest.fixture
def ctx(settings, bus, runtime):
    from functions.main import Context

    return Context(settings, bus, runtime)


@pytest.fixture
def app(ctx):
    """Each function at /<target>, mounted the way the dev stack mounts them."""
    from functions.main import HANDLERS, starlette_endpoint

    async def get_context():
        return ctx

    return Starlette(
        routes=[Route(f"/{name}", starlette_endpoint(handler, get_context), methods=["POST"]) for name, handler in HANDLERS.items()]
    )


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://functions") as c:
        yield c


def cloudevent_request(type_: str, data, *, mode: str = "binary", source: str = "test/suite", id: str | None = None):
    """(headers, body) of a CloudEvent in binary or structured mode; bytes/str data is sent as is."""
    id = id or uuid.uuid4().hex
    if mode == "structured":
        event = {"specversion": "1.0", "id": id, "source": source, "type": type_, "data": data}
        return {"content-type": "application/cloudevents+json"}, json.dumps(event)
    headers = {"ce-specversion": "1.0", "ce-id": id, "ce-source": source, "ce-type": type_, "content-type": "application/json"}
    return headers, data if isinstance(data, (bytes, str)) else json.dumps(data)


@pytest.fixture
def post(client):
    """`await post(target, type, data, mode=..., id=...)`: send one CloudEvent to a function over HTTP."""

    async def send(target: str, type_: str, data, **kwargs) -> httpx.Response:
        headers, body = cloudevent_request(type_, data, **kwargs)
        return await client.post(f"/{target}", headers=headers, content=body)

    return send


@pytest.fixture
def events(bus):
    """`await events(task_id)`: every event published for a task so far, read back from the AGENT stream."""
    from agent import contract

    async def read(task_id: str, wait: float = 0.3) -> list[dict]:
        sub = await bus.js.subscribe(contract.subject_events(task_id), ordered_consumer=True)
        found = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=wait)
                except Exception:  # nats TimeoutError: nothing more
                    break
                found.append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        return found

    return read
