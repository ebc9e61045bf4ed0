"""Retry and fork at task_submitted: `from` validated, the parent's spec inherited, the snapshot resolved,
the lineage recorded; redelivery idempotent. Real NATS and registry, a real file store, the memory runtime."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import contract
from agent.storage import open_store
from functions.core.factory import render_job
from functions.core.task import Limits, Task, restore_parent_args

SUBMITTED = contract.EVENT_TASK_SUBMITTED
PARENT_SPEC = {
    "prompt": "fix the parser",
    "task_id": "p",
    "repo": {"url": "https://example.test/repo.git", "ref": "main"},
    "model": "scripted:example",
    "limits": {"deadline_seconds": 600, "retries": 1, "storage": "1Gi", "max_tokens": 5000},
}
SNAPSHOTS = ("20260101T000000.000000Z.db", "20260101T000100.000000Z.db", "20260101T000200.000000Z.db")


@pytest.fixture
def store(settings):
    return open_store(settings.store)


async def submit(post, data: dict, **kwargs):
    return await post("task_submitted", SUBMITTED, data, **kwargs)


async def parent(post, bus, store, *, finished: bool = True, final: bool = True, snapshots=SNAPSHOTS) -> dict:
    """Task `p` submitted; with `finished`, ended (as the tracker records it) with `snapshots` and its final set."""
    assert (await submit(post, PARENT_SPEC)).status_code == 200
    for name in snapshots:
        store.put_bytes(contract.checkpoints_prefix("p") + name, b"db")
    if final:
        store.put_bytes(contract.final_archive_key("p"), b"tar")
        store.put_bytes(contract.final_result_key("p"), json.dumps({"outcome": "done"}).encode())
    if finished:
        await bus.registry.update("p", lambda r: {**r, "state": contract.STATE_FINISHED, "outcome": contract.OUTCOME_DONE})
    return await bus.registry.get("p")


def inherited(record: dict) -> dict:
    return {k: record["task"].get(k) for k in ("prompt", "repo", "model", "limits")}


async def test_retry_launches_the_parents_spec_as_a_new_task_even_while_it_runs(post, bus, runtime, store):
    p = await parent(post, bus, store, finished=False, final=False)
    response = await submit(post, {"from": {"task_id": "p", "workspace": "fresh"}, "task_id": "p-again"})
    assert response.status_code == 200, response.text
    assert response.json() == {"task_id": "p-again", "status": "submitted"}
    child = await bus.registry.get("p-again")
    assert inherited(child) == inherited(p)
    assert child["parent"] == {"task_id": "p", "snapshot": None, "workspace": "fresh"}
    assert child["task"]["from"] == child["parent"]
    assert runtime.specs["p-again"] == child["spec_hash"] != p["spec_hash"]


async def test_fork_takes_the_newest_snapshot_and_inherits_what_the_data_leaves_out(post, bus, runtime, store):
    p = await parent(post, bus, store)
    response = await submit(post, {"from": {"task_id": "p"}, "prompt": "now add tests", "task_id": "f"})
    assert response.status_code == 200, response.text
    child = await bus.registry.get("f")
    assert child["parent"] == {"task_id": "p", "snapshot": contract.checkpoints_prefix("p") + SNAPSHOTS[-1], "workspace": "restore"}
    assert child["task"]["prompt"] == "now add tests"
    assert {k: child["task"][k] for k in ("repo", "model", "limits")} == {k: p["task"][k] for k in ("repo", "model", "limits")}
    assert child["state"] == contract.STATE_QUEUED and "f" in runtime.tasks


@pytest.mark.parametrize("named", [SNAPSHOTS[0], SNAPSHOTS[0].removesuffix(".db"), contract.checkpoints_prefix("p") + SNAPSHOTS[0]])
async def test_fork_from_a_named_snapshot_by_key_or_name(post, bus, store, named):
    await parent(post, bus, store)
    response = await submit(post, {"from": {"task_id": "p", "snapshot": named}, "prompt": "again", "task_id": "f"})
    assert response.status_code == 200, response.text
    assert (await bus.registry.get("f"))["parent"]["snapshot"] == contract.checkpoints_prefix("p") + SNAPSHOTS[0]


async def test_fork_of_a_parent_without_snapshots_starts_a_new_conversation_in_its_workspace(post, bus, store):
    await parent(post, bus, store, snapshots=())
    response = await submit(post, {"from": {"task_id": "p"}, "prompt": "go on", "task_id": "f"})
    assert response.status_code == 200, response.text
    assert (await bus.registry.get("f"))["parent"] == {"task_id": "p", "snapshot": None, "workspace": "restore"}


async def test_the_data_overrides_each_inherited_field(post, bus, store):
    await parent(post, bus, store)
    data = {"from": {"task_id": "p", "workspace": "fresh"}, "model": "scripted:other", "limits": {"deadline_seconds": 30}, "task_id": "c"}
    assert (await submit(post, data)).status_code == 200
    task = (await bus.registry.get("c"))["task"]
    assert task["model"] == "scripted:other" and task["limits"]["deadline_seconds"] == 30
    assert task["limits"]["retries"] != PARENT_SPEC["limits"]["retries"]  # limits are taken whole: the default here
    assert task["prompt"] == PARENT_SPEC["prompt"] and task["repo"] == PARENT_SPEC["repo"]


REFUSALS = [
    # (name, from, parent state, status, field, words in the error)
    ("unknown parent", {"task_id": "nobody"}, "finished", 404, "from.task_id", "nobody"),
    ("parent still running", {"task_id": "p"}, "running", 409, "from.task_id", "still running"),
    ("no final archive", {"task_id": "p"}, "no-final", 409, "from.task_id", "final workspace"),
    ("unknown snapshot", {"task_id": "p", "snapshot": "20990101T000000.000000Z.db"}, "finished", 404, "from.snapshot", SNAPSHOTS[-1]),
    ("snapshot of another task", {"task_id": "p", "snapshot": "jobs/q/checkpoints/" + SNAPSHOTS[0]}, "finished", 404, "from.snapshot", "no snapshot"),
    ("snapshot on a retry", {"task_id": "p", "snapshot": SNAPSHOTS[0], "workspace": "fresh"}, "finished", 400, "from.snapshot", "fresh"),
    ("bad workspace", {"task_id": "p", "workspace": "copy"}, "finished", 400, "from.workspace", "restore"),
    ("bad task id", {"task_id": "../p"}, "finished", 400, "from.task_id", "task id"),
    ("unknown field", {"task_id": "p", "branch": "x"}, "finished", 400, "from.branch", "branch"),
    ("not an object", "p", "finished", 400, "from", "object"),
]


@pytest.mark.parametrize("name,source,state,status,field,words", REFUSALS, ids=[c[0] for c in REFUSALS])
async def test_bad_from_is_refused_naming_the_field_and_launches_nothing(post, bus, runtime, store, name, source, state, status, field, words):
    await parent(post, bus, store, finished=state != "running", final=state != "no-final")
    response = await submit(post, {"from": source, "prompt": "x", "task_id": "child"})
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and words in response.json()["error"]
    assert await bus.registry.get("child") is None and "child" not in runtime.tasks


async def test_redelivery_makes_the_same_child_with_the_same_spec_hash(post, bus, runtime, store):
    await parent(post, bus, store)
    data = {"from": {"task_id": "p"}, "prompt": "fork me"}
    answers = await asyncio.gather(*(submit(post, data, source="cli", id="ev-fork") for _ in range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    child_id = contract.derive_task_id("cli", "ev-fork")  # the derived id rule, unchanged
    assert {a.json()["task_id"] for a in answers} == {child_id}
    assert sorted(a.json()["status"] for a in answers).count("submitted") == 1
    first = await bus.registry.get(child_id)
    # A redelivery later (the parent finished, its snapshots no longer change) is the same child.
    again = await submit(post, data, source="cli", id="ev-fork")
    assert again.status_code == 200 and again.json()["status"] == "already submitted"
    assert (await bus.registry.get(child_id))["spec_hash"] == first["spec_hash"] == runtime.specs[child_id]
    assert runtime.created == 2  # the parent and one child


def test_a_forks_restore_gets_the_parent_and_the_task_file_a_retrys_nothing(settings):
    limits = Limits(deadline_seconds=60, retries=0, storage="1Gi")
    fork = Task(task_id="f", prompt="x", limits=limits, parent={"task_id": "p", "snapshot": "jobs/p/checkpoints/a.db", "workspace": "restore"})
    retry = Task(task_id="r", prompt="x", limits=limits, parent={"task_id": "p", "snapshot": None, "workspace": "fresh"})
    assert restore_parent_args(fork, "/t.json") == ["--parent", "p", "--parent-snapshot", "jobs/p/checkpoints/a.db", "--task-file", "/t.json"]
    assert restore_parent_args(retry, "/t.json") == []
    (restore,) = [c for c in render_job(fork, settings)["spec"]["template"]["spec"]["initContainers"] if c["name"] == "restore"]
    assert restore["args"][-6:] == ["--parent", "p", "--parent-snapshot", "jobs/p/checkpoints/a.db", "--task-file", contract.TASK_FILE]
    assert any(m["mountPath"] == "/etc/dockyard" and m.get("readOnly") for m in restore["volumeMounts"])
    (plain,) = [c for c in render_job(retry, settings)["spec"]["template"]["spec"]["initContainers"] if c["name"] == "restore"]
    assert "--parent" not in plain["args"] and all(m["mountPath"] != "/etc/dockyard" for m in plain["volumeMounts"])


def test_under_podman_a_forks_restore_container_gets_the_task_file():
    from functions.core import factory
    from functions.runtime.podman.translate import plan
    from tests.functions.runtime.test_podman_translate import SECRETS, WHERE, _settings

    settings = _settings()
    limits = Limits(deadline_seconds=60, retries=0, storage="1Gi")
    task = Task(task_id="t1", prompt="go on", limits=limits, parent={"task_id": "p", "snapshot": None, "workspace": "restore"})
    pod = plan(factory.render(task, settings, "uid-1", {role: "creds" for role in factory.NATS_ROLES}), SECRETS, **WHERE)
    (restore,) = [c for c in pod.containers if c.name == "restore"]
    assert restore.args[-4:] == ["--parent", "p", "--task-file", contract.TASK_FILE]
    assert f"type=bind,src={WHERE['files_dir']}/task,dst=/etc/dockyard,ro=true" in restore.args
    (task_json,) = [f for f in pod.files if f.volume == "task"]
    assert json.loads(task_json.data)["prompt"] == "go on"
