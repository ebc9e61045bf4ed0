"""Snapshots of the agent's SQLite checkpoint, and the final upload of a workspace.

Invariant: a snapshot is a consistent copy made with SQLite's online backup API
(`sqlite3.Connection.backup`), never a raw file copy of a live WAL database
(the `-wal` file holds committed pages the main file does not have yet). The
copy goes into a temp file, which is hashed and uploaded in one read of it
(`Store.put_file_hashed`) to `contract.checkpoint_key(task_id)` =
`jobs/<id>/checkpoints/<UTC-timestamp>.db`: a snapshot costs one backup plus one read.

How a concurrent writer is kept going: for a WAL database the backup first
opens a read transaction on the source and keeps it for the whole copy, so
every step reads the same snapshot (the copy holds exactly the transactions
committed before the backup began) and the backup never restarts because of a
new commit; WAL readers do not block writers. The copy runs in steps of a few
MB with a short sleep between steps, so a writer in the same process gets the
GIL and the disk.

An unchanged database is not uploaded again: the sha256 of the backup file is
compared with the last uploaded one, remembered in memory and in
`<workspace>/.dockyard/last_snapshot.json`, and the remembered object must
still exist in the store. The comparison happens after the last byte was read and
before the new object becomes visible; a duplicate is discarded (an S3 multipart
upload is aborted). So that an idle task does not send its whole database only to
discard it, the source's files are stat'ed before each backup: when their sizes and
mtimes equal those at the last upload, the copy is hashed first and uploaded only if
it differs after all (then it is read twice; the stat only chooses the order, the
hash decides).

`upload_final` writes `jobs/<id>/final/workspace.tar.gz` first, then the
change set (`changes.patch`, `changes.json`, see agent/changes.py) and
`jobs/<id>/final/result.json` last, so the presence of result.json means the
final set is complete. result.json is the agent's, with `changes_key` and
`changes_patch_key` added, or `changes_error` when the change set could not be
computed (that never costs the archive or the result). When the task asked for a
push (`repo.push`, see agent/push.py), the change set is then committed and pushed
as a branch, before result.json, which gains `push` or `push_error`; a push that
fails or is refused never costs the archive, the change set or the result.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from agent import contract
from agent.cli import stderr_logger
from agent.digest import sha256_file
from agent.storage import Store

if TYPE_CHECKING:
    import tarfile

    from agent.push import PushRequest

STATE_DIR = ".dockyard"  # runtime folder in the workspace; never archived
LAST_SNAPSHOT_FILE = f"{STATE_DIR}/last_snapshot.json"  # relative to the workspace
BACKUP_STEP_BYTES = 16 * 1024 * 1024  # copied per backup step
BACKUP_STEP_SLEEP = 0.001  # seconds between steps, so a concurrent writer is not stalled
_KEY_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
CHANGE_FIELDS = ("changes_key", "changes_patch_key", "changes_error", "push", "push_error")  # what result.json gains


@dataclass(frozen=True)
class SnapshotResult:
    key: str  # the object holding this database state (the previous one when not uploaded)
    size: int
    uploaded: bool
    sha256: str


@dataclass(frozen=True)
class FinalUpload:
    archive_key: str
    archive_size: int
    result_key: str
    result: dict


# Last uploaded snapshot per (store, task, database): (sha256, key, source files' stat before its backup).
_last_uploaded: dict[tuple[str, str, str], tuple[str, str, list]] = {}
_last_lock = threading.Lock()


def workspace_of(db_path: Path) -> Path:
    """The workspace a checkpoint database belongs to (`<workspace>/checkpoints/job_<id>.db`)."""
    db_path = Path(db_path).absolute()
    if db_path.parent.name == contract.CHECKPOINT_DIR:
        return db_path.parent.parent
    return db_path.parent


def backup_database(
    db_path: str | os.PathLike,
    dest_path: str | os.PathLike,
    *,
    step_bytes: int = BACKUP_STEP_BYTES,
    sleep: float = BACKUP_STEP_SLEEP,
) -> None:
    """Copy a live SQLite database into `dest_path` (a new file) with the online backup API."""
    import sqlite3  # imported when first used: the snapshotter idles without it

    source_uri = Path(db_path).absolute().as_uri() + "?mode=rw"  # never create a missing database
    src = sqlite3.connect(source_uri, uri=True, isolation_level=None)
    dst = sqlite3.connect(str(dest_path), isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout = 10000")
        # Pages not in the WAL are read through mmap: no read syscall per page.
        src.execute("PRAGMA mmap_size = 1073741824")
        # The destination is a private temp file: no journal, no fsync (a torn copy is caught by
        # restore's integrity check, which then falls back to an older snapshot).
        dst.execute("PRAGMA journal_mode = OFF")
        dst.execute("PRAGMA synchronous = OFF")
        dst.execute("PRAGMA cache_size = -65536")
        page_size = src.execute("PRAGMA page_size").fetchone()[0]
        wal = src.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        if wal:
            # One read transaction for the whole copy: all steps see the same snapshot, and a
            # commit by another connection does not restart the backup.
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_schema").fetchone()
            pages = max(16, step_bytes // page_size)

            def pause(_status, _remaining, _total):
                time.sleep(sleep)

            src.backup(dst, pages=pages, progress=pause if sleep > 0 else None)
            src.execute("COMMIT")
        else:
            # Rollback journal: a step-wise backup restarts on every foreign commit and may never
            # finish, so copy in one step under one shared lock.
            src.backup(dst, pages=-1)
    finally:
        dst.close()
        src.close()


def _source_stat(db_path: Path) -> list:
    """Size and mtime of the database and its WAL: equal ones suggest (never prove) an unchanged database."""
    found = []
    for path in (db_path, Path(f"{db_path}-wal")):
        try:
            st = path.stat()
        except FileNotFoundError:
            found.append(None)
        else:
            found.append([st.st_size, st.st_mtime_ns])
    return found


def _read_state(state_file: Path) -> dict:
    try:
        data = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(state_file: Path, data: dict) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{state_file.name}.", dir=state_file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, state_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _next_key(task_id: str, after: str | None) -> str:
    """A fresh checkpoint key that sorts after `after`, even if the clock stepped back."""
    key = contract.checkpoint_key(task_id)
    if after and key <= after:
        try:
            last = datetime.strptime(after.rsplit("/", 1)[-1][: -len(".db")], _KEY_TIME_FORMAT)
            key = contract.checkpoint_key(task_id, last.replace(tzinfo=timezone.utc) + timedelta(microseconds=1))
        except ValueError:
            pass
    return key


def take_snapshot(
    db_path: str | os.PathLike,
    store: Store,
    task_id: str,
    *,
    state_file: str | os.PathLike | None = None,
    step_bytes: int = BACKUP_STEP_BYTES,
    sleep: float = BACKUP_STEP_SLEEP,
) -> SnapshotResult:
    """Back up the database and upload it, unless it equals the last uploaded snapshot.

    Raises FileNotFoundError when the database does not exist, StorageError when the upload fails.
    """
    db_path = Path(db_path).absolute()
    if not db_path.is_file():
        raise FileNotFoundError(f"no checkpoint database at {db_path}")
    workspace = workspace_of(db_path)
    state_file = Path(state_file) if state_file else workspace / LAST_SNAPSHOT_FILE
    state_file.parent.mkdir(parents=True, exist_ok=True)
    memo = (store.describe(), task_id, str(db_path))

    # The temp copy lives in the workspace's runtime folder: same volume, never archived.
    fd, tmp_name = tempfile.mkstemp(prefix=f"snapshot-{task_id}-", suffix=".db", dir=state_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.unlink(tmp)  # SQLite creates the destination itself
        source_stat = _source_stat(db_path)  # before the backup: a commit after it changes the next one
        backup_database(db_path, tmp, step_bytes=step_bytes, sleep=sleep)
        size = tmp.stat().st_size

        with _last_lock:
            last = _last_uploaded.get(memo)
        if last is None:
            state = _read_state(state_file)
            if state.get("store") == memo[0] and state.get("task_id") == task_id and state.get("db") == memo[2]:
                last = (state.get("sha256"), state.get("key"), state.get("source_stat"))

        def duplicate(sha: str) -> bool:  # of the remembered object, which must still exist
            return bool(last and last[0] == sha and last[1] and store.exists(last[1]))

        if last and last[2] == source_stat:
            # Probably unchanged: hash first (one read) and upload only if it differs after all.
            sha = sha256_file(tmp)
            if duplicate(sha):
                return SnapshotResult(key=last[1], size=size, uploaded=False, sha256=sha)

        key = _next_key(task_id, last[1] if last else None)
        put = store.put_file_hashed(key, tmp, keep=lambda sha: not duplicate(sha))
        if not put.stored:
            return SnapshotResult(key=last[1], size=size, uploaded=False, sha256=put.sha256)
        with _last_lock:
            _last_uploaded[memo] = (put.sha256, key, source_stat)
        _write_state(
            state_file,
            {
                "store": memo[0],
                "task_id": task_id,
                "db": memo[2],
                "key": key,
                "sha256": put.sha256,
                "size": size,
                "source_stat": source_stat,
                "ts": contract.iso_utc(),
            },
        )
        return SnapshotResult(key=key, size=size, uploaded=True, sha256=put.sha256)
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


def remove_stale_temp_files(workspace: str | os.PathLike, task_id: str) -> list[Path]:
    """Delete temp copies a killed snapshotter left in the runtime folder (they can be large)."""
    state_dir = Path(workspace) / STATE_DIR
    stale = [*state_dir.glob(f"snapshot-{task_id}-*.db*"), *state_dir.glob(f"final-{task_id}-*.tar.gz")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def list_snapshots(store: Store, task_id: str) -> list[str]:
    """Checkpoint keys of a task, oldest first (keys sort by time)."""
    return [k for k in store.list(contract.checkpoints_prefix(task_id)) if k.endswith(".db")]


def prune_snapshots(store: Store, task_id: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a task; returns the deleted keys."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    old = list_snapshots(store, task_id)[:-keep]
    for key in old:
        store.delete(key)
    return old


class _Padded:
    """A file that may shrink while archived: pad to the size already written in the tar header."""

    def __init__(self, f):
        self._f = f
        self.short = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if n is not None and n > 0 and len(data) < n:
            self.short = True
            data += b"\0" * (n - len(data))
        return data


_warn = stderr_logger("snapshot: warning")


def write_workspace_archive(workspace: str | os.PathLike, dest: str | os.PathLike) -> None:
    """tar.gz of the workspace without `checkpoints/` and `.dockyard/` but for `.dockyard/outputs/` (each tool
    call's full output, served by the stream app); symlinks are stored as links."""
    import tarfile  # imported when first used: the snapshotter idles without it

    root = Path(workspace).absolute()
    with tarfile.open(dest, "w:gz", compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
        _add_tree(tar, root, Path("."), excluded={contract.CHECKPOINT_DIR, STATE_DIR})
        outputs = Path(contract.OUTPUTS_DIR)
        if (root / outputs).is_dir() and not any((root / p).is_symlink() for p in (outputs.parent, outputs)):
            _add_entry(tar, root, outputs.parent)
            _add_tree(tar, root, outputs, excluded=set())


def _add_tree(tar: tarfile.TarFile, root: Path, top: Path, excluded: set[str]) -> None:
    """`top` (relative to `root`) and what is under it, without following links; `excluded` names at its top."""
    for dirpath, dirnames, filenames in os.walk(root / top, followlinks=False, onerror=lambda e: _warn(str(e))):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == top:
            dirnames[:] = [d for d in dirnames if d not in excluded]
            filenames = [f for f in filenames if f not in excluded]
        dirnames.sort()
        # os.walk lists symlinks to directories under dirnames; archive them as links.
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(name)
            filenames.append(name)
        if rel_dir != Path("."):
            _add_entry(tar, root, rel_dir)
        for name in sorted(filenames):
            _add_entry(tar, root, rel_dir / name)


def _add_entry(tar: tarfile.TarFile, root: Path, rel: Path) -> None:
    path = root / rel
    arcname = rel.as_posix()
    try:
        info = tar.gettarinfo(str(path), arcname=arcname)
    except OSError as exc:
        _warn(f"skipping {arcname}: {exc}")
        return
    if info is None:  # sockets and other unarchivable kinds
        _warn(f"skipping {arcname}: unsupported file type")
        return
    if info.isreg():
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return
                info.size = st.st_size
                padded = _Padded(f)
                tar.addfile(info, padded)
                if padded.short:
                    _warn(f"{arcname} shrank while being archived; padded with zeros")
        except OSError as exc:
            _warn(f"skipping {arcname}: {exc}")
        return
    if info.ischr() or info.isblk() or info.isfifo():
        _warn(f"skipping {arcname}: device or fifo")
        return
    tar.addfile(info)


def _final_result(workspace: Path, task_id: str) -> dict:
    """The agent's result.json, or an "unknown" outcome saying what is wrong with it."""
    path = workspace / contract.RESULT_FILE
    try:
        result = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"task_id": task_id, "outcome": "unknown"}
    except OSError as exc:
        return {"task_id": task_id, "outcome": "unknown", "error": f"cannot read {contract.RESULT_FILE}: {exc}"}
    except ValueError as exc:
        return {"task_id": task_id, "outcome": "unknown", "error": f"{contract.RESULT_FILE} is not JSON: {exc}"}
    if not isinstance(result, dict):
        return {"task_id": task_id, "outcome": "unknown", "error": f"{contract.RESULT_FILE} is not a JSON object"}
    return result


def upload_final(workspace: str | os.PathLike, store: Store, task_id: str, push: PushRequest | None = None) -> FinalUpload:
    """Upload the workspace archive, then result.json (last: its presence marks a complete set).
    With `push`, the change set is also pushed as a branch before result.json."""
    workspace = Path(workspace).absolute()
    state_dir = workspace / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"final-{task_id}-", suffix=".tar.gz", dir=state_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_workspace_archive(workspace, tmp)
        archive_key = contract.final_archive_key(task_id)
        archive_size = tmp.stat().st_size
        store.put_file(archive_key, tmp, move=True)
    finally:
        tmp.unlink(missing_ok=True)
    # The agent's own fields of these names are dropped: only this step names the change set.
    agents = {k: v for k, v in _final_result(workspace, task_id).items() if k not in CHANGE_FIELDS}
    result = {**agents, **upload_change_set(workspace, store, task_id, push, agents.get("summary"))}
    result_key = contract.final_result_key(task_id)
    store.put_bytes(result_key, json.dumps(result).encode())
    return FinalUpload(archive_key=archive_key, archive_size=archive_size, result_key=result_key, result=result)


def upload_change_set(workspace: Path, store: Store, task_id: str, push: PushRequest | None = None,
                      summary: object = None) -> dict:
    """Compute and upload the change set, then push it when asked; the fields result.json gains (its keys
    or `changes_error`, and `push` or `push_error`).

    A storage error is raised (the final upload is retried); any other failure is reported in words."""
    from agent import changes  # imported when first used: the snapshotter idles without it

    with changes.scratch_dir() as scratch:
        try:
            change_set = changes.compute(workspace, scratch)
        except Exception as exc:  # whatever the workspace holds, the final set is still uploaded
            _warn(f"no change set: {type(exc).__name__}: {exc}")
            fields = {"changes_error": f"{type(exc).__name__}: {exc}"[:2000]}
            return {**fields, "push_error": "not pushed: there is no change set"} if push else fields
        store.put_file(changes.patch_key(task_id), change_set.patch, move=True)
        store.put_bytes(changes.summary_key(task_id), change_set.summary_bytes())
        fields = {"changes_key": changes.summary_key(task_id), "changes_patch_key": changes.patch_key(task_id)}
        if push is not None:
            fields.update(_push(workspace, scratch, change_set.summary, push, task_id, summary))
    return fields


def _push(workspace: Path, scratch: str, change_set: dict, push: PushRequest, task_id: str, summary: object) -> dict:
    """The change set as a branch (agent/push.py), dated by the agent's result file so a repeat makes the same commit."""
    from agent.push import deliver

    try:
        date = (workspace / contract.RESULT_FILE).stat().st_mtime
    except OSError:
        date = None
    fields = deliver(scratch, change_set, push, task_id, date=date, message=summary if isinstance(summary, str) else None)
    if "push_error" in fields:
        _warn(f"push of branch {push.branch!r}: {fields['push_error']}")
    return fields


def snapshot_event(task_id: str, snap: SnapshotResult | None, *, final: bool = False, **extra) -> dict:
    """The JSON body published on events.agent.<id> after a snapshot (`snap` None: there was no database)."""
    event = {
        "type": contract.EV_SNAPSHOT,
        "task_id": task_id,
        "ts": contract.iso_utc(),
        "key": snap.key if snap else None,
        "size": snap.size if snap else 0,
        "uploaded": snap.uploaded if snap else False,
        "final": final,
    }
    event.update(extra)
    return event
