"""The change set on real git repositories, cloned as the agent clones, uploaded to real stores."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent import changes, contract
from agent.run import clone_repo
from agent.snapshot import upload_final

TASK = "t-changes"
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ID, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def make_origin(path: Path, files: dict[str, bytes | str]) -> Path:
    """A repository with one commit of `files`."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    git(path, "add", "--all")
    git(path, "commit", "--quiet", "-m", "base")
    return path


def cloned_workspace(tmp_path: Path, files: dict[str, bytes | str]) -> tuple[Path, Path, str]:
    """A workspace whose repo/ was cloned by the agent's own clone_repo: (workspace, repo dir, base commit)."""
    origin = make_origin(tmp_path / "origin", files)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    clone_repo({"url": origin.as_uri()}, workspace, dict(os.environ), allow_file=True)
    return workspace, workspace / contract.REPO_DIR, git(origin, "rev-parse", "HEAD").strip()


def compute(workspace: Path, tmp_path: Path, **kwargs) -> tuple[dict, bytes]:
    scratch = tempfile.mkdtemp(dir=tmp_path)  # a fresh one per computation, as the snapshotter's
    change_set = changes.compute(workspace, scratch, **kwargs)
    return change_set.summary, change_set.patch.read_bytes()


def by_path(summary: dict) -> dict[str, dict]:
    return {f["path"]: f for f in summary["files"]}


BASE_FILES = {
    "keep.txt": "unchanged\n",
    "edit.txt": "".join(f"line {i}\n" for i in range(10)),
    "gone.txt": "a\nb\nc\n",
    "old_name.txt": "".join(f"stable content {i}\n" for i in range(30)),
    "image.bin": bytes(range(256)) * 4,
}


def test_clone_records_its_base_commit(tmp_path):
    workspace, _, commit = cloned_workspace(tmp_path, {"a.txt": "a"})
    recorded = json.loads((workspace / changes.BASE_FILE).read_text())
    assert recorded == {"repo": (tmp_path / "origin").as_uri(), "ref": None, "commit": commit}


def test_repository_changes_with_status_and_line_counts(tmp_path):
    workspace, repo, commit = cloned_workspace(tmp_path, BASE_FILES)
    (repo / "edit.txt").write_text("line 0\nline 1 changed\nline 2\nline 3\n")  # 1 changed, 6 removed
    (repo / "gone.txt").unlink()
    (repo / "old_name.txt").rename(repo / "new_name.txt")
    (repo / "image.bin").write_bytes(bytes(range(255, -1, -1)) * 4)
    (repo / "src").mkdir()
    (repo / "src" / "fresh.py").write_text("print('new')\nprint('file')\n")  # untracked
    # The agent's state, beside the repository, is never part of it.
    (workspace / contract.CHECKPOINT_DIR).mkdir()
    (workspace / contract.CHECKPOINT_DIR / "job.db").write_text("db")
    (workspace / ".dockyard" / "heartbeat").write_text("now")

    summary, patch = compute(workspace, tmp_path)

    assert summary["base"] == {"repo": (tmp_path / "origin").as_uri(), "ref": None, "commit": commit, "verified": True, "against": "commit"}
    assert summary["root"] == "repo" and summary["cut"] is False
    files = by_path(summary)
    assert set(files) == {"edit.txt", "gone.txt", "new_name.txt", "image.bin", "src/fresh.py"}
    assert (files["edit.txt"]["status"], files["edit.txt"]["added_lines"], files["edit.txt"]["deleted_lines"]) == ("modified", 1, 7)
    assert (files["gone.txt"]["status"], files["gone.txt"]["deleted_lines"]) == ("deleted", 3)
    assert files["new_name.txt"]["status"] == "renamed" and files["new_name.txt"]["old_path"] == "old_name.txt"
    assert files["image.bin"]["status"] == "modified" and files["image.bin"]["binary"] is True
    assert (files["src/fresh.py"]["status"], files["src/fresh.py"]["added_lines"]) == ("added", 2)
    assert summary["totals"] == {"files": 5, "added_lines": 3, "deleted_lines": 10}
    assert b"+line 1 changed" in patch and b"rename from old_name.txt" in patch and b"GIT binary patch" in patch
    assert b"checkpoints" not in patch and b"heartbeat" not in patch
    # Nothing was written into the workspace's repository: no object for a new file, its index untouched.
    blob = git(repo, "hash-object", "src/fresh.py").strip()
    assert subprocess.run(["git", "cat-file", "-e", blob], cwd=repo, capture_output=True).returncode != 0
    assert "?? src/" in git(repo, "status", "--porcelain")


