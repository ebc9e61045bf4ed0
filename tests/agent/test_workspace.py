"""Confinement: every path the tools take must resolve inside the workspace (agent.workspace)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.tools import ToolResult, WorkTools
from agent.workspace import PathRefused, Workspace
from tests.agent.conftest import assert_refused

pytestmark = pytest.mark.timeout(30)


# --- confinement -------------------------------------------------------------
@pytest.mark.parametrize("path", ["../outside/secret.txt", "a/../../outside/secret.txt", "./../outside/secret.txt"])
def test_dotdot_escapes_are_refused(tools: WorkTools, outside: Path, path: str) -> None:
    assert_refused(tools.call("read_file", {"path": path}))
    assert_refused(tools.call("write_file", {"path": path, "content": "x"}))
    assert (outside / "secret.txt").read_text() == "TOP-SECRET"
    assert_refused(tools.call("list_dir", {"path": "../outside"}))


def test_absolute_paths_outside_are_refused(tools: WorkTools, outside: Path) -> None:
    assert_refused(tools.call("read_file", {"path": str(outside / "secret.txt")}))
    assert_refused(tools.call("read_file", {"path": "/etc/passwd"}), secret="root:")
    assert_refused(tools.call("write_file", {"path": str(outside / "new.txt"), "content": "x"}))
    assert not (outside / "new.txt").exists()
    assert_refused(tools.call("list_dir", {"path": "/"}))


def test_absolute_path_inside_is_allowed(tools: WorkTools, ws: Path) -> None:
    target = ws / "sub" / "f.txt"
    assert tools.call("write_file", {"path": str(target), "content": "inside"}).ok
    assert target.read_text() == "inside"
    assert tools.call("read_file", {"path": str(target)}) == ToolResult(True, "inside")
    assert tools.call("list_dir", {"path": str(ws)}) == ToolResult(True, "sub/")


def test_symlinks_pointing_outside_are_refused(tools: WorkTools, ws: Path, outside: Path) -> None:
    (ws / "link_file").symlink_to(outside / "secret.txt")
    (ws / "link_dir").symlink_to(outside)
    (ws / "dangling").symlink_to(outside / "does-not-exist-yet")

    assert_refused(tools.call("read_file", {"path": "link_file"}))
    assert_refused(tools.call("read_file", {"path": "link_dir/secret.txt"}))
    assert_refused(tools.call("list_dir", {"path": "link_dir"}))

    # write through a final symlink, through a linked parent, and through a dangling link
    assert_refused(tools.call("write_file", {"path": "link_file", "content": "pwned"}))
    assert_refused(tools.call("write_file", {"path": "link_dir/new.txt", "content": "pwned"}))
    assert_refused(tools.call("write_file", {"path": "link_dir/deep/new.txt", "content": "pwned"}))
    assert_refused(tools.call("write_file", {"path": "dangling", "content": "pwned"}))
    assert (outside / "secret.txt").read_text() == "TOP-SECRET"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (ws / "link_file").is_symlink()


def test_symlinks_inside_are_allowed(tools: WorkTools, ws: Path) -> None:
    (ws / "real").mkdir()
    (ws / "real" / "a.txt").write_text("alpha")
    (ws / "alias").symlink_to(ws / "real")
    (ws / "a-link.txt").symlink_to("real/a.txt")

    assert tools.call("read_file", {"path": "alias/a.txt"}) == ToolResult(True, "alpha")
    assert tools.call("read_file", {"path": "a-link.txt"}) == ToolResult(True, "alpha")
    assert tools.call("list_dir", {"path": "alias"}) == ToolResult(True, "a.txt")

    # writing through an inside link updates the target and keeps the link
    assert tools.call("write_file", {"path": "a-link.txt", "content": "beta"}).ok
    assert (ws / "real" / "a.txt").read_text() == "beta"
    assert (ws / "a-link.txt").is_symlink()
    assert tools.call("write_file", {"path": "alias/new/b.txt", "content": "b"}).ok
    assert (ws / "real" / "new" / "b.txt").read_text() == "b"


def test_execute_runs_in_the_workspace_root(tools: WorkTools, ws: Path) -> None:
    result = tools.call("execute", {"command": "pwd -P"})
    assert result == ToolResult(True, f"exit code 0\n{ws.resolve()}\n")


def test_workspace_resolves_inside_and_refuses_outside(ws: Path) -> None:
    w = Workspace(ws)
    (ws / "d").mkdir()
    assert w.resolve("d/../d/f.txt") == ws.resolve() / "d" / "f.txt"
    assert w.resolve_for_write("d/new.txt") == ws.resolve() / "d" / "new.txt"
    assert w.display(ws.resolve() / "d" / "f.txt") == "d/f.txt" and w.display(ws.resolve()) == "."
    # "." is the root itself, whose parent is outside
    for path, needle in [("../x", "outside the workspace"), ("a\x00b", "NUL byte"), ("d/..", "does not name a file"), (".", "outside the workspace")]:
        with pytest.raises(PathRefused, match=needle):
            w.resolve_for_write(path)
    with pytest.raises(PathRefused, match="outside the workspace"):
        w.resolve("/etc/passwd")
    (ws / "loop").symlink_to(ws / "loop")
    with pytest.raises(PathRefused, match="cannot resolve"):
        w.resolve("loop/x")
