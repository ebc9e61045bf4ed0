"""The warm template: real `python -m agent` children forked from `python -m agent template`.

The same task gives the same trace forked as exec'd; a forked agent holds no
descriptor of the template and sees only its task's environment; SIGTERM and
SIGKILL are reported as 143 and 137; a template killed under a running task
costs one retry from the checkpoint; a runtime killed hard leaves children that
the next runtime recognises by their start time (their command line is the
template's) and stops. Gates (files the test creates) decide every path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from agent import contract
from agent.procs import group_alive, live_group_members, pid_alive, signal_group, start_time
from functions.runtime.local import LocalRuntime
from functions.runtime.local.processes import _is_our_group, exit_code
from functions.runtime.local.template import WarmTemplate
from tests.conftest import agent_environment, eventually, eventually_async
from tests.functions.runtime.local_stand_in import Sink, lines, make_task, runtime_for, wait_backoff, wait_finished

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the template needs Linux pidfds")

# The second of three calls waits for `../gate` (in the task's folder, beside the workspace) and first
# writes the pid of its shell's parent, the agent, to `../agent.pid`.
WAITING_CALL = "echo $PPID > ../agent.pid.tmp && mv ../agent.pid.tmp ../agent.pid; until [ -e ../gate ]; do sleep 0.01; done; echo two >> calls.log"
TURNS = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["count"], "objective": "count to three"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": "echo one >> calls.log"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": WAITING_CALL}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": "echo three >> calls.log"}}]},
    {"content": "counted to three"},
    {"tool_calls": [{"name": "finish", "args": {"summary": "counted"}}]},
]


def real_runtime(tmp_path: Path, sink: Sink, *, warm: bool, name: str = "data", env: dict | None = None, **kw) -> LocalRuntime:
    """A LocalRuntime running the real agent with the scripted model `count` (TURNS), no NATS."""
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "count.yaml").write_text(yaml.safe_dump(TURNS))
    kw = {"backoff_seconds": 0.0, "grace_seconds": 10.0, "snapshotter_grace_seconds": 10.0, **kw}
    return LocalRuntime(
        tmp_path / name, None, (tmp_path / f"{name}-store").as_uri(), sink,
        env=agent_environment(env), default_model="scripted:count", scripts_dir=str(scripts), warm=warm, **kw,
    )  # fmt: skip


def trace(runtime: LocalRuntime, task_id: str = "t-1") -> list[dict]:
    """The agent's trace events from its log (no NATS: JSON lines on stdout), without times."""
    text = runtime.folder(task_id).log("agent").read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith('{"type"')]
    return [{k: v for k, v in e.items() if k not in ("ts", "seconds", "latency_ms")} for e in events]


def agent_pid(runtime: LocalRuntime, task_id: str = "t-1") -> int | None:
    path = runtime.folder(task_id).root / "agent.pid"
    return int(path.read_text()) if path.exists() else None


def open_gate(runtime: LocalRuntime, task_id: str = "t-1") -> None:
    (runtime.folder(task_id).root / "gate").touch()


def descriptors(pid: int) -> dict[str, str]:
    fds = Path(f"/proc/{pid}/fd")
    return {fd.name: os.readlink(fd) for fd in fds.iterdir()}


async def test_a_task_forked_from_the_template_has_the_trace_of_an_execd_one(tmp_path):
    traces, parents = {}, {}
    for warm in (True, False):
        sink = Sink()
        runtime = real_runtime(tmp_path, sink, warm=warm, name=f"warm-{warm}")
        try:
            await runtime.launch(make_task("count"))
            pid = await eventually_async(lambda: agent_pid(runtime), "the agent at its second call")  # noqa: B023
            parents[warm] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:4]
            open_gate(runtime)
            state = await wait_finished(runtime, sink)
        finally:
            await runtime.close()
        assert (state.outcome, state.exit_codes) == ("done", [0])
        assert (runtime.folder("t-1").workspace / "calls.log").read_text() == "one\ntwo\nthree\n"
        traces[warm] = trace(runtime)
    assert parents[True] == [sys.executable.encode(), b"-m", b"agent", b"template"]  # forked: the template's command line
    assert parents[False][3] == b"run"
    assert traces[True] == traces[False]
    assert [e["type"] for e in traces[True]][:2] == ["status", "phase"] and traces[True][-1]["state"] == "finished"


