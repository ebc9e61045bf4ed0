"""Retry and fork end to end: `dockyard dev` with the real agent, a repository task, `dockyard fork` and `dockyard retry`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import httpx
import pytest
import yaml

from agent import changes, contract
from tests.agent.test_changes import make_origin
from tests.conftest import REPO_ROOT, eventually
from tests.dev_process import DevServer


def _script(path: str, content: str, summary: str) -> list[dict]:
    return [
        {"tool_calls": [{"name": "plan", "args": {"todos": [f"write {path}"], "objective": f"write {path}"}}]},
        {"tool_calls": [{"name": "write_file", "args": {"path": path, "content": content}}]},
        {"content": f"{path} is written"},
        {"tool_calls": [{"name": "finish", "args": {"summary": summary}}]},
    ]


def dockyard(server: DevServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "functions.cli", *args, "--url", server.url, "--data-dir", str(server.data_dir)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def finished(server: DevServer, task_id: str) -> dict:
    def done() -> dict | None:
        record = httpx.get(f"{server.url}/api/tasks/{task_id}", headers=server.headers, timeout=5).json()
        stored = server.data_dir / "store" / contract.final_result_key(task_id)
        return record if record.get("state") in contract.TERMINAL_STATES and stored.exists() else None

    def logs() -> str:
        folder = server.data_dir / "tasks" / task_id / "logs"
        return "\n".join(f"== {log.name}\n{log.read_text()[-3000:]}" for log in sorted(folder.glob("*.log"))) if folder.is_dir() else "no logs"

    return eventually(done, f"task {task_id} to finish with its final set stored", 120, detail=logs)


def change_set(server: DevServer, task_id: str) -> dict:
    return json.loads((server.data_dir / "store" / changes.summary_key(task_id)).read_text())


def parent_spec(server: DevServer) -> dict:
    return httpx.get(f"{server.url}/api/tasks/parent", headers=server.headers, timeout=5).json()["task"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A repository task that adds repo/parent.txt, run to its end by `dockyard dev`."""
    root = tmp_path_factory.mktemp("lineage")
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "parent.yaml").write_text(yaml.safe_dump(_script("repo/parent.txt", "from the parent\n", "parent done")))
    # A fork resumes at once (no clone) and this child answers at once: its agent may end before the
    # snapshotter handles SIGTERM, which the local runtime waits for (processes.py, SNAPSHOTTER_READY).
    (scripts / "child.yaml").write_text(yaml.safe_dump(_script("repo/child.txt", "from the child\n", "child done")))
    origin = make_origin(root / "origin", {"README": "base\n"})
    server = DevServer(root / "data", env={"DOCKYARD_SCRIPTS_DIR": str(scripts)}, args=("--allow-file-repos",)).start()
    try:
        answer = dockyard(server, "submit", "add parent.txt", "--task-id", "parent", "--repo", origin.as_uri(), "--model", "scripted:parent")
        assert answer.returncode == 0, answer.stderr
        record = finished(server, "parent")
        assert record["outcome"] == contract.OUTCOME_DONE, record
        yield server
    finally:
        server.stop()


def test_fork_starts_in_the_parents_workspace_and_conversation_and_diffs_against_the_parents_base(parent):
    answer = dockyard(parent, "fork", "parent", "--prompt", "now add child.txt", "--model", "scripted:child", "--task-id", "child")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "child"
    record = finished(parent, "child")
    assert record["outcome"] == contract.OUTCOME_DONE, record
    newest = sorted(k for k in (parent.data_dir / "store" / "jobs" / "parent" / "checkpoints").iterdir())[-1]
    assert record["parent"] == {"task_id": "parent", "snapshot": contract.checkpoints_prefix("parent") + newest.name, "workspace": "restore"}
    assert record["task"]["prompt"] == "now add child.txt" and record["task"]["repo"] == parent_spec(parent)["repo"]

    workspace = parent.data_dir / "tasks" / "child" / "workspace"
    assert (workspace / "repo" / "parent.txt").read_text() == "from the parent\n"
    assert (workspace / "repo" / "child.txt").read_text() == "from the child\n"
    ours, theirs = change_set(parent, "child"), change_set(parent, "parent")
    assert ours["base"]["commit"] == theirs["base"]["commit"] and ours["base"]["against"] == "commit"
    assert {f["path"]: f["status"] for f in ours["files"]} == {"parent.txt": "added", "child.txt": "added"}

    # The conversation went on: the parent's task and the fork's instruction are in one transcript.
    db = sqlite3.connect(workspace / contract.checkpoint_path("child"))
    try:
        texts = [json.loads(m)["data"]["content"] for (m,) in db.execute("SELECT message FROM transcript ORDER BY seq")]
        threads = {t for (t,) in db.execute("SELECT DISTINCT thread_id FROM checkpoints")}
    finally:
        db.close()
    assert texts[0] == "Task:\nadd parent.txt"
    assert "Message from a human: now add child.txt" in texts
    assert threads == {"child"}


def test_retry_runs_the_same_spec_fresh(parent):
    answer = dockyard(parent, "retry", "parent", "--task-id", "again")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "again"
    record = finished(parent, "again")
    assert record["outcome"] == contract.OUTCOME_DONE, record
    assert record["parent"] == {"task_id": "parent", "snapshot": None, "workspace": "fresh"}
    spec = parent_spec(parent)
    assert {k: record["task"].get(k) for k in ("prompt", "repo", "model", "limits")} == {k: spec.get(k) for k in ("prompt", "repo", "model", "limits")}
    assert {f["path"] for f in change_set(parent, "again")["files"]} == {"parent.txt"}
    assert not (parent.data_dir / "tasks" / "again" / "workspace" / "repo" / "child.txt").exists()


def test_fork_of_an_unknown_task_names_the_field(parent):
    answer = dockyard(parent, "fork", "nobody", "--prompt", "x")
    assert answer.returncode == 2
    assert "from.task_id" in answer.stderr and "nobody" in answer.stderr
