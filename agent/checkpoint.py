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
- A run's connections copy no WAL into the database themselves (`autocheckpoint=False`):
  a `WalCheckpointer` thread does it after each step, beside the next, so no step waits for it.
  SQLite's automatic one (every 1000 pages) made one step in ~60 ~10 ms slower with
  16 KB tool outputs: most of bench_checkpoint's p99.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000
DEFAULT_KEEP = 20


WAL_SIZE_LIMIT = 16 << 20


def connect(db_path: Path, *, autocheckpoint: bool = True) -> sqlite3.Connection:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the saver guards the connection with its own lock.
    conn = sqlite3.connect(str(db_path), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # a WAL grown in a burst shrinks back once copied
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def open_saver(db_path: Path, *, autocheckpoint: bool = True):
    from langgraph.checkpoint.sqlite import SqliteSaver

    saver = SqliteSaver(connect(db_path, autocheckpoint=autocheckpoint))
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


class WalCheckpointer:
    """Copies the WAL into the database from its own thread and connection after each step (`nudge`),
    PASSIVE: it never waits for, nor blocks, the run's writes or the snapshotter's reads. Woken by steps,
    not by a timer, so a task waiting on its model costs nothing here."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="wal-checkpoint", daemon=True)

    def start(self) -> "WalCheckpointer":
        self._thread.start()
        return self

    def nudge(self) -> None:
        """A step was written: copy what the WAL holds (at once, or after the copy under way)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        conn = connect(self.db_path)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    pass  # busy or locked now: the next step's nudge copies it
                if self._stopping:
                    return
        finally:
            conn.close()
