"""A fork's restore in-process: a parent run to its end (real graph, SQLite, scripted model), its snapshot
and final archive in a real file store, then the child's restore and the child's run from it."""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
from pathlib import Path

from agent import contract, fork
from agent.checkpoint import open_saver
from agent.graph import Inbox, build_graph, initial_state
from agent.restore import Parent, restore
from agent.snapshot import take_snapshot
from agent.storage import open_store
from agent.transcript import Transcript
from tests.agent.test_graph import make_deps, run

PARENT_TURNS = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["a"], "objective": "write a"}}]},
    {"tool_calls": [{"name": "write_file", "args": {"path": "a.txt", "content": "a\n"}}]},
    {"content": "a is written"},
    {"tool_calls": [{"name": "finish", "args": {"summary": "a done"}}]},
]
CHILD_TURNS = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["b"], "objective": "write b"}}]},
    {"tool_calls": [{"name": "write_file", "args": {"path": "b.txt", "content": "b\n"}}]},
    {"content": "b is written"},
    {"tool_calls": [{"name": "finish", "args": {"summary": "b done"}}]},
]


def archive_of(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buffer.getvalue()


def finished_parent(tmp_path: Path, store) -> str:
    """Run task `p` to its end; store its snapshot and final archive; return the snapshot's key."""
    parent_dir = tmp_path / "parent"
    parent_dir.mkdir()
    deps, _ = make_deps(parent_dir, PARENT_TURNS)
    db = parent_dir / "ws" / contract.checkpoint_path("p")
    db.parent.mkdir(parents=True)
    deps.transcript = Transcript.open(db)  # as agent/run.py: the messages live in the checkpoint's database
    values = run(build_graph(deps, checkpointer=open_saver(db)), {"configurable": {"thread_id": "p"}}, initial_state("write a"))
    assert values["outcome"] == contract.OUTCOME_DONE and values["model_turns"] == 4
    snap = take_snapshot(db, store, "p")
    store.put_bytes(contract.final_archive_key("p"), archive_of({"a.txt": "a\n"}))
    return snap.key


def test_the_child_continues_the_parents_conversation_with_its_prompt_as_a_new_instruction(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    key = finished_parent(tmp_path, store)
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    workspace = child_dir / "ws"
    assert restore(workspace, store, "c", Parent("p", key, "now write b")) == key
    assert (workspace / "a.txt").read_text() == "a\n"
    assert Inbox(workspace / ".dockyard" / "inbox.jsonl").read_from(0) == ["now write b"]

    deps, _ = make_deps(child_dir, CHILD_TURNS)
    deps.transcript = Transcript.open(workspace / contract.checkpoint_path("c"))
    graph = build_graph(deps, checkpointer=open_saver(workspace / contract.checkpoint_path("c")))
    config = {"configurable": {"thread_id": "c"}}
    state = graph.get_state(config)
    assert state.next == ("strategic",) and state.values["outcome"] is None and state.values["model_turns"] == 0
    values = run(graph, config)  # resumed: no input, as agent/run.py resumes
    assert values["outcome"] == contract.OUTCOME_DONE and values["summary"] == "b done" and values["model_turns"] == 4
    assert (workspace / "b.txt").read_text() == "b\n"
    texts = _transcript(workspace, "c")
    assert texts.index("Task:\nwrite a") < texts.index("Message from a human: now write b")


def _transcript(workspace: Path, task_id: str) -> list[str]:
    db = sqlite3.connect(workspace / contract.checkpoint_path(task_id))
    try:
        return [json.loads(m)["data"]["content"] for (m,) in db.execute("SELECT message FROM transcript ORDER BY seq")]
    finally:
        db.close()


def test_a_damaged_snapshot_starts_a_new_conversation_in_the_parents_workspace(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    store.put_bytes(contract.final_archive_key("p"), archive_of({"a.txt": "a\n"}))
    key = contract.checkpoints_prefix("p") + "20260101T000000.000000Z.db"
    store.put_bytes(key, b"SQLite format 3\x00" + b"\x00" * 100)
    workspace = tmp_path / "ws"
    assert restore(workspace, store, "c", Parent("p", key, "go on")) is None
    assert (workspace / "a.txt").read_text() == "a\n"
    assert not (workspace / contract.checkpoint_path("c")).exists()  # the agent starts afresh, the prompt as its task
    assert not (workspace / ".dockyard" / "inbox.jsonl").exists()


def test_the_childs_base_is_the_parents_verified_base_only(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    store.put_bytes(contract.final_archive_key("p"), archive_of({"repo/a.txt": "a\n"}))
    commit = "1" * 40
    summary = {"base": {"repo": "https://example.test/r.git", "ref": "main", "commit": commit, "verified": True}}
    store.put_bytes("jobs/p/final/changes.json", json.dumps(summary).encode())
    workspace = tmp_path / "ws"
    restore(workspace, store, "c", Parent("p", None, "go on"))
    assert json.loads((workspace / ".dockyard" / "base.json").read_text()) == {"repo": "https://example.test/r.git", "ref": "main", "commit": commit}

    summary["base"]["verified"] = False
    store.put_bytes("jobs/p/final/changes.json", json.dumps(summary).encode())
    other = tmp_path / "other"
    restore(other, store, "c2", Parent("p", None, "go on"))
    assert not (other / ".dockyard" / "base.json").exists()


def test_a_snapshot_without_the_parents_thread_is_not_adopted(tmp_path):
    db = tmp_path / "c.db"
    saver = open_saver(db)
    saver.conn.close()
    assert fork.adopt_conversation(db, "p", "c") is False


def test_a_fork_without_the_parents_archive_is_fatal(tmp_path):
    from agent.restore import main

    store_dir = tmp_path / "store"
    open_store(store_dir.as_uri())
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"prompt": "go on"}))
    argv = ["--task-id", "c", "--workspace", str(tmp_path / "ws"), "--store", store_dir.as_uri(), "--parent", "p", "--task-file", str(task_file)]
    assert main(argv) == contract.EXIT_FATAL
    assert main([*argv[:-2]]) == contract.EXIT_FATAL  # --parent without --task-file: a usage error