def test_the_patch_applies_to_a_clone_of_the_base(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE_FILES)
    (repo / "edit.txt").write_text("rewritten\n")
    (repo / "gone.txt").unlink()
    (repo / "image.bin").write_bytes(b"\0binary\0" * 50)
    (repo / "added.txt").write_text("added\n")
    _, patch = compute(workspace, tmp_path)
    check = tmp_path / "check"
    git(tmp_path, "clone", "--quiet", (tmp_path / "origin").as_uri(), str(check))
    (tmp_path / "p.patch").write_bytes(patch)
    git(check, "apply", "--index", str(tmp_path / "p.patch"))
    for name in ("edit.txt", "image.bin", "added.txt"):
        assert (check / name).read_bytes() == (repo / name).read_bytes()
    assert not (check / "gone.txt").exists()


def test_without_a_repository_every_file_is_new(tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "pkg").mkdir(parents=True)
    (workspace / "pkg" / "mod.py").write_text("x = 1\ny = 2\n")
    (workspace / "README").write_text("hello\n")
    (workspace / contract.CHECKPOINT_DIR).mkdir()
    (workspace / contract.CHECKPOINT_DIR / "job.db").write_text("db")
    (workspace / ".dockyard").mkdir()
    (workspace / contract.RESULT_FILE).write_text("{}")
    (workspace / "repo.partial").mkdir()  # a clone that failed half-way
    (workspace / "repo.partial" / "half.txt").write_text("half\n")

    summary, patch = compute(workspace, tmp_path)

    assert summary["base"]["against"] == "empty-tree" and summary["base"]["verified"] is False
    assert "no repository" in summary["base"]["note"] and summary["root"] == "."
    assert {f["path"]: (f["status"], f["added_lines"]) for f in summary["files"]} == {"pkg/mod.py": ("added", 2), "README": ("added", 1)}
    assert b"+x = 1" in patch and b".dockyard" not in patch and b"checkpoints" not in patch and b"half" not in patch


def test_nothing_changed_is_an_empty_change_set(tmp_path):
    workspace, _, _ = cloned_workspace(tmp_path, BASE_FILES)
    summary, patch = compute(workspace, tmp_path)
    assert summary["files"] == [] and summary["totals"] == {"files": 0, "added_lines": 0, "deleted_lines": 0}
    assert patch == b"" and summary["base"]["verified"] is True


@pytest.mark.parametrize("outcome", ["done", "failed", "cancelled"])
def test_upload_final_stores_the_change_set_before_the_result(tmp_path, store, outcome):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE_FILES)
    (repo / "edit.txt").write_text("new\n")
    (workspace / contract.RESULT_FILE).write_text(json.dumps({"task_id": TASK, "outcome": outcome}))

    upload_final(workspace, store, TASK)

    result = json.loads(store.get_bytes(contract.final_result_key(TASK)))
    assert result == {"task_id": TASK, "outcome": outcome, "changes_key": changes.summary_key(TASK), "changes_patch_key": changes.patch_key(TASK)}
    listing = json.loads(store.get_bytes(result["changes_key"]))
    assert [(f["path"], f["status"]) for f in listing["files"]] == [("edit.txt", "modified")]
    assert b"+new" in store.get_bytes(result["changes_patch_key"])


def test_a_failed_change_set_keeps_the_archive_and_the_result(tmp_path, store, monkeypatch):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE_FILES)
    (workspace / contract.RESULT_FILE).write_text(json.dumps({"task_id": TASK, "outcome": "done", "changes_key": "forged"}))
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # git cannot be found: the computation fails

    final = upload_final(workspace, store, TASK)

    result = json.loads(store.get_bytes(final.result_key))
    assert result["outcome"] == "done" and "changes_key" not in result
    assert "git" in result["changes_error"]
    assert store.exists(contract.final_archive_key(TASK)) and not store.exists(changes.patch_key(TASK))


