"""Restore: bring the newest intact checkpoint snapshot back into an empty workspace.

Runs as the Job's init container before the agent starts. A workspace that
already has its checkpoint database is left alone (the PVC survived, and it is
newer than any snapshot). Otherwise the newest `jobs/<id>/checkpoints/*.db`
is downloaded to a temp file, must pass `PRAGMA integrity_check`, and only
then is renamed into place; a corrupt snapshot is skipped for the next older
one. Stale `-wal`/`-shm`/`-journal` files are removed first: SQLite would
replay a foreign WAL onto the restored database.

A fork (`--parent P [--parent-snapshot KEY] --task-file F`) first gets P's final
workspace, base and, when the child has no snapshot of its own yet, the
conversation of P's snapshot KEY with the child's prompt as a new instruction
(agent/fork.py). Without KEY, or when that snapshot is damaged, the child starts
a new conversation in P's workspace.

Exit codes: 0 restored, nothing to restore, or already present; EXIT_RETRY when
the store cannot be reached (the Job retries); EXIT_FATAL for bad settings, or
a fork whose parent has no final archive.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent import contract, fork
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


@dataclass(frozen=True)
class Parent:
    """A fork's parent: its task id, the snapshot whose conversation continues (None: a new one), the new prompt."""

    task_id: str
    snapshot: str | None
    prompt: str


def restore(workspace: str | os.PathLike, store: Store, task_id: str, parent: Parent | None = None) -> str | None:
    """Restore the newest intact snapshot; returns its key, or None when nothing was restored."""
    db = Path(workspace).absolute() / contract.checkpoint_path(task_id)
    if db.exists():
        _log(f"checkpoint {db} already present; nothing to do")
        return None
    if parent is not None:
        fork.restore_workspace(Path(workspace).absolute(), store, parent.task_id)
    candidates = list_snapshots(store, task_id)
    if candidates:
        return _restore_newest(store, candidates, db)
    if parent is not None and parent.snapshot:
        key = _restore_newest(store, [parent.snapshot], db, adopt=lambda tmp: fork.adopt_conversation(tmp, parent.task_id, task_id))
        if key is not None:
            fork.write_instruction(Path(workspace).absolute(), parent.prompt)
            _log(f"continuing task {parent.task_id}'s conversation with a new instruction")
            return key
    _log(f"no snapshot under {store.describe()}/{contract.checkpoints_prefix(task_id)}; nothing to restore")
    return None


def _restore_newest(store: Store, candidates: list[str], db: Path, adopt=None) -> str | None:
    """The newest intact one of `candidates` (`adopt(tmp)` makes it this task's, False: unusable) at `db`."""
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
            if adopt is not None and not adopt(tmp):
                _log(f"snapshot {store.url_for(key)} holds no conversation of its task; starting a new one")
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
    parser = task_parser(
        "python -m agent restore",
        "Restore the newest intact checkpoint snapshot into a workspace that has none.",
        store=True,
    )
    parser.add_argument("--parent", metavar="TASK_ID", help="a fork: start in this task's final workspace")
    parser.add_argument("--parent-snapshot", metavar="KEY", help="a fork: continue the conversation of this snapshot of the parent")
    parser.add_argument("--task-file", help="a fork: the task file, whose prompt is the new instruction")
    return parser


def _fork_parent(args) -> Parent | None:
    if not args.parent:
        if args.parent_snapshot:
            raise UsageError("--parent-snapshot needs --parent")
        return None
    if not contract.is_valid_task_id(args.parent):
        raise UsageError(f"--parent: {args.parent!r} is not a valid task id")
    if args.parent_snapshot and not args.parent_snapshot.startswith(contract.checkpoints_prefix(args.parent)):
        raise UsageError(f"--parent-snapshot must be a key under {contract.checkpoints_prefix(args.parent)}")
    if not args.task_file:
        raise UsageError("--parent needs --task-file (its prompt is the fork's new instruction)")
    try:
        task = json.loads(Path(args.task_file).read_text())
        prompt = task["prompt"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--task-file {args.task_file}: no prompt to read ({exc})") from None
    return Parent(args.parent, args.parent_snapshot, str(prompt))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        check_common(args)
        parent = _fork_parent(args)
        store = open_store(args.store)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ValueError, StorageError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    _log(f"task={args.task_id} workspace={args.workspace} store={store.describe()}")
    try:
        restore(args.workspace, store, args.task_id, parent)
    except ObjectNotFound as exc:  # the parent's final archive: retrying cannot bring it
        _log(f"error: cannot fork task {parent.task_id if parent else '?'}: {exc}")
        return contract.EXIT_FATAL if parent is not None else contract.EXIT_RETRY
    except StorageError as exc:
        _log(f"error: {exc}")
        return contract.EXIT_RETRY
    return 0