async def test_a_forked_agent_holds_nothing_of_the_template_and_sees_only_its_task_environment(tmp_path):
    sink = Sink()
    task_report, template_report = tmp_path / "task-report.json", tmp_path / "template-report.json"
    # The agent writes its debug report to the file DOCKYARD_DEBUG_EXIT_REPORT names in *its* os.environ.
    runtime = real_runtime(tmp_path, sink, warm=True, env={"DOCKYARD_DEBUG_EXIT_REPORT": str(task_report)})
    assert runtime.template is not None
    runtime.template.env = {**runtime.template.env, "DOCKYARD_DEBUG_EXIT_REPORT": str(template_report), "ONLY_IN_TEMPLATE": "1"}
    try:
        await runtime.launch(make_task("count"))
        pid = await eventually_async(lambda: agent_pid(runtime), "the agent at its second call")
        template = runtime.template.proc
        assert template is not None
        template_fds, child_fds = descriptors(template.pid), descriptors(pid)
        # The template: its channel (0, 1), stderr (2) and one pidfd per running child (restore has exited).
        assert sorted(template_fds, key=int)[:3] == ["0", "1", "2"]
        assert [target for fd, target in template_fds.items() if int(fd) > 2] == ["anon_inode:[pidfd]"]
        assert os.listdir(f"/proc/{template.pid}/task") == [str(template.pid)]  # one thread
        shared = (set(template_fds.values()) & set(child_fds.values())) - {os.devnull}
        assert shared == set(), f"the agent holds the template's {shared}"
        assert child_fds["1"] == child_fds["2"] == str(runtime.folder("t-1").log("agent"))
        assert os.getsid(pid) == os.getpgid(pid) == pid  # its own session and group
        assert Path(f"/proc/{pid}/cwd").resolve() == runtime.folder("t-1").workspace
        open_gate(runtime)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert state.outcome == "done"
    assert task_report.exists() and not template_report.exists()
    assert "agent.run" in json.loads(task_report.read_text())["modules"]