def test_the_listing_is_found_whatever_the_chunking(tmp_path):
    """The patch is read in chunks: the listing's end is known only once all of it arrived."""
    workspace, repo, _ = cloned_workspace(tmp_path, BASE_FILES)
    (repo / "old_name.txt").rename(repo / "new\tname.txt")  # a rename, and a tab in a path
    (repo / "edit.txt").write_text("x\n")
    summary, patch = compute(workspace, tmp_path)
    listing = b"".join(
        f":{f.get('mode')} {f.get('mode')} {'0' * 40} {'1' * 40} {'R100' if f.get('old_path') else 'M'}\0".encode()
        + (f"{f['old_path']}\0" if f.get("old_path") else "").encode() + f"{f['path']}\0".encode()
        for f in summary["files"]
    ) + b"".join(
        (f"{f['added_lines']}\t{f['deleted_lines']}\t\0{f['old_path']}\0{f['path']}\0" if f.get("old_path") else f"{f['added_lines']}\t{f['deleted_lines']}\t{f['path']}\0").encode()
        for f in summary["files"]
    )
    stream = listing + b"\0" + patch
    assert [changes._listing_end(stream[:k]) for k in range(len(listing) + 1)] == [None] * (len(listing) + 1)
    assert changes._listing_end(stream) == len(listing) + 1
    scanner = changes._ListingScanner()  # fed byte by byte, as chunks arrive
    assert [scanner.end(stream[:k]) for k in range(1, len(listing) + 2)] == [None] * len(listing) + [len(listing) + 1]
    assert changes._parse_listing(listing) == summary["files"]
    assert {f["path"] for f in summary["files"]} == {"edit.txt", "new\tname.txt"}


def test_the_base_record_survives_a_restart_and_a_crash_before_the_rename(tmp_path):
    workspace, repo, commit = cloned_workspace(tmp_path, {"a.txt": "a"})
    origin = {"url": (tmp_path / "origin").as_uri()}
    recorded = (workspace / changes.BASE_FILE).read_text()
    clone_repo(origin, workspace, dict(os.environ), allow_file=True)  # a resumed task: repo/ is there
    assert (workspace / changes.BASE_FILE).read_text() == recorded
    # Killed after recording, before repo/ appeared: the next start clones and records again.
    repo.rename(workspace / "repo.partial")
    (workspace / changes.BASE_FILE).write_text('{"commit": "stale"}')
    clone_repo(origin, workspace, dict(os.environ), allow_file=True)
    assert json.loads((workspace / changes.BASE_FILE).read_text())["commit"] == commit and repo.is_dir()


def test_a_tracked_file_that_gitignore_matches_still_counts(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, {".gitignore": "build/\n*.log\n", "app.py": "x\n"})
    # Committed although ignored (git add -f): tracked, so its change and its deletion count.
    (repo / "build").mkdir()
    (repo / "build" / "keep.txt").write_text("kept\n")
    (repo / "old.log").write_text("log\n")
    git(repo, "add", "--force", "build/keep.txt", "old.log")
    git(repo, "commit", "--quiet", "-m", "tracked though ignored")
    (workspace / changes.BASE_FILE).write_text(json.dumps({"commit": git(repo, "rev-parse", "HEAD").strip()}))
    (repo / "build" / "keep.txt").write_text("changed\n")
    (repo / "build" / "untracked.o").write_text("ignored and untracked\n")
    (repo / "new.log").write_text("ignored and untracked\n")

    summary, patch = compute(workspace, tmp_path)

    assert {f["path"]: f["status"] for f in summary["files"]} == {"build/keep.txt": "modified"}
    assert b"+changed" in patch and b"ignored and untracked" not in patch


def test_what_git_cannot_add_is_a_warning_not_a_failure(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE_FILES)
    (repo / "src").mkdir()
    git(repo / "src", "init", "--quiet")  # a nested repository without a commit: git add refuses it
    (repo / "src" / "a.py").write_text("a\n")
    (repo / "added.txt").write_text("added\n")

    summary, patch = compute(workspace, tmp_path)

    assert [f["path"] for f in summary["files"]] == ["added.txt"]
    assert summary["warnings"] == ["error: 'src/' does not have a commit checked out"]
    assert b"+added" in patch
