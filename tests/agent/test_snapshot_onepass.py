"""A snapshot is one backup plus one read: the temp copy is hashed in the read that uploads it (file and S3)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from agent import contract
from agent.snapshot import STATE_DIR, list_snapshots, take_snapshot
from agent.storage import S3Store
from tests.agent.test_snapshot import make_db

TASK = "t-onepass"

# Opens of files by Python code (builtins.open, os.open...: the audit event "open"), recorded while a
# test listens. SQLite's own C-level opens are not audited: the backup writing the temp copy is not
# counted, every Python-level read of it is.
_listening: list[list[tuple[str, object]]] = []


def _audit(event, args):
    if event == "open" and _listening and isinstance(args[0], str):
        _listening[-1].append((args[0], args[1] if args[1] is not None else args[2]))


sys.addaudithook(_audit)


@pytest.fixture
def opened():
    record: list[tuple[str, object]] = []
    _listening.append(record)
    yield record
    _listening.remove(record)


def _creates(mode) -> bool:
    return bool(mode & os.O_CREAT) if isinstance(mode, int) else any(c in str(mode) for c in "wxa")


def temp_copy_opens(opened, workspace: Path) -> list[tuple[str, object]]:
    """Opens of the snapshot's temp copy other than its creation (mkstemp) by Python code."""
    state_dir = str(workspace / STATE_DIR)
    return [
        (p, mode)
        for p, mode in opened
        if p.startswith(state_dir) and Path(p).name.startswith("snapshot-") and not _creates(mode)
    ]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "ws" / contract.checkpoint_path(TASK)
    make_db(path, rows=9000)  # ~9.5 MB: above 8 MB, S3 takes it as a multipart upload
    return path


def test_a_snapshot_reads_its_temp_copy_once_and_uploads_what_it_hashed(tmp_path, db, store, opened, readers):
    result = take_snapshot(db, store, TASK)
    assert result.uploaded
    opens = temp_copy_opens(opened, tmp_path / "ws")
    assert len(opens) == 1, opens  # one open, for reading
    assert [r.bytes_read for r in readers] == [result.size]  # and that one read took it whole, once
    data = store.get_bytes(result.key)
    assert len(data) == result.size and hashlib.sha256(data).hexdigest() == result.sha256


def test_an_unchanged_database_is_read_once_and_not_uploaded(tmp_path, db, store, opened, readers):
    first = take_snapshot(db, store, TASK)
    opened.clear()
    readers.clear()
    second = take_snapshot(db, store, TASK)
    assert not second.uploaded and second.key == first.key and second.sha256 == first.sha256
    assert len(temp_copy_opens(opened, tmp_path / "ws")) == 1
    assert [r.bytes_read for r in readers] == [second.size]
    assert list_snapshots(store, TASK) == [first.key]


def test_a_duplicate_found_after_the_read_is_discarded(tmp_path, db, store, opened, readers):
    """Touched files, same content: the one-pass upload runs and is discarded before it is visible."""
    first = take_snapshot(db, store, TASK)
    st = db.stat()
    os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # the stat says changed, the hash says not
    opened.clear()
    readers.clear()
    again = take_snapshot(db, store, TASK)
    assert not again.uploaded and again.key == first.key and again.sha256 == first.sha256
    assert len(temp_copy_opens(opened, tmp_path / "ws")) == 1
    assert [r.bytes_read for r in readers] == [again.size]
    assert list_snapshots(store, TASK) == [first.key]
    if isinstance(store, S3Store):  # the multipart upload begun was aborted
        assert store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_a_changed_database_after_an_unchanged_stat_is_still_uploaded(tmp_path, db, store):
    """The stat only orders the work; the hash decides (mtime granularity may hide a commit)."""
    first = take_snapshot(db, store, TASK)
    st, wal = db.stat(), Path(f"{db}-wal")
    wal_st = wal.stat() if wal.exists() else None
    conn = sqlite3.connect(db)
    conn.execute("UPDATE writes SET blob = zeroblob(1000) WHERE id = 1")  # same sizes, new content
    conn.commit()
    conn.close()
    os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns))
    if wal_st is not None and wal.exists() and wal.stat().st_size == wal_st.st_size:
        os.utime(wal, ns=(wal_st.st_atime_ns, wal_st.st_mtime_ns))
    second = take_snapshot(db, store, TASK)
    assert second.uploaded and second.sha256 != first.sha256
    assert hashlib.sha256(store.get_bytes(second.key)).hexdigest() == second.sha256
