"""Restore: bring the newest intact checkpoint snapshot back into an empty workspace.

Runs as the Job's init container before the agent starts. A workspace that
already has its checkpoint database is left alone (the PVC survived, and it is
newer than any snapshot). Otherwise the newest `jobs/<id>/checkpoints/*.db`
is downloaded to a temp file, must pass `PRAGMA integrity_check`, and only
then is renamed into place; a corrupt snapshot is skipped for the next older
one. Stale `-wal`/`-shm`/`-journal` files are removed first: SQLite would
replay a foreign WAL onto the restored database.

Exit codes: 0 restored, nothing to restore, or already present; EXIT_RETRY when
the store cannot be reached (the Job retries); EXIT_FATAL for bad settings.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
from pathlib import Path

from agent import contract
from agent.cli import UsageError, check_common, stderr_logger, task_parser
from agent.snapshot import list_snapshots
from agent.storage import ObjectNotFound, StorageError, Store, open_store


_log = stderr_logger("restore")


def _remove_sidecars(db: Path) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def check_integrity(path: str | os.PathLike) -> str:
    """'ok' when SQLite finds the database intact, else what is wrong."""
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return "not an SQLite database"
        conn = sqlite3.connect(str(path), isolation_level=None)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except (sqlite3.DatabaseError, OSError) as exc:
        return str(exc)
    finally:
        # A snapshot taken from a WAL database opens in WAL mode; closing checkpoints and removes
        # these, but leave nothing behind whatever happened.
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    result = "; ".join(str(r[0]) for r in rows[:5])
    return "ok" if result == "ok" else result


def restore(workspace: str | os.PathLike, store: Store, task_id: str) -> str | None:
    """Restore the newest intact snapshot; returns its key, or None when nothing was restored."""
    db = Path(workspace).absolute() / contract.checkpoint_path(task_id)
    if db.exists():
        _log(f"checkpoint {db} already present; nothing to do")
        return None
    candidates = list_snapshots(store, task_id)
    if not candidates:
        _log(f"no snapshot under {store.describe()}/{contract.checkpoints_prefix(task_id)}; nothing to restore")
        return None
    db.parent.mkdir(parents=True, exist_ok=True)
    for leftover in db.parent.glob(f".{db.name}.restore-*"):  # from a restore that was killed
        leftover.unlink(missing_ok=True)
    for key in reversed(candidates):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{db.name}.restore-", dir=db.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                store.get_file(key, tmp)
            except ObjectNotFound:  # pruned since the listing
                continue
            verdict = check_integrity(tmp)
            if verdict != "ok":
                _log(f"snapshot {store.url_for(key)} is damaged ({verdict}); trying an older one")
                continue
            _remove_sidecars(db)
            os.replace(tmp, db)
            _log(f"restored {store.url_for(key)} ({db.stat().st_size} bytes) to {db}")
            return key
        finally:
            tmp.unlink(missing_ok=True)
            _remove_sidecars(tmp)
    _log(f"none of the {len(candidates)} snapshots is intact; starting without a checkpoint")
    return None


def _parser():
    return task_parser(
        "python -m agent restore",
        "Restore the newest intact checkpoint snapshot into a workspace that has none.",
        store=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        check_common(args)
        store = open_store(args.store)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ValueError, StorageError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    _log(f"task={args.task_id} workspace={args.workspace} store={store.describe()}")
    try:
        restore(args.workspace, store, args.task_id)
    except StorageError as exc:
        _log(f"error: {exc}")
        return contract.EXIT_RETRY
    return 0
