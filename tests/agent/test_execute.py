"""Running commands (agent.execute) through the execute tool: exit codes, capped output,
timeouts that kill the whole process group, and a scrubbed environment."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent.execute import CappedOutput, strip_userinfo
from agent.procs import live_group_members
from agent.tools import ToolResult, WorkTools
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(30)


def test_nonzero_exit_is_an_error_with_code_and_output(tools: WorkTools) -> None:
    result = tools.call("execute", {"command": "echo out; echo err >&2; exit 3"})
    assert result.ok is False
    assert result.output.startswith("exit code 3\n")
    assert "out\n" in result.output and "err\n" in result.output
    assert tools.execute("true") == "exit code 0\n"


def test_huge_output_is_capped_keeping_head_and_tail(ws: Path, home: Path) -> None:
    tools = WorkTools(ws, home, output_cap=10_000)
    result = tools.call(
        "execute", {"command": "printf 'HEAD-MARK\\n'; yes | head -c 50000000; printf 'TAIL-MARK\\n'", "timeout_seconds": 20}
    )
    assert result.ok, result.output[:200]
    out = result.output
    assert out.startswith("exit code 0\nHEAD-MARK\ny\n")
    assert out.endswith("y\nTAIL-MARK\n")
    elided = int(re.search(r"\n\.\.\. \[(\d+) bytes elided\] \.\.\.\n", out).group(1))
    assert elided == 10 + 50_000_000 + 10 - 10_000
    assert len(out) < 10_000 + 100


def test_capped_buffer_holds_only_the_cap() -> None:
    buf = CappedOutput(100)
    for i in range(10_000):
        buf.add(f"{i:05d}\n".encode())
        assert buf.stored <= 100
    text = buf.text()
    assert text.startswith("00000\n00001\n")
    assert text.endswith("09999\n")
    assert f"[{10_000 * 6 - 100} bytes elided]" in text
    small = CappedOutput(100)
    small.add(b"short")
    assert small.text() == "short"


def test_endless_output_is_still_killed_on_timeout(tools: WorkTools) -> None:
    result = tools.call("execute", {"command": "yes", "timeout_seconds": 1})
    assert result.ok is False
    assert result.output.startswith("timed out after 1 s")
    assert "bytes elided" in result.output and len(result.output) < 4_000 + 300


def test_timeout_kills_the_whole_group_even_if_sigterm_is_ignored(tools: WorkTools) -> None:
    command = "echo pgid=$$; (trap '' TERM; sleep 60) & echo child=$!; trap '' TERM; sleep 60"
    result = tools.call("execute", {"command": command, "timeout_seconds": 1})  # returns long before the sleeps end
    assert result.ok is False
    assert result.output.startswith("timed out after 1 s")
    pgid = int(re.search(r"pgid=(\d+)", result.output).group(1))
    child = int(re.search(r"child=(\d+)", result.output).group(1))
    assert pgid != os.getpgrp() and child != pgid
    eventually(lambda: live_group_members(pgid) == [], "the group, the child that ignores SIGTERM included, to be gone")


def test_timeout_is_clamped(ws: Path, home: Path) -> None:
    tools = WorkTools(ws, home, max_timeout=1)
    result = tools.call("execute", {"command": "sleep 30", "timeout_seconds": 9999})
    assert result.output.startswith("timed out after 1 s")
    assert tools.call("execute", {"command": "echo ok", "timeout_seconds": -5}) == ToolResult(True, "exit code 0\nok\n")


def test_background_children_holding_output_are_stopped(tools: WorkTools) -> None:
    result = tools.call("execute", {"command": "echo pgid=$$; sleep 30 & echo started"})
    assert result.ok
    assert "background processes" in result.output and "started" in result.output
    pgid = int(re.search(r"pgid=(\d+)", result.output).group(1))
    eventually(lambda: live_group_members(pgid) == [], "the background child to be stopped")


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
