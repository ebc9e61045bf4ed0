"""Each tool call's full output (issue 12, item 3): kept in `.dockyard/outputs/<call-id>.log` while it is
read, its true size, head and tail in the `tool` event, a per-task bound that drops the oldest files,
and files that outlive a restart of the agent. Real processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from agent import contract
from agent.outputs import OutputStore
from agent.tools import WorkTools
from tests.agent.test_run import agent_cmd, scripted, trace_events
from tests.conftest import eventually

# 7,000 numbered lines of 93 bytes: 651,000 bytes, far over the model's 16,000-byte view.
BIG = "import sys\nfor i in range(7000): sys.stdout.write(f'line {i:06d} ' + 'x' * 80 + '\\n')"
BIG_COMMAND = f"python3 -c \"{BIG}\"; echo 'the last line: 3 tests failed' >&2"


def big_output() -> bytes:
    lines = "".join(f"line {i:06d} " + "x" * 80 + "\n" for i in range(7000))
    return (lines + "the last line: 3 tests failed\n").encode()


def sized(n: int, mark: str) -> str:
    """A command printing exactly `n` bytes that start with `mark`."""
    return f"printf '%s' {mark}; head -c {n - len(mark)} /dev/zero | tr '\\0' 'y'"


def tool_ends(stdout: str) -> list[dict]:
    return [e for e in trace_events(stdout) if e["type"] == contract.EV_TOOL and e.get("stage") == "end"]


def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"prompt": "run the build"}))
    return path


def test_a_600_kb_output_has_its_true_size_head_and_tail_in_the_event_and_all_of_it_in_the_file(tmp_path, agent_env):
    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["build"], "objective": "build"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": BIG_COMMAND}}]},
        {"content": "built"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]},
    ]
    workspace = tmp_path / "ws"
    proc = subprocess.run(agent_cmd("big", workspace, task_file(tmp_path), scripted(tmp_path / "big.yaml", turns)),
                          env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (end,) = tool_ends(proc.stdout)
    expected = big_output()
    assert end["output_bytes"] == len(expected) == 651_030
    assert end["output_head"] == expected.decode()[:2000]
    assert end["output_tail"] == expected.decode()[-4000:]
    assert end["output_tail"].endswith("the last line: 3 tests failed\n")
    assert end["output_file"] == contract.output_file(end["call_id"]) == ".dockyard/outputs/call_1_0.log"
    assert (workspace / end["output_file"]).read_bytes() == expected
    assert "output_file_cut" not in end
    # What the model saw stays capped; the event's `result` is still its head.
    assert len(end["result"]) < 2100 and end["result"].startswith("exit code 0\nline 000000 ")


def test_a_short_output_is_all_in_the_head_and_the_tail_is_empty(tmp_path):
    tools = WorkTools(tmp_path / "ws", tmp_path / "home", outputs=OutputStore(tmp_path / "ws"))
    (tmp_path / "ws").mkdir()
    result = tools.call("execute", {"command": "echo hello"}, call_id="c1")
    assert (result.output_bytes, result.output_head, result.output_tail) == (6, "hello\n", "")
    assert (tmp_path / "ws" / result.output_file).read_bytes() == b"hello\n"
    listed = tools.call("list_dir", {"path": "."}, call_id="c2")  # the file tools' answers are kept too
    assert (tmp_path / "ws" / listed.output_file).read_text() == listed.output == ".dockyard/"


def test_the_bound_drops_the_oldest_outputs_first(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    store = OutputStore(workspace, max_bytes=250_000)
    tools = WorkTools(workspace, tmp_path / "home", outputs=store)
    for call_id in ("a", "b", "c"):
        result = tools.call("execute", {"command": sized(100_000, call_id * 8)}, call_id=call_id)
        assert result.output_bytes == 100_000 and not result.output_cut
    assert store.files() == ["b.log", "c.log"]
    assert sorted(os.listdir(workspace / contract.OUTPUTS_DIR)) == ["b.log", "c.log"]
    assert store.total == 200_000 <= store.max_bytes
    assert (workspace / contract.output_file("c")).read_bytes().startswith(b"cccccccc" + b"y" * 100)


def test_one_output_over_the_whole_bound_keeps_its_first_bytes_and_says_it_was_cut(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    tools = WorkTools(workspace, tmp_path / "home", outputs=OutputStore(workspace, max_bytes=50_000))
    tools.call("execute", {"command": "echo small"}, call_id="first")
    result = tools.call("execute", {"command": BIG_COMMAND}, call_id="huge")
    assert result.output_bytes == len(big_output()) and result.output_cut
    kept = (workspace / result.output_file).read_bytes()
    assert kept[:50_000] == big_output()[:50_000]
    assert kept[50_000:].decode() == (f"\n[dockyard: output cut here: 50000 of {len(big_output())} bytes kept; "
                                      "a task keeps at most 50000 bytes of outputs (DOCKYARD_OUTPUTS_MAX_BYTES)]\n")
    assert not (workspace / contract.output_file("first")).exists()  # dropped to make room
    assert result.output_tail.endswith("the last line: 3 tests failed\n")  # the event's tail is true all the same


def test_a_new_store_over_the_same_workspace_counts_what_an_earlier_run_kept(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    first = WorkTools(workspace, tmp_path / "home", outputs=OutputStore(workspace, max_bytes=250_000))
    for call_id in ("a", "b"):
        first.call("execute", {"command": sized(100_000, call_id)}, call_id=call_id)
    again = OutputStore(workspace, max_bytes=250_000)  # the agent started again over its PVC
    assert again.files() == ["a.log", "b.log"] and again.total == 200_000
    WorkTools(workspace, tmp_path / "home", outputs=again).call("execute", {"command": sized(100_000, "c")}, call_id="c")
    assert again.files() == ["b.log", "c.log"]


def test_call_ids_are_made_file_safe():
    assert contract.output_file("call_abc-1.2") == ".dockyard/outputs/call_abc-1.2.log"
    assert contract.output_file("../../etc/passwd") == ".dockyard/outputs/_._.._etc_passwd.log"
    assert contract.output_file("a/b c\n") == ".dockyard/outputs/a_b_c_.log"
    assert contract.output_file("..") == ".dockyard/outputs/_..log"
    assert len(contract.output_file("x" * 500)) == len(".dockyard/outputs/") + 128 + len(".log")


def test_a_secret_at_the_end_of_an_output_is_redacted_in_the_event_tail(tmp_path, agent_env):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api-key").write_text("sk-test-0123456789abcdefghij")
    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["t"], "objective": "t"}}]},
        # The secret file is not in the workspace; the command prints the value itself at the very end.
        {"tool_calls": [{"name": "execute", "args": {"command": f"{BIG_COMMAND}; echo sk-test-0123456789abcdefghij"}}]},
        {"content": "ok"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]},
    ]
    proc = subprocess.run(agent_cmd("secret", tmp_path / "ws", task_file(tmp_path), scripted(tmp_path / "s.yaml", turns)),
                          env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (end,) = tool_ends(proc.stdout)
    assert "sk-test-0123456789abcdefghij" not in json.dumps(end)
    assert end["output_tail"].rstrip().endswith("[REDACTED]")


def test_outputs_survive_a_killed_agent_and_the_call_run_again_replaces_its_own(tmp_path, agent_env):
    gate = tmp_path / "gate"
    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["t"], "objective": "t"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": BIG_COMMAND}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": f"echo waiting; until [ -e {gate} ]; do sleep 0.02; done; echo through"}}]},
        {"content": "ok"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]},
    ]
    workspace = tmp_path / "ws"
    cmd = agent_cmd("restart", workspace, task_file(tmp_path), scripted(tmp_path / "r.yaml", turns))
    first = subprocess.Popen(cmd, env=agent_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    waiting = workspace / contract.output_file("call_2_0")
    try:
        eventually(lambda: waiting.exists() and waiting.read_bytes() == b"waiting\n", "the second call to wait at its gate", 60)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    gate.touch()
    again = subprocess.run(cmd, env=agent_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (workspace / contract.output_file("call_1_0")).read_bytes() == big_output()  # from the first run
    assert waiting.read_bytes() == b"waiting\nthrough\n"  # the call run again wrote its own, whole
    (end,) = tool_ends(again.stdout)
    assert end["call_id"] == "call_2_0" and end["output_file"] == contract.output_file("call_2_0")


def test_kept_outputs_are_not_part_of_the_change_set(tmp_path):
    from agent import changes

    workspace = tmp_path / "ws"
    workspace.mkdir()
    tools = WorkTools(workspace, tmp_path / "home", outputs=OutputStore(workspace))
    tools.call("execute", {"command": "echo made > made.txt; echo built"}, call_id="c1")
    assert (workspace / contract.output_file("c1")).read_bytes() == b"built\n"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    summary = changes.compute(workspace, scratch).summary
    assert [f["path"] for f in summary["files"]] == ["made.txt"]
