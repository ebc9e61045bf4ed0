"""The work tools against real files and real subprocesses."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from agent.procs import live_group_members
from agent.tools import ToolResult, WorkTools, _CappedOutput, strip_userinfo

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return workspace


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspace with a secret file in it."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("TOP-SECRET")
    return out


@pytest.fixture
def tools(ws: Path, home: Path) -> WorkTools:
    return WorkTools(ws, home, output_cap=4_000, default_timeout=10, max_timeout=20)


def assert_refused(result: ToolResult, *, secret: str = "TOP-SECRET") -> None:
    assert isinstance(result, ToolResult)
    assert result.ok is False
    assert "outside the workspace" in result.output
    assert secret not in result.output


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


# --- files -------------------------------------------------------------------
def test_write_then_read_round_trip(tools: WorkTools, ws: Path) -> None:
    content = "line one\nünïcödé ✓ 🚢\n\ttabs and trailing spaces   \n"
    result = tools.call("write_file", {"path": "deep/er/notes.md", "content": content})
    assert result.ok and "deep/er/notes.md" in result.output
    assert (ws / "deep" / "er" / "notes.md").read_bytes() == content.encode()
    assert tools.call("read_file", {"path": "deep/er/notes.md"}) == ToolResult(True, content)

    # overwrite is atomic and leaves no temp files behind; the mode of an existing file is kept
    (ws / "deep" / "er" / "notes.md").chmod(0o755)
    assert tools.call("write_file", {"path": "deep/er/notes.md", "content": "v2"}).ok
    assert tools.read_file("deep/er/notes.md") == "v2"
    assert os.stat(ws / "deep" / "er" / "notes.md").st_mode & 0o777 == 0o755
    assert sorted(os.listdir(ws / "deep" / "er")) == ["notes.md"]

    assert tools.call("write_file", {"path": "empty.txt", "content": ""}).ok
    assert tools.call("read_file", {"path": "empty.txt"}) == ToolResult(True, "")


def test_read_file_errors_are_tool_errors(ws: Path, home: Path) -> None:
    tools = WorkTools(ws, home, read_cap=1_000)
    (ws / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    (ws / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (ws / "big.txt").write_text("x" * 1_001)
    (ws / "dir").mkdir()
    os.mkfifo(ws / "pipe")

    missing = tools.call("read_file", {"path": "nope.txt"})
    assert missing.ok is False and "not found" in missing.output and "nope.txt" in missing.output
    binary = tools.call("read_file", {"path": "bin.dat"})
    assert binary.ok is False and "binary" in binary.output
    latin = tools.call("read_file", {"path": "latin1.txt"})
    assert latin.ok is False and "UTF-8" in latin.output
    big = tools.call("read_file", {"path": "big.txt"})
    assert big.ok is False and "1001 bytes" in big.output and "limit" in big.output
    assert "directory" in tools.call("read_file", {"path": "dir"}).output
    fifo = tools.call("read_file", {"path": "pipe"})  # must not block
    assert fifo.ok is False and "not a regular file" in fifo.output


def test_write_file_errors_are_tool_errors(tools: WorkTools, ws: Path) -> None:
    (ws / "dir").mkdir()
    (ws / "file").write_text("f")
    assert "directory" in tools.call("write_file", {"path": "dir", "content": "x"}).output
    blocked = tools.call("write_file", {"path": "file/child.txt", "content": "x"})
    assert blocked.ok is False and "file" in blocked.output
    assert tools.call("write_file", {"path": "", "content": "x"}).ok is False
    assert (ws / "file").read_text() == "f"


def test_list_dir_formatting(ws: Path, home: Path) -> None:
    tools = WorkTools(ws, home, list_cap=5)
    for name in ["b.txt", "a.txt", ".hidden", "C.md"]:
        (ws / name).write_text(name)
    (ws / "zdir").mkdir()
    (ws / "adir").mkdir()
    result = tools.call("list_dir", {"path": "."})
    assert result.ok
    assert result.output.splitlines() == [".hidden", "C.md", "a.txt", "adir/", "b.txt", "... and 1 more entries (use execute with ls or find)"]
    assert tools.call("list_dir", {}) == result  # path defaults to the root
    assert tools.list_dir() == result.output
    assert tools.call("list_dir", {"path": "zdir"}) == ToolResult(True, "(empty directory: zdir)")
    not_dir = tools.call("list_dir", {"path": "a.txt"})
    assert not_dir.ok is False and "not a directory" in not_dir.output
    missing = tools.call("list_dir", {"path": "nope"})
    assert missing.ok is False and "not found" in missing.output


# --- execute -----------------------------------------------------------------
def test_nonzero_exit_is_an_error_with_code_and_output(tools: WorkTools) -> None:
    result = tools.call("execute", {"command": "echo out; echo err >&2; exit 3"})
    assert result.ok is False
    assert result.output.startswith("exit code 3\n")
    assert "out\n" in result.output and "err\n" in result.output
    assert tools.execute("true") == "exit code 0\n"


def test_huge_output_is_capped_keeping_head_and_tail(ws: Path, home: Path) -> None:
    tools = WorkTools(ws, home, output_cap=10_000)
    started = time.monotonic()
    result = tools.call(
        "execute", {"command": "printf 'HEAD-MARK\\n'; yes | head -c 50000000; printf 'TAIL-MARK\\n'", "timeout_seconds": 20}
    )
    assert time.monotonic() - started < 15
    assert result.ok, result.output[:200]
    out = result.output
    assert out.startswith("exit code 0\nHEAD-MARK\ny\n")
    assert out.endswith("y\nTAIL-MARK\n")
    elided = int(re.search(r"\n\.\.\. \[(\d+) bytes elided\] \.\.\.\n", out).group(1))
    assert elided == 10 + 50_000_000 + 10 - 10_000
    assert len(out) < 10_000 + 100


def test_capped_buffer_holds_only_the_cap() -> None:
    buf = _CappedOutput(100)
    for i in range(10_000):
        buf.add(f"{i:05d}\n".encode())
        assert buf.stored <= 100
    text = buf.text()
    assert text.startswith("00000\n00001\n")
    assert text.endswith("09999\n")
    assert f"[{10_000 * 6 - 100} bytes elided]" in text
    small = _CappedOutput(100)
    small.add(b"short")
    assert small.text() == "short"


def test_endless_output_is_still_killed_on_timeout(tools: WorkTools) -> None:
    started = time.monotonic()
    result = tools.call("execute", {"command": "yes", "timeout_seconds": 1})
    assert time.monotonic() - started < 5
    assert result.ok is False
    assert result.output.startswith("timed out after 1 s")
    assert "bytes elided" in result.output and len(result.output) < 4_000 + 300


def test_timeout_kills_the_whole_group_even_if_sigterm_is_ignored(tools: WorkTools) -> None:
    command = "echo pgid=$$; (trap '' TERM; sleep 60) & echo child=$!; trap '' TERM; sleep 60"
    started = time.monotonic()
    result = tools.call("execute", {"command": command, "timeout_seconds": 1})
    elapsed = time.monotonic() - started
    assert result.ok is False
    assert result.output.startswith("timed out after 1 s")
    assert elapsed < 1 + 4, elapsed
    pgid = int(re.search(r"pgid=(\d+)", result.output).group(1))
    child = int(re.search(r"child=(\d+)", result.output).group(1))
    assert pgid != os.getpgrp()
    deadline = time.monotonic() + 2
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_group_members(pgid) == []
    assert child not in live_group_members(pgid)


def test_timeout_is_clamped(ws: Path, home: Path) -> None:
    tools = WorkTools(ws, home, max_timeout=1)
    started = time.monotonic()
    result = tools.call("execute", {"command": "sleep 30", "timeout_seconds": 9999})
    assert result.output.startswith("timed out after 1 s")
    assert time.monotonic() - started < 4
    assert tools.call("execute", {"command": "echo ok", "timeout_seconds": -5}) == ToolResult(True, "exit code 0\nok\n")


def test_background_children_holding_output_are_stopped(tools: WorkTools) -> None:
    started = time.monotonic()
    result = tools.call("execute", {"command": "echo pgid=$$; sleep 30 & echo started"})
    assert time.monotonic() - started < 5
    assert result.ok
    assert "background processes" in result.output and "started" in result.output
    pgid = int(re.search(r"pgid=(\d+)", result.output).group(1))
    deadline = time.monotonic() + 2
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_group_members(pgid) == []


def test_environment_is_scrubbed(tools: WorkTools, home: Path, ws: Path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKYARD_MODEL_KEY", "sk-fake-dockyard-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-aws-secret-value")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-openai")
    result = tools.call("execute", {"command": "env; echo stdin=$(cat)"})
    assert result.ok, result.output
    out = result.output
    for leaked in ("sk-fake-dockyard-secret", "fake-aws-secret-value", "sk-fake-openai", "DOCKYARD_", "AWS_", "OPENAI"):
        assert leaked not in out
    env = dict(line.split("=", 1) for line in out.splitlines()[1:] if "=" in line and not line.startswith("stdin="))
    assert env["HOME"] == str(home)
    assert env["PYTHONUSERBASE"] == str(home / ".local")
    assert env["PATH"].split(":")[0] == str(home / ".local" / "bin")
    assert "/usr/bin" in env["PATH"].split(":")
    assert env["LANG"] == "C.UTF-8"
    assert env["TMPDIR"] == str(home / "tmp") and (home / "tmp").is_dir()
    assert "stdin=\n" in out  # stdin is /dev/null, so cat returns at once
    # everything the child sees is on a short known list (plus what the shell and env add themselves)
    allowed = {"PATH", "HOME", "PYTHONUSERBASE", "LANG", "TMPDIR", "TERM", "PAGER", "GIT_PAGER",
               "GIT_TERMINAL_PROMPT", "PIP_DISABLE_PIP_VERSION_CHECK", "PWD", "SHLVL", "_", "OLDPWD"}
    assert set(env) <= allowed, set(env) - allowed


def test_proxy_settings_without_credentials(ws: Path, home: Path) -> None:
    proxy_env = {
        "HTTP_PROXY": "http://agent:hunter2@egress.dockyard.svc:3128",
        "https_proxy": "http://user%40corp:p%3Ass@egress.dockyard.svc:3128/",
        "NO_PROXY": "nats.dockyard.svc,minio.dockyard.svc,.cluster.local",
        "AWS_SECRET_ACCESS_KEY": "not-a-proxy-setting",
    }
    tools = WorkTools(ws, home, proxy_env=proxy_env)
    out = tools.call("execute", {"command": "env"}).output
    assert "hunter2" not in out and "agent:" not in out and "p%3Ass" not in out
    assert "not-a-proxy-setting" not in out
    assert "HTTP_PROXY=http://egress.dockyard.svc:3128\n" in out
    assert "http_proxy=http://egress.dockyard.svc:3128\n" in out
    assert "HTTPS_PROXY=http://egress.dockyard.svc:3128/\n" in out
    assert "https_proxy=http://egress.dockyard.svc:3128/\n" in out
    assert "NO_PROXY=nats.dockyard.svc,minio.dockyard.svc,.cluster.local\n" in out
    assert "no_proxy=nats.dockyard.svc,minio.dockyard.svc,.cluster.local\n" in out


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://u:p@proxy:3128", "http://proxy:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("u:p@proxy:3128", "proxy:3128"),
        ("http://a@b:c@proxy:3128/path?q=x@y", "http://proxy:3128/path?q=x@y"),
    ],
)
def test_strip_userinfo(url: str, expected: str) -> None:
    assert strip_userinfo(url) == expected


# --- dispatch and argument validation ----------------------------------------
@pytest.mark.parametrize(
    ("name", "args", "needle"),
    [
        ("rm_rf", {}, "unknown tool 'rm_rf'"),
        ("read_file", {}, "missing required argument(s) 'path'"),
        ("read_file", {"path": 42}, "argument 'path' must be a string, got integer"),
        ("read_file", {"path": None}, "argument 'path' must be a string, got null"),
        ("write_file", {"path": "a.txt"}, "missing required argument(s) 'content'"),
        ("write_file", {"path": "a.txt", "content": ["x"]}, "argument 'content' must be a string, got array"),
        ("execute", {"command": "true", "timeout_seconds": "10"}, "argument 'timeout_seconds' must be an integer, got string"),
        ("execute", {"command": "true", "timeout_seconds": True}, "argument 'timeout_seconds'"),
        ("execute", {"cmd": "ls"}, "unexpected argument(s) 'cmd'"),
        ("execute", {"command": ""}, "argument 'command' must not be empty"),
        ("execute", "ls", "arguments must be a JSON object"),
        ("read_file", {"path": "a\x00b"}, "NUL"),
    ],
)
def test_bad_calls_are_tool_errors(tools: WorkTools, name, args, needle: str) -> None:
    result = tools.call(name, args)
    assert result.ok is False
    assert needle in result.output


def test_call_never_raises_even_on_unexpected_failures(tools: WorkTools, ws: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    (ws / "f.txt").write_text("f")
    monkeypatch.setattr("agent.tools._cap_text", boom)
    result = tools.call("list_dir", {"path": "."})
    assert result == ToolResult(False, "list_dir failed: RuntimeError: disk on fire")

    (ws / "f.txt").unlink()
    ws.rmdir()
    gone = tools.call("execute", {"command": "true"})
    assert gone.ok is False and "does not exist" in gone.output


def test_schemas_describe_the_four_tools(tools: WorkTools) -> None:
    schemas = tools.schemas()
    json.dumps(schemas)
    by_name = {s["function"]["name"]: s for s in schemas}
    assert set(by_name) == {"execute", "read_file", "write_file", "list_dir"}
    for schema in schemas:
        assert schema["type"] == "function"
        fn = schema["function"]
        assert fn["description"]
        assert fn["parameters"]["type"] == "object"
        assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
    assert by_name["execute"]["function"]["parameters"]["required"] == ["command"]
    assert by_name["execute"]["function"]["parameters"]["properties"]["timeout_seconds"]["type"] == "integer"
    assert by_name["write_file"]["function"]["parameters"]["required"] == ["path", "content"]
    assert by_name["list_dir"]["function"]["parameters"]["required"] == []


def test_schemas_bind_to_langchain_tools(tools: WorkTools) -> None:
    convert = pytest.importorskip("langchain_core.utils.function_calling").convert_to_openai_tool
    for schema in tools.schemas():
        assert convert(schema) == schema
