"""Snapshots of a live WAL database, pruning, restore, and the final upload, on real SQLite files."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest

from agent import changes, contract, restore, snapshot
from agent.snapshot import LAST_SNAPSHOT_FILE, list_snapshots, prune_snapshots, take_snapshot, upload_final
from agent.storage import StorageError, open_store
from tests.conftest import eventually

TASK = "t-snap"
CHANGE_KEYS = {"changes_key": changes.summary_key(TASK), "changes_patch_key": changes.patch_key(TASK)}


def make_db(path: Path, rows: int, payload: int = 1000) -> None:
    """A checkpoint-like WAL database of about rows*payload bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS writes (id INTEGER PRIMARY KEY, blob BLOB)")
    conn.executemany("INSERT INTO writes (blob) VALUES (?)", ((os.urandom(payload),) for _ in range(rows)))
    conn.commit()
    conn.close()


def row_ids(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM writes ORDER BY id")]
    finally:
        conn.close()


class Writer(threading.Thread):
    """Commits one small transaction after another until stopped."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.committed = 0  # highest id whose commit has returned
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA synchronous=NORMAL")
            while not self.stop.is_set():
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute("INSERT INTO writes (blob) VALUES (?)", (os.urandom(200),))
                conn.execute("COMMIT")
                self.committed = cur.lastrowid
            conn.close()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def db(workspace):
    return workspace / contract.checkpoint_path(TASK)


@pytest.fixture
def store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def test_snapshot_while_writing_is_consistent_and_restorable(workspace, db, s3_store_url, tmp_path):
    store = open_store(s3_store_url)
    make_db(db, rows=4000)  # ~4 MB
    writer = Writer(db)
    writer.start()
    try:
        eventually(lambda: writer.committed >= 4100 or writer.error, "the writer to commit 100 rows")
        committed_before = writer.committed
        # Small steps with sleeps: the backup spans many steps while the writer keeps committing.
        result = take_snapshot(db, store, TASK, step_bytes=64 * 1024, sleep=0.002)
        committed_during = writer.committed - committed_before
    finally:
        writer.stop.set()
        writer.join(10)
    assert writer.error is None
    assert committed_during > 0, "the writer was stalled for the whole backup"

    assert result.uploaded and result.key.startswith(contract.checkpoints_prefix(TASK)) and result.key.endswith(".db")
    assert store.list(contract.checkpoints_prefix(TASK)) == [result.key]
    copy = tmp_path / "copy.db"
    store.get_file(result.key, copy)
    assert copy.stat().st_size == result.size
    assert restore.check_integrity(copy) == "ok"
    ids = row_ids(copy)
    # Every transaction committed before the backup began, in one consistent prefix.
    assert ids == list(range(1, len(ids) + 1))
    assert len(ids) >= committed_before

    # Restore into a fresh workspace brings exactly that state back.
    other = tmp_path / "ws2"
    assert restore.restore(other, store, TASK) == result.key
    restored = other / contract.checkpoint_path(TASK)
    assert row_ids(restored) == ids
    assert not list(restored.parent.glob("*.restore-*"))


def test_unchanged_database_is_not_uploaded_twice(workspace, db, store):
    make_db(db, rows=200)
    first = take_snapshot(db, store, TASK)
    second = take_snapshot(db, store, TASK)
    assert first.uploaded and not second.uploaded
    assert second.key == first.key and second.sha256 == first.sha256
    assert list_snapshots(store, TASK) == [first.key]

    # Remembered across processes through the state file in the workspace.
    snapshot._last_uploaded.clear()
    state = json.loads((workspace / LAST_SNAPSHOT_FILE).read_text())
    assert state["sha256"] == first.sha256 and state["key"] == first.key
    assert not take_snapshot(db, store, TASK).uploaded

    # Any commit makes it new.
    make_db(db, rows=1)
    third = take_snapshot(db, store, TASK)
    assert third.uploaded and third.key > first.key
    assert list_snapshots(store, TASK) == [first.key, third.key]


def test_remembered_snapshot_missing_from_store_is_uploaded_again(workspace, db, store):
    make_db(db, rows=50)
    first = take_snapshot(db, store, TASK)
    store.delete(first.key)
    again = take_snapshot(db, store, TASK)
    assert again.uploaded and store.exists(again.key)


def test_missing_database_raises_and_is_not_created(db, store):
    with pytest.raises(FileNotFoundError):
        take_snapshot(db, store, TASK)
    assert not db.exists()
    assert list_snapshots(store, TASK) == []


def test_prune_keeps_the_newest(workspace, db, store):
    keys = []
    for _ in range(5):
        make_db(db, rows=1)
        keys.append(take_snapshot(db, store, TASK).key)
    assert keys == sorted(keys)
    store.put_bytes(f"jobs/{TASK}/final/result.json", b"{}")  # not a checkpoint: never pruned

    deleted = prune_snapshots(store, TASK, keep=2)
    assert deleted == keys[:3]
    assert list_snapshots(store, TASK) == keys[3:]
    assert store.exists(f"jobs/{TASK}/final/result.json")
    assert prune_snapshots(store, TASK, keep=2) == []
    with pytest.raises(ValueError):
        prune_snapshots(store, TASK, keep=0)


def _archive_members(store, task_id) -> dict[str, tarfile.TarInfo]:
    data = store.get_bytes(contract.final_archive_key(task_id))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()}


def test_upload_final_archive_and_result(workspace, db, store):
    make_db(db, rows=10)
    (workspace / "repo" / "src").mkdir(parents=True)
    (workspace / "repo" / "src" / "main.py").write_text("print('hi')\n")
    (workspace / "repo" / "checkpoints").mkdir()  # only the top-level checkpoints/ is excluded
    (workspace / "repo" / "checkpoints" / "keep.txt").write_text("kept")
    (workspace / "notes.md").write_text("notes")
    (workspace / "link-to-notes").symlink_to("notes.md")
    (workspace / "link-to-repo").symlink_to("repo")
    (workspace / "dangling").symlink_to("/nonexistent/target")
    (workspace / ".dockyard").mkdir()
    (workspace / ".dockyard" / "heartbeat").write_text("now")
    result = {"task_id": TASK, "outcome": "done", "summary": "all good"}
    (workspace / contract.RESULT_FILE).write_text(json.dumps(result))

    final = upload_final(workspace, store, TASK)

    assert final.archive_key == contract.final_archive_key(TASK)
    assert final.result_key == contract.final_result_key(TASK)
    assert json.loads(store.get_bytes(contract.final_result_key(TASK))) == {**result, **CHANGE_KEYS}
    members = _archive_members(store, TASK)
    assert members["notes.md"][1] == b"notes"
    assert members["repo/src/main.py"][1] == b"print('hi')\n"
    assert members["repo/checkpoints/keep.txt"][1] == b"kept"
    assert members["repo/src"][0].isdir()
    for name, target in [("link-to-notes", "notes.md"), ("link-to-repo", "repo"), ("dangling", "/nonexistent/target")]:
        assert members[name][0].issym() and members[name][0].linkname == target
    assert not [n for n in members if n.startswith(("checkpoints", ".dockyard"))]
    assert "link-to-repo/src/main.py" not in members  # links are not followed
    assert not list((workspace / ".dockyard").glob("final-*"))  # temp archive removed


def test_the_final_archive_keeps_the_tool_outputs_and_no_other_state(workspace, store):
    outputs = workspace / contract.OUTPUTS_DIR
    outputs.mkdir(parents=True)
    (outputs / "call_1.log").write_bytes(b"whole output\n" * 1000)
    (workspace / ".dockyard" / "heartbeat").write_text("now")
    (workspace / contract.RESULT_FILE).write_text(json.dumps({"task_id": TASK, "outcome": "done"}))
    upload_final(workspace, store, TASK)
    members = _archive_members(store, TASK)
    assert members[f"{contract.OUTPUTS_DIR}/call_1.log"][1] == b"whole output\n" * 1000
    assert sorted(n for n in members if n.startswith(".dockyard")) == [".dockyard", contract.OUTPUTS_DIR, f"{contract.OUTPUTS_DIR}/call_1.log"]


def test_an_outputs_folder_that_is_a_link_is_not_followed(workspace, store, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("not the workspace's")
    (workspace / ".dockyard").mkdir()
    (workspace / contract.OUTPUTS_DIR).symlink_to(elsewhere)
    upload_final(workspace, store, TASK)
    assert not [n for n in _archive_members(store, TASK) if n.startswith(".dockyard")]


def test_upload_final_without_result_file(workspace, store):
    (workspace / "a.txt").write_text("a")
    final = upload_final(workspace, store, TASK)
    assert json.loads(store.get_bytes(final.result_key)) == {"task_id": TASK, "outcome": "unknown", **CHANGE_KEYS}
    assert _archive_members(store, TASK)["a.txt"][1] == b"a"


def test_result_json_is_not_uploaded_when_the_archive_fails(workspace, tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    # A directory where the archive object should go makes its upload fail.
    (tmp_path / "store" / contract.final_archive_key(TASK)).mkdir(parents=True)
    (workspace / contract.RESULT_FILE).parent.mkdir()
    (workspace / contract.RESULT_FILE).write_text('{"outcome": "done"}')
    with pytest.raises(StorageError):
        upload_final(workspace, store, TASK)
    assert not store.exists(contract.final_result_key(TASK))


def test_restore_falls_back_from_corrupt_snapshots(workspace, db, store, tmp_path):
    make_db(db, rows=300)
    good = take_snapshot(db, store, TASK)
    good_ids = row_ids(db)

    # A newer snapshot that was damaged: pages in the middle overwritten.
    make_db(db, rows=300)
    damaged = take_snapshot(db, store, TASK)
    raw = bytearray(store.get_bytes(damaged.key))
    page = 4096
    raw[page * 3 : page * 40] = b"\xff" * (page * 37)
    store.put_bytes(damaged.key, bytes(raw))

    # The newest: not a database at all.
    make_db(db, rows=1)
    newest = take_snapshot(db, store, TASK)
    store.put_bytes(newest.key, b"this is not sqlite")
    assert list_snapshots(store, TASK) == [good.key, damaged.key, newest.key]

    other = tmp_path / "ws2"
    code = restore.main(["--task-id", TASK, "--workspace", str(other), "--store", store.describe()])
    assert code == 0
    restored = other / contract.checkpoint_path(TASK)
    assert row_ids(restored) == good_ids
    assert restore.check_integrity(restored) == "ok"
    assert sorted(p.name for p in restored.parent.iterdir()) == [restored.name]


def test_restore_removes_a_stale_foreign_wal(workspace, db, store, tmp_path):
    make_db(db, rows=100)
    take_snapshot(db, store, TASK)
    expected = row_ids(db)

    # Another database's WAL, left next to where the checkpoint will go.
    foreign = tmp_path / "foreign" / "f.db"
    make_db(foreign, rows=5)
    keeper = sqlite3.connect(foreign)
    keeper.execute("PRAGMA wal_autocheckpoint=0")
    keeper.execute("DELETE FROM writes")
    keeper.commit()
    other = tmp_path / "ws2"
    target = other / contract.checkpoint_path(TASK)
    target.parent.mkdir(parents=True)
    Path(f"{target}-wal").write_bytes(Path(f"{foreign}-wal").read_bytes())
    keeper.close()

    assert restore.restore(other, store, TASK)
    assert row_ids(target) == expected


def test_restore_leaves_an_existing_checkpoint_alone(workspace, db, store):
    make_db(db, rows=10)
    take_snapshot(db, store, TASK)
    make_db(db, rows=10)  # local state is newer than the snapshot
    before = row_ids(db)
    assert restore.restore(workspace, store, TASK) is None
    assert row_ids(db) == before


def test_restore_with_nothing_to_restore(tmp_path, store, capsys):
    code = restore.main(["--task-id", TASK, "--workspace", str(tmp_path / "ws"), "--store", store.describe()])
    assert code == 0
    assert "nothing to restore" in capsys.readouterr().err
    assert not (tmp_path / "ws" / contract.checkpoint_path(TASK)).exists()


def test_restore_cli_rejects_bad_settings(tmp_path, store):
    assert restore.main(["--task-id", "Bad_Id", "--workspace", str(tmp_path), "--store", store.describe()]) == (
        contract.EXIT_FATAL
    )
    assert restore.main(["--task-id", TASK, "--workspace", str(tmp_path), "--store", "ftp://x"]) == contract.EXIT_FATAL


def test_stale_temp_files_of_a_killed_run_are_removed(workspace):
    state = workspace / ".dockyard"
    state.mkdir()
    leftovers = [state / f"snapshot-{TASK}-x1.db", state / f"snapshot-{TASK}-x1.db-journal", state / f"final-{TASK}-y.tar.gz"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (state / "result.json").write_text("{}")
    assert sorted(snapshot.remove_stale_temp_files(workspace, TASK)) == sorted(leftovers)
    assert [p.name for p in state.iterdir()] == ["result.json"]
