"""LocalRuntime with a stand-in for `python -m agent`: real processes, real signals, a real NATS.

The stand-in takes the agent's command line (`run|restore|snapshotter --flag value ...`)
and behaves as its task prompt says, e.g. `exit:1,1,0` (exit 1, then 1, then 0 on the
third attempt) or `sleep:30` (until SIGTERM, then exit 143 like the agent).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent import contract
from functions.runtime import make_runtime
from functions.errors import LaunchConflict, TaskNotFound
from functions.runtime.local import LocalRuntime
from functions.core.task import Task, parse_task

STAND_IN = textwrap.dedent(
    '''
    import json, os, signal, sys, time
    from pathlib import Path

    command = sys.argv[1]
    args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    ws = Path(args["--workspace"])

    def note(name, text):
        with open(ws / name, "a") as fh:
            fh.write(text + "\\n")

    if command == "restore":
        note("restore.log", str(time.time()))
        sys.exit(int(os.environ.get("STANDIN_RESTORE_EXIT", "0")))

    if command == "snapshotter":
        def final(*_):
            note("snapshotter.log", "final")
            if os.environ.get("STANDIN_FINAL_UPLOAD"):
                from agent.storage import open_store
                open_store(args["--store"]).put_bytes(f"jobs/{args['--task-id']}/final/result.json", b"{}")
            sys.exit(0)
        signal.signal(signal.SIGTERM, final)
        note("snapshotter.log", "start")
        while True:
            time.sleep(1)

    task = json.loads(Path(args["--task-file"]).read_text())
    kind, _, arg = task["prompt"].partition(":")
    runs = ws / "runs.log"
    n = len(runs.read_text().splitlines()) if runs.exists() else 0
    note("runs.log", f"{time.time()} {os.getpid()} {args.get('--model', '-')}")

    def done(outcome="done"):
        (ws / ".dockyard").mkdir(exist_ok=True)
        (ws / ".dockyard" / "result.json").write_text(json.dumps({"outcome": outcome, "summary": f"stand-in {outcome}"}))
        sys.exit(0)

    def until_sigterm(seconds):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        time.sleep(seconds)

    if kind == "exit":
        codes = [int(c) for c in arg.split(",")]
        code = codes[min(n, len(codes) - 1)]
        print(f"stand-in attempt {n + 1} exits with {code}", file=sys.stderr, flush=True)
        if code == 0:
            done()
        sys.exit(code)
    if kind == "sleep":
        until_sigterm(float(arg))
        done()
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(float(arg))
    if kind == "resume":  # the first run works until stopped; the next one "resumes" and finishes
        if n == 0:
            until_sigterm(60)
        done()
    sys.exit(2)
    '''
)


@pytest.fixture
def stand_in(tmp_path) -> list[str]:
    script = tmp_path / "stand_in_agent.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


class Sink:
    """Collects the job events the runtime emits; can fail the first deliveries."""

    def __init__(self, fail_first: int = 0):
        self.events: list[dict] = []
        self.fail_first = fail_first
        self.calls = 0
        self.on_event = None

    async def __call__(self, event: dict) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError("broker not ready")
        if self.on_event:
            self.on_event(event)
        self.events.append(event)


def make_task(prompt: str, task_id: str = "t-1", model: str | None = None, **limits) -> Task:
    limits = {"deadline_seconds": 60, "retries": 3, **limits}
    data = {"task_id": task_id, "prompt": prompt, "limits": limits, **({"model": model} if model else {})}
    return parse_task(data, source="test", event_id="1")


def runtime_for(tmp_path, stand_in, sink, nats_url=None, **kw) -> LocalRuntime:
    kw = {"backoff_seconds": 0.1, "grace_seconds": 1.0, "snapshotter_grace_seconds": 5.0, **kw}
    env = {**os.environ, **kw.pop("env", {})}
    return LocalRuntime(
        tmp_path / "data", nats_url, (tmp_path / "store").as_uri(), sink, agent_cmd=stand_in, env=env, **kw
    )


async def wait_finished(runtime: LocalRuntime, sink: Sink, task_id: str = "t-1", timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await runtime.status(task_id)
        if status.state == contract.STATE_FINISHED and sink.events:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish: {await runtime.status(task_id)}")


def workspace(runtime: LocalRuntime, task_id: str = "t-1") -> Path:
    return runtime.paths(task_id)["workspace"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def condition(event: dict) -> dict:
    (cond,) = event["data"]["status"]["conditions"]
    return cond


async def test_retries_with_backoff_then_completes(tmp_path, stand_in, nats_server):
    import nats

    nc = await nats.connect(nats_server.url)
    retrying = []

    async def on_msg(msg):
        retrying.append(json.loads(msg.data))

    await nc.subscribe(contract.subject_events("t-1"), cb=on_msg)
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, nats_url=nats_server.url)
    ws = workspace(runtime)
    sink.on_event = lambda event: (ws / "emitted.log").write_text("\n".join(lines(ws / "snapshotter.log")))
    try:
        assert await runtime.launch(make_task("exit:1,1,0")) is True
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
        await nc.close()

    assert (status.outcome, status.attempts, status.details["exit_codes"]) == ("done", 3, [1, 1, 0])
    starts = [float(line.split()[0]) for line in lines(ws / "runs.log")]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps  # exponential backoff
    assert len(lines(ws / "restore.log")) == 3  # restore before every attempt, like an init container
    # One snapshotter for the whole task, stopped (final upload) before the job event went out.
    assert lines(ws / "emitted.log") == ["start", "final"]
    assert [(e["state"], e["attempt"], e["exit_code"]) for e in retrying] == [("retrying", 2, 1), ("retrying", 3, 1)]
    assert all(e["type"] == contract.EV_STATUS and e["task_id"] == "t-1" for e in retrying)

    (event,) = sink.events
    job = event["data"]
    assert condition(event) | {"lastProbeTime": None, "lastTransitionTime": None} == {
        "type": "Complete",
        "status": "True",
        "reason": "CompletionsReached",
        "message": "Reached expected number of succeeded pods",
        "lastProbeTime": None,
        "lastTransitionTime": None,
    }
    assert (job["status"]["succeeded"], job["status"]["failed"]) == (1, 2)
    assert job["status"]["terminationMessage"] == "stand-in done"
    assert "completionTime" in job["status"]


async def test_job_event_is_an_apiserversource_resource_event(tmp_path, stand_in):
    from cloudevents.http import from_dict

    from functions.core import cloudevent

    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink)
    task = make_task("exit:0", task_id="shape")
    try:
        assert await runtime.finished_job("shape") is None
        await runtime.launch(task)
        await wait_finished(runtime, sink, "shape")
        finished_job = await runtime.finished_job("shape")
    finally:
        await runtime.close()
    (event,) = sink.events
    assert finished_job == event["data"]  # what snapshot_due reconciles with is what the event carried
    assert event["type"] == contract.EVENT_JOB_UPDATE
    assert event["source"] == contract.EVENT_SOURCE_LOCAL_RUNTIME
    assert event["subject"] == f"/apis/batch/v1/namespaces/{contract.AGENTS_NAMESPACE}/jobs/agent-shape"
    meta = event["data"]["metadata"]
    assert (event["data"]["apiVersion"], event["data"]["kind"]) == ("batch/v1", "Job")
    assert meta["name"] == contract.job_name("shape")
    assert meta["namespace"] == contract.AGENTS_NAMESPACE
    assert meta["labels"] == contract.agent_labels("shape")
    assert json.loads(meta["annotations"][contract.ANNOTATION_TASK]) == task.to_dict()
    state = json.loads(runtime.paths("shape")["state"].read_text())
    assert meta["uid"] == state["uid"] and state["event_sent"] is True
    # Both the SDK and the functions' own parser take it as a structured-mode CloudEvent.
    assert from_dict(event)["type"] == contract.EVENT_JOB_UPDATE
    parsed = cloudevent.parse({"content-type": cloudevent.STRUCTURED}, json.dumps(event).encode())
    assert parsed.get_data()["metadata"]["name"] == "agent-shape"


async def test_retries_stop_at_the_limit(tmp_path, stand_in):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, backoff_seconds=0.01)
    try:
        await runtime.launch(make_task("exit:1", retries=2))
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (status.outcome, status.reason, status.details["exit_codes"]) == ("failed", "BackoffLimitExceeded", [1, 1, 1])
    job = sink.events[0]["data"]
    assert condition(sink.events[0])["type"] == "Failed"
    assert (job["status"]["succeeded"], job["status"]["failed"]) == (0, 3)
    # FallbackToLogsOnError: the tail of the last attempt's log.
    assert job["status"]["terminationMessage"].strip() == "stand-in attempt 3 exits with 1"


@pytest.mark.parametrize("code,outcome", [(contract.EXIT_FATAL, "failed"), (contract.EXIT_CANCELLED, "cancelled")])
async def test_no_retry_exit_codes_fail_at_once(tmp_path, stand_in, code, outcome):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink)
    try:
        await runtime.launch(make_task(f"exit:{code},0", retries=3))
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (status.outcome, status.reason, status.attempts) == (outcome, "PodFailurePolicy", 1)
    assert condition(sink.events[0])["type"] == "Failed"


async def test_deadline_stops_the_agent(tmp_path, stand_in):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink)
    began = time.monotonic()
    try:
        await runtime.launch(make_task("sleep:30", deadline_seconds=1))
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert time.monotonic() - began < 10
    assert (status.outcome, status.reason, status.details["exit_codes"]) == ("deadline", "DeadlineExceeded", [143])
    assert condition(sink.events[0])["type"] == "Failed"


async def test_launch_is_idempotent_and_detects_conflicts(tmp_path, stand_in):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink)
    try:
        assert await runtime.launch(make_task("exit:0")) is True
        assert await runtime.launch(make_task("exit:0")) is False
        with pytest.raises(LaunchConflict):
            await runtime.launch(make_task("exit:1"))
        await wait_finished(runtime, sink)
        assert await runtime.launch(make_task("exit:0")) is False  # finished: still the same task
        await asyncio.sleep(0.2)
    finally:
        await runtime.close()
    assert len(lines(workspace(runtime) / "runs.log")) == 1
    assert len(sink.events) == 1
    assert [s.task_id for s in await runtime.list()] == ["t-1"]
    with pytest.raises(TaskNotFound):
        await runtime.status("nope")
    with pytest.raises(TaskNotFound):
        await runtime.cancel("nope")


@pytest.mark.parametrize("prompt", ["sleep:30", "stubborn:30"])
async def test_cancel_stops_the_agent_group(tmp_path, stand_in, prompt):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, grace_seconds=0.5)
    try:
        await runtime.launch(make_task(prompt))
        ws = workspace(runtime)
        while not lines(ws / "runs.log"):
            await asyncio.sleep(0.05)
        pid = int(lines(ws / "runs.log")[0].split()[1])
        await runtime.cancel("t-1")
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (status.outcome, status.reason) == ("cancelled", "Cancelled")
    assert condition(sink.events[0])["type"] == "Failed"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await runtime.cancel("t-1")  # cancelling a finished task is a no-op


async def test_job_event_delivery_is_retried(tmp_path, stand_in):
    sink = Sink(fail_first=2)
    runtime = runtime_for(tmp_path, stand_in, sink)
    try:
        await runtime.launch(make_task("exit:0"))
        await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert sink.calls == 3 and len(sink.events) == 1


async def test_a_new_runtime_resumes_unfinished_tasks(tmp_path, stand_in):
    first_sink = Sink()
    first = runtime_for(tmp_path, stand_in, first_sink)
    await first.launch(make_task("resume"))
    ws = workspace(first)
    while not lines(ws / "runs.log"):
        await asyncio.sleep(0.05)
    uid = (await first.status("t-1")).details["uid"]
    await first.close()  # Ctrl-C of `dockyard dev`: the agent gets SIGTERM and exits 143
    status = await first.status("t-1")
    assert status.state != contract.STATE_FINISHED and status.details["exit_codes"] == [143]
    assert first_sink.events == []

    sink = Sink()
    second = runtime_for(tmp_path, stand_in, sink)
    try:
        assert await second.resume_running([{"task_id": "t-1", "state": "started"}]) == ["t-1"]
        status = await wait_finished(second, sink)
    finally:
        await second.close()
    assert (status.outcome, status.details["exit_codes"]) == ("done", [143, 0])
    assert sink.events[0]["data"]["metadata"]["uid"] == uid  # the same Job
    assert len(lines(ws / "runs.log")) == 2
    assert await runtime_for(tmp_path, stand_in, Sink()).resume_running() == []  # nothing left to do


CRASHING_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from functions.runtime.local import LocalRuntime
    from functions.core.task import parse_task

    async def main():
        async def emit(event):
            pass
        runtime = LocalRuntime(sys.argv[1], None, sys.argv[2], emit, agent_cmd=sys.argv[3:])
        task = parse_task({"task_id": "t-1", "prompt": "resume"}, source="test", event_id="1")
        await runtime.launch(task)
        print("launched", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_children_stop_when_the_runtime_process_dies(tmp_path, stand_in, agent_env):
    """SIGKILL of the process that runs the runtime: the kernel SIGTERMs its children, a new runtime resumes."""
    data, store = tmp_path / "data", (tmp_path / "store").as_uri()
    parent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PARENT, str(data), store, *stand_in],
        env=agent_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout.readline().strip() == "launched"
        runs = data / "tasks" / "t-1" / "workspace" / "runs.log"
        deadline = time.monotonic() + 10
        while not lines(runs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pid = int(lines(runs)[0].split()[1])
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        await asyncio.sleep(0.05)
    assert not _alive(pid), "the agent outlived the runtime's process"

    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink)
    try:
        assert await runtime.resume_running() == ["t-1"]
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert status.outcome == "done" and len(lines(runs)) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


async def test_finished_workspaces_are_removed_once_the_final_snapshot_is_stored(tmp_path, stand_in):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, ttl_succeeded_seconds=0, env={"STANDIN_FINAL_UPLOAD": "1"})
    try:
        await runtime.launch(make_task("exit:0", task_id="kept"))
        await runtime.launch(make_task("exit:0", task_id="gone"))
        while len(sink.events) < 2:
            await asyncio.sleep(0.05)
        # "kept" has no final snapshot in the store: its workspace stays.
        (tmp_path / "store" / "jobs" / "kept" / "final" / "result.json").unlink()
        await runtime.sweep()
    finally:
        await runtime.close()
    assert workspace(runtime, "kept").exists()
    assert not workspace(runtime, "gone").exists()
    assert (await runtime.status("gone")).details["workspace"] is None
    assert runtime.paths("gone")["task"].exists()  # the record of the task stays


async def test_restore_failure_counts_as_a_failed_attempt(tmp_path, stand_in):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, backoff_seconds=0.01, env={"STANDIN_RESTORE_EXIT": "1"})
    try:
        await runtime.launch(make_task("exit:0", retries=1))
        status = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (status.outcome, status.reason, status.details["exit_codes"]) == ("failed", "BackoffLimitExceeded", [1, 1])
    assert not lines(workspace(runtime) / "runs.log")  # the agent never started
    assert "restore exited with code 1" in sink.events[0]["data"]["status"]["terminationMessage"]


async def test_the_agent_gets_the_pod_command_line(tmp_path, stand_in):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, default_model="scripted:example")
    try:
        await runtime.launch(make_task("exit:0"))
        await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert lines(workspace(runtime) / "runs.log")[0].split()[2] == "scripted:example"
    argv = runtime.command_line(make_task("exit:0"), "run")
    assert argv[len(stand_in)] == "run"
    assert {"--task-id", "--workspace", "--task-file", "--home", "--model"} <= set(argv)
    assert runtime.command_line(make_task("x", model="scripted:other"), "run")[-1] != "scripted:example"


def test_make_runtime_picks_the_implementation(tmp_path):
    from functions.core.settings import Settings

    async def emit(event):
        pass

    runtime = make_runtime(Settings(data_dir=tmp_path, runtime="local"), emit_job_event=emit)
    assert isinstance(runtime, LocalRuntime) and runtime.store_url == (tmp_path / "store").as_uri()
    if not (Path(__file__).parents[3] / "functions" / "runtime" / "kubernetes.py").exists():
        with pytest.raises(ValueError, match="DOCKYARD_RUNTIME"):
            make_runtime(Settings(data_dir=tmp_path, runtime="kubernetes"))
