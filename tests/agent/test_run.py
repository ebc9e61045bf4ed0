"""`python -m agent run` as a real process: resume after SIGKILL, signals, commands, exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
import yaml

from agent import contract
from agent.procs import live_group_members, signal_group
from tests.conftest import eventually, eventually_async

EXAMPLE_TASK = Path(__file__).resolve().parents[2] / "agent" / "examples" / "example_task.json"

# The second of three counted calls writes its shell's pid (the leader of its process group)
# to `../two.pid`, next to the workspace, then waits; the test sees it is mid-call from that file.
SECOND_CALL = "echo $$ > ../two.pid; {wait}; echo two >> calls.log"
UNTIL_GATE = "until [ -e ../gate ]; do sleep 0.01; done"  # until the test creates `../gate`
ONE_SECOND = "sleep 1"  # time for a wrong SIGTERM handler to cut the call; a right one waits it out


def counting_turns(second_call_waits: str) -> list[dict]:
    return [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["count"], "objective": "count to three"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": "echo one >> calls.log"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": SECOND_CALL.format(wait=second_call_waits)}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": "echo three >> calls.log"}}]},
        {"content": "counted to three"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "counted"}}]},
    ]


def scripted(path: Path, turns: list[dict]) -> str:
    path.write_text(yaml.safe_dump(turns))
    return f"scripted:{path}"


def agent_cmd(task_id: str, workspace: Path, task_file: Path, model: str, *extra: str) -> list[str]:
    """The agent's command line; a model `scripted:<path>` runs as `scripted:<name>` with
    `--scripts-dir <its folder>` (the agent takes bare names only)."""
    if model.startswith("scripted:/"):
        script = Path(model.removeprefix("scripted:"))
        model, extra = f"scripted:{script.name}", ("--scripts-dir", str(script.parent), *extra)
    return [
        sys.executable, "-m", "agent", "run", "--task-id", task_id, "--workspace", str(workspace),
        "--task-file", str(task_file), "--model", model, "--home", str(workspace.parent / "home"),
        "--secrets-dir", str(workspace.parent / "secrets"), *extra,
    ]


def workspace_files(workspace: Path) -> dict[str, bytes]:
    skip = (contract.CHECKPOINT_DIR, ".dockyard")
    return {
        str(p.relative_to(workspace)): p.read_bytes()
        for p in sorted(workspace.rglob("*"))
        if p.is_file() and not str(p.relative_to(workspace)).startswith(skip) and "__pycache__" not in str(p)
    }


def trace_events(stdout: str) -> list[dict]:
    """Events the agent printed (without NATS the trace goes to stdout as JSON lines)."""
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [r for r in records if "type" in r]


def second_call_pid(workspace: Path) -> int | None:
    """The pid of the running second call's shell, once it has written it whole."""
    path = workspace.parent / "two.pid"
    text = path.read_text() if path.exists() else ""
    return int(text) if text.endswith("\n") else None


