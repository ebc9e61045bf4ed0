"""A fork's start: the parent's final workspace, its change-set base and its conversation, made the child's.

Run by the child's restore step (agent/restore.py) before its agent starts, only
while the child has no checkpoint database (its agent has never run).

Invariants
- The parent's archive (`jobs/<parent>/final/workspace.tar.gz`) is untrusted: its
  files are what an agent wrote. Nothing it holds is written outside the
  workspace: each member must be a regular file, a directory, a hard link to
  an accepted regular file of the same archive, or a symlink; names are
  relative with no `..`; tarfile's "data" filter runs on every member as
  well (it drops owners, setuid/setgid and group/other write bits). Regular
  files and directories are unpacked first, into a workspace that holds no
  symlink (it is cleared first: without a checkpoint the child has nothing of
  its own), so no path resolves through a link; symlinks come last, each
  created only where no link lies on its path, and any that resolves outside
  the workspace is removed again. Devices, fifos and the parent's runtime
  state (`.dockyard/`, `checkpoints/`) are skipped.
- The child's `.dockyard/base.json` is the parent's base (from the parent's
  `changes.json`), so the child's change set is against the commit the parent
  was cloned at: it shows the parent's work and the child's together.
- The conversation: the chosen snapshot of the parent's checkpoint database is
  copied with its thread re-keyed to the child's task id, and its last state
  made a strategic round to run next: outcome cleared, the per-task counters
  (model turns, rounds, tool calls, inbox) back at zero, the transcript and
  todo list kept. The child's prompt is the first line of its inbox, so the
  strategic node hands it to the model as a new instruction.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import sqlite3
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from agent import contract
from agent.cli import stderr_logger

_log = stderr_logger("restore")
RUNTIME_STATE = (".dockyard", contract.CHECKPOINT_DIR)  # the parent's, never the child's
KEPT_ON_CLEAR = ("lost+found",)  # a fresh volume's own
ARCHIVE_TEMP = ".dockyard/parent-workspace.tar.gz.part"  # relative to the workspace


@dataclass
class Unpacked:
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (member name, why)


def clear_workspace(workspace: Path) -> None:
    """Remove what a restore cut short left (never following a link)."""
    for entry in workspace.iterdir():
        if entry.name in KEPT_ON_CLEAR:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _clean_name(name: str) -> str | None:
    """The member's name as a relative POSIX path, or None when it is absolute or climbs (`..`)."""
    if not name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _refusal(member: tarfile.TarInfo, accepted_files: set[str]) -> str | None:
    """Why a member is not unpacked, or None."""
    name = _clean_name(member.name)
    if name is None:
        return "absolute or climbing path"
    if name.split("/", 1)[0] in RUNTIME_STATE:
        return "the parent's runtime state"
    if member.isreg() or member.isdir():
        return None
    if member.islnk():
        target = _clean_name(member.linkname)
        return None if target in accepted_files else "hard link to something not unpacked"
    if member.issym():
        target = member.linkname
        if not target or target.startswith("/"):
            return "absolute symlink"
        if posixpath.normpath(posixpath.join(posixpath.dirname(name), target)).split("/", 1)[0] == "..":
            return "symlink out of the workspace"
        return None
    return "device, fifo or other special file"


