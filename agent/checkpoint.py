"""The agent's durable memory: a LangGraph SqliteSaver on local storage.

Invariants:
- WAL journal, `synchronous=NORMAL`, a busy timeout so the snapshotter's
  online backup never makes the agent fail; the wal-index is a file next to
  the database, so no `/dev/shm` is needed.
- One thread per task (thread id = task id); the graph runs with durability
  "sync", so a step that returned is on disk before the next one starts.
- Old checkpoints are pruned (keep the newest N per thread) so the file stays
  bounded; the newest checkpoint holds every channel value, so resume only
  ever needs it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000
DEFAULT_KEEP = 20


def connect(db_path: Path) -> sqlite3.Connection:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the saver guards the connection with its own lock.
    conn = sqlite3.connect(str(db_path), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def open_saver(db_path: Path):
    from langgraph.checkpoint.sqlite import SqliteSaver

    saver = SqliteSaver(connect(db_path))
    saver.setup()
    return saver


def prune(saver, thread_id: str, keep: int = DEFAULT_KEEP) -> int:
    """Delete all but the newest `keep` checkpoints of a thread (ids sort by time). Returns rows deleted."""
    with saver.cursor() as cur:
        cur.execute(
            "SELECT checkpoint_id FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' "
            "ORDER BY checkpoint_id DESC LIMIT 1 OFFSET ?",
            (thread_id, keep - 1),
        )
        row = cur.fetchone()
        if row is None:
            return 0
        oldest_kept = row[0]
        cur.execute("DELETE FROM writes WHERE thread_id = ? AND checkpoint_id < ?", (thread_id, oldest_kept))
        deleted = cur.rowcount
        cur.execute("DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_id < ?", (thread_id, oldest_kept))
        return deleted + cur.rowcount


def checkpoint_count(saver, thread_id: str) -> int:
    with saver.cursor(transaction=False) as cur:
        cur.execute("SELECT count(*) FROM checkpoints WHERE thread_id = ?", (thread_id,))
        return cur.fetchone()[0]