@pytest.fixture
def gated_script(tmp_path):
    yield scripted(tmp_path / "gated.yaml", counting_turns(UNTIL_GATE))
    for pid_file in tmp_path.rglob("two.pid"):  # a failed test must not leave a call waiting for its gate
        pid = int(pid_file.read_text() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline")
        if pid and cmdline.exists() and b"../gate" in cmdline.read_bytes():
            signal_group(pid, signal.SIGKILL)


def test_example_task_runs_without_nats_and_prints_its_trace(tmp_path, agent_env):
    workspace = tmp_path / "ws"
    proc = subprocess.run(agent_cmd("example", workspace, EXAMPLE_TASK, "scripted:example"), env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((workspace / contract.RESULT_FILE).read_text())
    assert result["outcome"] == contract.OUTCOME_DONE
    events = trace_events(proc.stdout)
    kinds = [(e["type"], e.get("phase") or e.get("state")) for e in events if e["type"] in ("phase", "status")]
    assert kinds[0] == ("status", "started")
    assert ("phase", "TACTICAL") in kinds and kinds[-1] == ("status", "finished")
    assert (workspace / "test_fizzbuzz.py").exists()

    # A finished task started again does no work and exits with the same code.
    again = subprocess.run(agent_cmd("example", workspace, EXAMPLE_TASK, "scripted:example"), env=agent_env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already ended" in again.stderr


def test_sigkill_mid_tool_call_resumes_without_repeating_completed_calls(tmp_path, agent_env, gated_script):
    # The reference: one uninterrupted run (its gate open from the start), alongside the killed one.
    reference = tmp_path / "ref" / "ws"
    reference.parent.mkdir()
    (reference.parent / "gate").touch()
    uninterrupted = subprocess.Popen(agent_cmd("slow", reference, EXAMPLE_TASK, gated_script), env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    workspace = tmp_path / "killed" / "ws"
    calls = workspace / "calls.log"
    first = subprocess.Popen(agent_cmd("slow", workspace, EXAMPLE_TASK, gated_script), env=agent_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    call = eventually(lambda: second_call_pid(workspace), "the second call to start")
    assert calls.read_text() == "one\n"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # The killed call must not finish behind our back: its processes die with the agent.
    eventually(lambda: not live_group_members(call), "the second call's processes to die with the agent")
    (workspace.parent / "gate").touch()
    assert calls.read_text() == "one\n"

    second = subprocess.run(agent_cmd("slow", workspace, EXAMPLE_TASK, gated_script), env=agent_env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert calls.read_text() == "one\ntwo\nthree\n"
    _, reference_err = uninterrupted.communicate(timeout=120)
    assert uninterrupted.returncode == 0, reference_err
    assert workspace_files(workspace) == workspace_files(reference)
    events = trace_events(second.stdout)
    assert events[0]["type"] == "status" and events[0]["state"] == contract.STATE_RESUMED
    executed = [e["args"]["command"] for e in events if e["type"] == "tool" and e["stage"] == "start"]
    assert executed == [SECOND_CALL.format(wait=UNTIL_GATE), "echo three >> calls.log"]
    with sqlite3.connect(workspace / contract.checkpoint_path("slow")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigterm_stops_after_the_current_step_and_resumes(tmp_path, agent_env):
    script = scripted(tmp_path / "timed.yaml", counting_turns(ONE_SECOND))
    workspace = tmp_path / "run" / "ws"
    calls = workspace / "calls.log"
    proc = subprocess.Popen(agent_cmd("term", workspace, EXAMPLE_TASK, script), env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    eventually(lambda: second_call_pid(workspace), "the second call to start")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == contract.EXIT_INTERRUPTED, err
    assert calls.read_text() == "one\ntwo\n"  # the running step was finished, not cut
    assert not (workspace / contract.RESULT_FILE).exists()

    again = subprocess.run(agent_cmd("term", workspace, EXAMPLE_TASK, script), env=agent_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert calls.read_text() == "one\ntwo\nthree\n"


def test_bad_configuration_exits_with_the_fatal_code(tmp_path, agent_env):
    bad_task = tmp_path / "task.json"
    bad_task.write_text('{"no_prompt": true}')
    cases = [  # (task id, task file, model, what stderr names); three independent processes at once
        ("bad", bad_task, "scripted:example", "prompt"),
        ("bad2", EXAMPLE_TASK, "nosuch:model", "not supported"),
        ("Bad_Id", EXAMPLE_TASK, "scripted:example", "--task-id"),
    ]
    runs = [
        (subprocess.Popen(agent_cmd(task_id, tmp_path / task_id / "ws", task, model), env=agent_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), named)
        for task_id, task, model, named in cases
    ]
    for proc, named in runs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == contract.EXIT_FATAL, err
        assert named in err


def test_heartbeat_file_is_fresh_while_running(tmp_path, agent_env, gated_script):
    workspace = tmp_path / "ws"
    proc = subprocess.Popen(agent_cmd("hb", workspace, EXAMPLE_TASK, gated_script), env=agent_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        heartbeat = workspace / contract.HEARTBEAT_FILE
        eventually(heartbeat.exists, "the heartbeat file")
        assert time.time() - heartbeat.stat().st_mtime < 10
    finally:
        proc.kill()
        proc.wait()


def test_repo_is_cloned_before_the_first_phase(tmp_path, agent_env):
    origin = tmp_path / "origin"
    origin.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(origin)]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    (origin / "README.md").write_text("hello\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"prompt": "read the readme", "repo": {"url": f"file://{origin}"}}))
    script = tmp_path / "t.yaml"
    script.write_text(yaml.safe_dump([
        {"tool_calls": [{"name": "plan", "args": {"todos": ["read"], "objective": "read"}}]},
        {"tool_calls": [{"name": "read_file", "args": {"path": "repo/README.md"}}]},
        {"content": "it says hello"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "read it"}}]},
    ]))
    workspace = tmp_path / "ws"
    proc = subprocess.run(agent_cmd("clone", workspace, task, f"scripted:{script}", "--allow-file-repos"), env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (workspace / "repo" / "README.md").read_text() == "hello\n"
    tool_end = [e for e in trace_events(proc.stdout) if e["type"] == "tool" and e["stage"] == "end"]
    assert tool_end and "hello" in tool_end[0]["result"]


async def _request(nc, task_id: str, body: dict) -> dict:
    reply = await nc.request(contract.subject_cmd(task_id), json.dumps(body).encode(), timeout=5)
    return json.loads(reply.data)


async def _stream_events(nc, task_id: str) -> list[dict]:
    """Every event of the task in the stream, up to the last one stored."""
    js = nc.jetstream()
    last = (await js.get_last_msg(contract.STREAM_NAME, contract.subject_events(task_id))).seq
    sub = await js.subscribe(contract.subject_events(task_id), ordered_consumer=True)
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            found.append(json.loads(msg.data))
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return found


async def test_commands_over_nats_status_message_cancel(tmp_path, agent_env, nats_server):
    turns = [{"tool_calls": [{"name": "plan", "args": {"todos": ["wait"], "objective": "wait"}}]}]
    turns += [{"tool_calls": [{"name": "execute", "args": {"command": "echo ran >> ran.log; sleep 0.5"}}]}] * 40
    script = tmp_path / "long.yaml"
    script.write_text(yaml.safe_dump(turns))
    workspace = tmp_path / "ws"
    proc = subprocess.Popen(
        agent_cmd("cmds", workspace, EXAMPLE_TASK, f"scripted:{script}", "--nats", nats_server.url,
                  "--nats-creds", nats_server.launch_creds("cmds")),
        env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    nc = await nats_server.connect()

    async def running_tools() -> dict | None:
        if not (workspace / "ran.log").exists():
            return None  # no tool call yet: the commands below must find the agent at work
        try:
            status = await _request(nc, "cmds", {"op": "status"})
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None  # not listening yet
        return status if status.get("phase") == "TACTICAL" else None

    try:
        status = await eventually_async(running_tools, "the agent to run tools and answer status in its TACTICAL phase")
        assert status["ok"] and status["todos"] == ["wait"]
        assert (await _request(nc, "cmds", {"op": "message", "text": "hurry up"}))["ok"]
        assert (workspace / ".dockyard" / "inbox.jsonl").read_text().count("hurry up") == 1
        bad = await _request(nc, "cmds", {"op": "dance"})
        assert not bad["ok"] and "unknown op" in bad["error"]
        assert (await _request(nc, "cmds", {"op": "cancel"}))["ok"]
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        assert code == contract.EXIT_CANCELLED
        assert json.loads((workspace / contract.RESULT_FILE).read_text())["outcome"] == contract.OUTCOME_CANCELLED

        events = await _stream_events(nc, "cmds")
        kinds = [e["type"] for e in events]
        assert kinds[0] == "status" and events[0]["state"] == "started"
        assert "message" in kinds and "tool" in kinds
        assert events[-1]["type"] == "status" and events[-1]["outcome"] == contract.OUTCOME_CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        await nc.close()


def test_the_agent_refuses_a_file_repository_unless_allowed(tmp_path, agent_env):
    """A task that reached the agent without the functions' check still cannot clone a local path."""
    from agent.run import FatalError, clone_repo

    with pytest.raises(FatalError, match="allow-file-repos"):
        clone_repo({"url": (tmp_path / "origin").as_uri()}, tmp_path, agent_env)
    assert not (tmp_path / contract.REPO_DIR).exists()


@pytest.mark.parametrize("stderr, why", [
    ("fatal: repository 'https://github.com/acme/nope.git/' not found", "repository not found"),
    ("fatal: unable to access 'https://git.example/x.git/': The requested URL returned error: 404", "repository not found"),
    ("fatal: '/srv/nothing' does not appear to be a git repository", "not a git repository"),
    ("fatal: unable to access 'https://nope.invalid/x.git/': Could not resolve host: nope.invalid", "host unknown"),
    ("fatal: Authentication failed for 'https://git.example/x.git/'", "access refused"),
    ("git@github.com: Permission denied (publickey).\nfatal: Could not read from remote repository.", "access refused"),
    ("error: pathspec 'v9.9' did not match any file(s) known to git", "no such branch, tag or commit"),
    ("fatal: unable to access 'https://blocked.example/x/': CONNECT tunnel failed, response 403",
     "refused by the egress proxy: the host is not on its allowlist (knative/squid/allowlist.txt)"),
    ("fatal: unable to access 'https://git.example/x.git/': The requested URL returned error: 503", None),
    ("fatal: unable to access 'https://git.example/x.git/': Failed to connect to git.example port 443: Connection timed out", None),
    ("error: RPC failed; curl 56 Recv failure: Connection reset by peer\nfatal: early EOF", None),
])
def test_git_failures_that_retrying_cannot_fix_are_named(stderr, why):
    from agent.run import permanent_git_failure

    assert permanent_git_failure(stderr) == why


def _origin(tmp_path: Path) -> Path:
    origin = tmp_path / "origin"
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(origin)]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    (origin / "README.md").write_text("hello\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return origin


@pytest.mark.parametrize("case", ["no repository", "no such ref"])
def test_a_clone_that_can_never_work_is_fatal_at_once_with_its_reason(tmp_path, agent_env, case):
    """Issue 12, item 4: a repository that cannot be cloned used to fail, be retried four times (~35 s)
    and end as BackoffLimitExceeded. Now: exit 3 (no retry), outcome failed, the reason in words."""
    repo = {"url": (tmp_path / "nothing").as_uri()} if case == "no repository" else {"url": _origin(tmp_path).as_uri(), "ref": "v9.9"}
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"prompt": "read the readme", "repo": repo}))
    workspace = tmp_path / "ws"
    proc = subprocess.run(agent_cmd("clonefail", workspace, task, "scripted:example", "--allow-file-repos"),
                          env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == contract.EXIT_FATAL, proc.stderr
    expected = "git clone failed: repository not found" if case == "no repository" else "git checkout of ref 'v9.9' failed: no such branch, tag or commit"
    (finished,) = [e for e in trace_events(proc.stdout) if e["type"] == contract.EV_STATUS and e.get("state") == contract.STATE_FINISHED]
    assert finished["outcome"] == contract.OUTCOME_FAILED and finished["reason"] == expected
    assert finished["failure_class"] == contract.FAILURE_FATAL and finished["detail"]  # git's own words, folded
    result = json.loads((workspace / contract.RESULT_FILE).read_text())
    assert (result["outcome"], result["reason"], result["failure_class"]) == (contract.OUTCOME_FAILED, expected, contract.FAILURE_FATAL)
    # The attempt counts: `started` comes before the clone.
    states = [e.get("state") for e in trace_events(proc.stdout) if e["type"] == contract.EV_STATUS]
    assert states == [contract.STATE_STARTED, contract.STATE_FINISHED]


def test_a_context_budget_too_small_to_hold_a_turn_is_refused_by_name(tmp_path, agent_env):
    run = subprocess.run(agent_cmd("small", tmp_path / "ws", EXAMPLE_TASK, "scripted:example", "--context-tokens", "200"), env=agent_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == contract.EXIT_FATAL
    assert "--context-tokens must be at least 1000, got 200" in run.stderr
    assert not (tmp_path / "ws" / contract.checkpoint_path("small")).exists()  # nothing was started


def test_a_checkpoint_from_before_the_transcript_is_a_named_fatal_error_not_a_retry_loop(tmp_path, agent_env):
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import START, StateGraph
    from typing_extensions import TypedDict

    class OldState(TypedDict):  # the shape of the state before the transcript: messages in the state
        strategic: list
        phase: str

    workspace = tmp_path / "ws"
    db = workspace / contract.checkpoint_path("old")
    db.parent.mkdir(parents=True)
    old = StateGraph(OldState)
    old.add_node("strategic", lambda state: {"phase": "STRATEGIC"})
    old.add_edge(START, "strategic")
    with sqlite3.connect(db, check_same_thread=False) as conn:
        saver = SqliteSaver(conn)
        saver.setup()
        old.compile(checkpointer=saver).invoke({"strategic": [HumanMessage(content="Task: x")], "phase": "STRATEGIC"}, {"configurable": {"thread_id": "old"}})

    run = subprocess.run(agent_cmd("old", workspace, EXAMPLE_TASK, "scripted:example"), env=agent_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == contract.EXIT_FATAL, run.stderr
    assert "older than the transcript" in run.stderr
    assert json.loads((workspace / contract.RESULT_FILE).read_text())["outcome"] == contract.OUTCOME_FAILED