def _owner_can_write(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """The child's agent works on these files: the owner may always read and write them."""
    if member.mode is None:
        return member
    extra = 0o700 if member.isdir() else 0o600
    return member.replace(mode=member.mode | extra, deep=False)


def unpack_workspace(archive: Path, workspace: Path) -> Unpacked:
    """Unpack an untrusted workspace archive into `workspace` (see the module's invariants)."""
    workspace = workspace.absolute()
    report = Unpacked()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        accepted_files: set[str] = set()
        plain, links = [], []
        for member in members:
            why = _refusal(member, accepted_files)
            if why:
                report.skipped.append((member.name, why))
                continue
            (links if member.issym() else plain).append(member)
            if member.isreg():
                accepted_files.add(_clean_name(member.name))

        def checked(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
            if member.issym():
                parent = workspace / posixpath.dirname(_clean_name(member.name))
                if os.path.realpath(parent) != str(parent):  # a link on the way: it would be made elsewhere
                    report.skipped.append((member.name, "symlink below another symlink"))
                    return None
            try:
                member = tarfile.data_filter(member, dest)
            except tarfile.FilterError as exc:
                report.skipped.append((member.name, str(exc)))
                return None
            report.files += 1
            return _owner_can_write(member)

        tar.extractall(workspace, members=plain, filter=checked)
        tar.extractall(workspace, members=links, filter=checked)
    for member in links:  # a chain of links that are each inside may still lead out: remove those
        path = workspace / _clean_name(member.name)
        if path.is_symlink() and not _inside(path, workspace):
            path.unlink()
            report.skipped.append((member.name, "symlink resolving out of the workspace"))
    return report


def _inside(path: Path, root: Path) -> bool:
    resolved = os.path.realpath(path)
    return resolved == str(root) or resolved.startswith(str(root) + os.sep)


def restore_workspace(workspace: Path, store, parent_id: str) -> Unpacked:
    """Clear the workspace, then unpack the parent's final archive into it and record the parent's base."""
    from agent.changes import record_base, summary_key

    workspace.mkdir(parents=True, exist_ok=True)
    clear_workspace(workspace)
    temp = workspace / ARCHIVE_TEMP
    temp.parent.mkdir(parents=True, exist_ok=True)
    try:
        store.get_file(contract.final_archive_key(parent_id), temp)
        report = unpack_workspace(temp, workspace)
    finally:
        temp.unlink(missing_ok=True)
    _log(f"unpacked {report.files} entries of task {parent_id}'s final workspace; skipped {len(report.skipped)}")
    for name, why in report.skipped[:20]:
        _log(f"  skipped {name!r}: {why}")
    base = _parent_base(store, summary_key(parent_id))
    if base is not None:
        record_base(workspace, {"url": base.get("repo"), "ref": base.get("ref")}, base["commit"])
        _log(f"change-set base: the parent's, commit {base['commit']}")
    return report


def _parent_base(store, key: str) -> dict | None:
    """The base the parent's change set was computed against, when it was a verified commit."""
    from agent.storage import ObjectNotFound

    try:
        summary = json.loads(store.get_bytes(key))
    except (ObjectNotFound, ValueError):
        return None
    base = summary.get("base") if isinstance(summary, dict) else None
    if not isinstance(base, dict) or not base.get("verified") or not isinstance(base.get("commit"), str):
        return None
    return base


def adopt_conversation(db: Path, parent_id: str, task_id: str) -> bool:
    """Re-key a copy of the parent's checkpoint database to this task and make its next step a strategic
    round. False when it holds no state of the parent's thread (then the child starts afresh)."""
    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "checkpoints" not in tables:
            return False
        conn.execute("BEGIN IMMEDIATE")
        for table in ("checkpoints", "writes"):
            if table in tables:
                conn.execute(f"DELETE FROM {table} WHERE thread_id != ?", (parent_id,))  # noqa: S608 - fixed names
                conn.execute(f"UPDATE {table} SET thread_id = ? WHERE thread_id = ?", (task_id, parent_id))  # noqa: S608
        conn.execute("COMMIT")
    finally:
        conn.close()
    return _continue_with_new_instruction(db, task_id)


# What a fork starts afresh; the conversation (transcript, views) and the todo list stay.
_RESET = {
    "phase": contract.PHASE_STRATEGIC,
    "outcome": None,
    "summary": None,
    "model_turns": 0,
    "strategic_rounds": 0,
    "tactical_calls": 0,
    "tool_calls": 0,
    "inbox_seen": 0,
    "reply": -1,
    "calls_answered": 0,
    "calls_total": 0,
}


def _continue_with_new_instruction(db: Path, task_id: str) -> bool:
    from agent.checkpoint import open_saver
    from agent.graph import build_graph

    saver = open_saver(db)
    try:
        graph = build_graph(None, checkpointer=saver)  # nodes never run here: only the state is updated
        config = {"configurable": {"thread_id": task_id}}
        if not graph.get_state(config).values:
            return False
        graph.update_state(config, dict(_RESET), as_node="strategic")  # routes to "strategic" next
        return True
    finally:
        saver.conn.close()


def write_instruction(workspace: Path, prompt: str) -> None:
    """The child's prompt as the first (and only) message of its inbox, read by its first strategic round."""
    from agent.graph import Inbox

    path = workspace / ".dockyard" / "inbox.jsonl"
    path.unlink(missing_ok=True)
    Inbox(path).append(prompt)
