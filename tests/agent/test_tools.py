"""The work tools against real files: reading, writing, listing, argument checks, schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.tools import ToolResult, WorkTools

pytestmark = pytest.mark.timeout(30)


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
    monkeypatch.setattr("agent.tools.cap_text", boom)
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
