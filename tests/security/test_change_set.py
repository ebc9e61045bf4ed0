"""The change set is computed by the trusted side over a workspace the agent controlled: attacks on it.

Each attack is first shown to work against an ordinary `git` run in the workspace
(the marker appears), so the test proves the change set's git is what stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from agent import changes
from tests.agent.test_changes import cloned_workspace, git

BASE = {"src/app.py": "print('app')\n", "notes.txt": "one\ntwo\n"}


def compute(workspace: Path, tmp_path: Path, **kwargs) -> tuple[dict, bytes]:
    scratch = tempfile.mkdtemp(dir=tmp_path)  # a fresh one per computation, as the snapshotter's
    change_set = changes.compute(workspace, scratch, **kwargs)
    return change_set.summary, change_set.patch.read_bytes()


def plant_commands(repo: Path, marker: Path) -> None:
    """Every way a repository's own files can make git run a command: each touches `marker`."""
    script = repo.parent / "evil.sh"  # in the workspace, as an attacker would put it
    script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\ncat\n")
    script.chmod(0o755)
    hooks = repo / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for hook in ("post-index-change", "pre-commit", "post-checkout", "reference-transaction", "fsmonitor-watchman"):
        (hooks / hook).write_text(f"#!/bin/sh\necho hook {hook} >> {marker}\n")
        (hooks / hook).chmod(0o755)
    with open(repo / ".git" / "config", "a") as config:
        config.write(
            f"[core]\n\tfsmonitor = {script}\n\thooksPath = {hooks}\n\tpager = {script}\n"
            f"[diff]\n\texternal = {script}\n"
            f"[filter \"x\"]\n\tclean = {script}\n\tsmudge = {script}\n\tprocess = {script}\n\trequired = true\n"
            f"[diff \"x\"]\n\ttextconv = {script}\n\tcommand = {script}\n"
            f"[include]\n\tpath = {repo.parent / 'more.config'}\n"
        )
    (repo / ".gitattributes").write_text("* filter=x diff=x\n")


def test_the_repositorys_config_hooks_and_attributes_run_nothing(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE)
    marker = tmp_path / "MARKER"
    plant_commands(repo, marker)
    (repo / "src" / "app.py").write_text("print('changed')\n")
    (repo / "new.txt").write_text("new\n")

    # Control: plain git in the workspace runs them.
    subprocess.run(["git", "diff"], cwd=repo, capture_output=True, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    assert marker.exists(), "the planted commands should fire under an ordinary git"
    marker.unlink()

    summary, patch = compute(workspace, tmp_path)

    assert not marker.exists()
    assert summary["base"]["verified"] is True
    paths = {f["path"]: f["status"] for f in summary["files"]}
    assert paths["src/app.py"] == "modified" and paths["new.txt"] == "added" and paths[".gitattributes"] == "added"
    assert b"+print('changed')" in patch  # the content itself, not a filter's or textconv's output
    assert b"evil.sh" not in patch.split(b"+++ b/.gitattributes")[0]


def test_a_forged_base_falls_back_to_the_empty_tree(tmp_path):
    workspace, repo, commit = cloned_workspace(tmp_path, BASE)
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    blob = git(repo, "rev-parse", "HEAD:notes.txt").strip()
    for forged in (tree, blob, "0" * 40, "HEAD", "--output=/tmp/x", None):
        (workspace / changes.BASE_FILE).write_text(json.dumps({"repo": "https://example.org/r.git", "commit": forged}))
        summary, patch = compute(workspace, tmp_path)
        assert summary["base"]["verified"] is False and summary["base"]["against"] == "empty-tree", forged
        assert "against the empty tree" in summary["base"]["note"]
        assert {f["status"] for f in summary["files"]} == {"added"}
        assert {f["path"] for f in summary["files"]} == set(BASE)
    (workspace / changes.BASE_FILE).write_text("not json")
    assert compute(workspace, tmp_path)[0]["base"]["verified"] is False
    (workspace / changes.BASE_FILE).write_text(json.dumps({"commit": commit}))
    assert compute(workspace, tmp_path)[0]["base"]["verified"] is True


def test_objects_outside_the_workspace_are_never_lent_to_git(tmp_path):
    """Alternates of the workspace's object store, or an object directory that is a link out, are not used."""
    workspace, repo, commit = cloned_workspace(tmp_path, BASE)
    outside = tmp_path / "outside"
    git(tmp_path, "clone", "--quiet", "--bare", (tmp_path / "origin").as_uri(), str(outside))
    alternates = repo / ".git" / "objects" / "info" / "alternates"
    alternates.parent.mkdir(parents=True, exist_ok=True)
    alternates.write_text(f"{outside / 'objects'}\n")
    summary, _ = compute(workspace, tmp_path)
    assert summary["base"]["verified"] is False and "alternates" in summary["base"]["note"]

    alternates.unlink()
    objects = repo / ".git" / "objects"
    objects.rename(repo / ".git" / "objects-moved")
    objects.symlink_to(outside / "objects")
    summary, _ = compute(workspace, tmp_path)
    assert summary["base"]["verified"] is False and "object directory" in summary["base"]["note"]


def test_a_symlink_out_is_a_link_never_its_targets_content(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    (repo / "passwd").symlink_to("/etc/passwd")
    (repo / "secret").symlink_to(secret)
    (repo / "secret-dir").symlink_to(tmp_path)  # a directory link is not descended into

    summary, patch = compute(workspace, tmp_path)

    files = {f["path"]: f for f in summary["files"]}
    assert set(files) == {"passwd", "secret", "secret-dir"}
    assert all(f["mode"] == "120000" and f["status"] == "added" for f in files.values())
    assert b"+/etc/passwd" in patch and f"+{secret}".encode() in patch
    assert b"root:" not in patch and b"TOP-SECRET-CONTENT" not in patch


def test_a_huge_change_cuts_the_patch_and_keeps_the_listing(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE)
    (repo / "a-huge.txt").write_text("".join(f"line {i:07d}\n" for i in range(200_000)))  # ~2.6 MB
    (repo / "z-small.txt").write_text("after the huge one\n")
    (repo / "notes.txt").unlink()
    cap = 256 * 1024

    summary, patch = compute(workspace, tmp_path, cap=cap)

    assert summary["cut"] is True and summary["patch_bytes"] == cap
    assert patch.endswith(changes.CUT_NOTE.format(cap=cap).encode())
    assert len(patch) == cap + len(changes.CUT_NOTE.format(cap=cap))
    files = {f["path"]: f for f in summary["files"]}
    assert set(files) == {"a-huge.txt", "z-small.txt", "notes.txt"}
    assert files["a-huge.txt"]["added_lines"] == 200_000
    assert b"after the huge one" not in patch


def test_the_computation_is_bounded_in_time(tmp_path):
    workspace, repo, _ = cloned_workspace(tmp_path, BASE)
    (repo / "more.txt").write_text("x\n")
    try:
        compute(workspace, tmp_path, timeout=0)
    except changes.ChangeSetError as exc:
        assert "timed out" in str(exc)
    else:
        raise AssertionError("a zero time budget must fail")