async def test_sigterm_and_sigkill_are_reported_as_143_and_137(tmp_path):
    """Straight through the template, as `Children.stop` signals a group: SIGTERM lets the step finish
    (the agent exits 143, resumable); SIGKILL is a death by signal 9."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "count.yaml").write_text(yaml.safe_dump(TURNS))
    env = agent_environment()
    template = WarmTemplate((sys.executable, "-m", "agent"), env)
    codes = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            folder = tmp_path / sig.name
            (folder / "ws").mkdir(parents=True)
            (folder / "task.json").write_text(json.dumps({"prompt": "count"}))
            argv = [
                "run", "--task-id", "t-1", "--workspace", str(folder / "ws"), "--task-file", str(folder / "task.json"),
                "--model", "scripted:count", "--scripts-dir", str(scripts), "--home", str(folder / "home"),
                "--secrets-dir", str(folder / "none"),
            ]  # fmt: skip
            child = await template.spawn(argv, env, str(folder / "ws"), str(folder / "agent.log"))
            await eventually_async(lambda: (folder / "agent.pid").exists(), "the agent at its second call")  # noqa: B023
            assert signal_group(child.pid, sig)
            if sig == signal.SIGTERM:
                (folder / "gate").touch()  # the step it is in finishes, then it stops
            codes[sig] = exit_code(await asyncio.wait_for(child.wait(), 60))
            if sig == signal.SIGTERM:
                assert (folder / "ws" / "calls.log").read_text() == "one\ntwo\n"
            else:
                (folder / "gate").touch()
    finally:
        await template.close()
    assert codes == {signal.SIGTERM: contract.EXIT_INTERRUPTED, signal.SIGKILL: 128 + signal.SIGKILL}


async def test_a_task_survives_its_template_being_killed(tmp_path):
    """SIGKILL of the template: its agent gets SIGTERM, finishes its step, exits; the runtime reports that
    as a crash (143), retries, starts a new template, and the agent resumes from its checkpoint."""
    sink = Sink()
    runtime = real_runtime(tmp_path, sink, warm=True)
    try:
        await runtime.launch(make_task("count"))
        pid = await eventually_async(lambda: agent_pid(runtime), "the agent at its second call")
        first = runtime.template.proc
        first.send_signal(signal.SIGKILL)
        await first.wait()
        (runtime.folder("t-1").root / "agent.pid").unlink()
        open_gate(runtime)  # the agent, SIGTERMed by the kernel, finishes the call it is in and stops
        state = await wait_finished(runtime, sink)
        second = runtime.template.proc
    finally:
        await runtime.close()
    assert not pid_alive(pid)
    assert (state.outcome, state.exit_codes) == ("done", [contract.EXIT_INTERRUPTED, 0])
    assert second is not None and second.pid != first.pid  # a new template for the retry
    assert (runtime.folder("t-1").workspace / "calls.log").read_text() == "one\ntwo\nthree\n"  # no call twice
    resumed = [e for e in trace(runtime) if e["type"] == "status"]
    assert [e["state"] for e in resumed] == ["started", "interrupted", "resumed", "finished"]


CRASHING_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from tests.functions.runtime.test_local_template import real_runtime
    from tests.functions.runtime.local_stand_in import Sink, make_task
    from pathlib import Path

    async def main():
        runtime = real_runtime(Path(sys.argv[1]), Sink(), warm=True)
        await runtime.launch(make_task("count"))
        print("launched", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_children_left_by_a_runtime_killed_hard_are_recognised_and_stopped(tmp_path):
    """The runtime's process dies (SIGKILL): the template gets SIGTERM and ends, its agent gets SIGTERM but
    is stuck in a call. The next runtime knows the agent by its pid and start time (its command line is
    the template's, without the task id), stops it, and the task resumes."""
    parent = subprocess.Popen([sys.executable, "-c", CRASHING_PARENT, str(tmp_path)], env=agent_environment(), stdout=subprocess.PIPE, text=True)
    folder = tmp_path / "data" / "tasks" / "t-1"
    try:
        assert parent.stdout.readline().strip() == "launched"
        pid = eventually(lambda: (folder / "agent.pid").exists() and int((folder / "agent.pid").read_text()), "the agent at its second call")
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
    finally:
        parent.kill()
        parent.wait()
    recorded = json.loads((folder / "supervisor.json").read_text())
    assert recorded["pgids"]["agent"] == pid and recorded["starts"]["agent"] == start_time(pid)
    assert b"t-1" not in Path(f"/proc/{pid}/cmdline").read_bytes()  # forked: the template's command line
    assert pid_alive(pid)  # it got SIGTERM from the kernel, but its call waits for the gate
    (folder / "agent.pid").unlink()

    sink = Sink()
    runtime = real_runtime(tmp_path, sink, warm=True, grace_seconds=0.5)
    try:
        assert await runtime.resume_running() == ["t-1"]
        await eventually_async(lambda: not group_alive(pid), "the left-over agent stopped")
        await eventually_async(lambda: (folder / "agent.pid").exists(), "the resumed agent at its second call")
        (folder / "gate").touch()
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert state.outcome == "done"
    assert (folder / "workspace" / "calls.log").read_text() == "one\ntwo\nthree\n"
    assert len([line for line in lines(folder / "logs" / "agent.log") if line.startswith("--- ")]) == 2


def test_a_recorded_group_is_ours_only_with_the_same_start_time(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        start = start_time(proc.pid)
        assert start is not None
        assert _is_our_group(proc.pid, "t-1", start)
        assert not _is_our_group(proc.pid, "t-1", start + 1)  # the pid reused by another process
        assert not _is_our_group(proc.pid, "t-1")  # no start recorded: the command line must name the task
    finally:
        proc.kill()
        proc.wait()
    assert not live_group_members(proc.pid)


async def test_without_a_template_that_starts_every_child_is_execd(tmp_path, stand_in, clock, caplog):
    """A template that exits before it is ready (here the stand-in, which knows no `template` command)
    is not tried again: restore and the agent are exec'd, and the task runs as without one."""
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, warm=True)
    assert runtime.template is not None
    try:
        await runtime.launch(make_task("exit:1,0"))
        await wait_backoff(runtime, clock, 1, 2.0)
        clock.advance(2.0)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.exit_codes) == ("done", [1, 0])  # both attempts ran, exec'd
    assert runtime.template.broken and runtime.template.proc.returncode is not None
    assert any("did not start" in record.getMessage() for record in caplog.records)
    assert len(lines(runtime.folder("t-1").workspace / "runs.log")) == 2
