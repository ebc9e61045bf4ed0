"""LocalRuntime with a stand-in for `python -m agent`: real processes, real signals, a fake clock.

Launch, cancel, the job event's shape, resuming after a restart or a crash, and the
TTL janitor. Retries, backoff and the deadline are in test_local_supervisor.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from agent import contract
from agent.procs import group_alive, pid_alive
from functions.errors import LaunchConflict, TaskNotFound
from functions.runtime import make_runtime
from functions.runtime.local import LocalRuntime
from tests.conftest import eventually, eventually_async
from tests.functions.runtime.local_stand_in import (
    Sink,
    condition,
    lines,
    make_task,
    runtime_for,
    state_of,
    wait_finished,
    workspace,
)


async def test_job_event_is_an_apiserversource_resource_event(tmp_path, stand_in, clock):
    from cloudevents.http import from_dict

    from functions.core import cloudevent

    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    task = make_task("exit:0", task_id="shape")
    try:
        assert await runtime.finished_job("shape") is None and await runtime.job_uid("shape") is None
        await runtime.launch(task)
        launched_uid = await runtime.job_uid("shape")
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
    state = json.loads(runtime.folder("shape").state_file.read_text())
    assert meta["uid"] == state["uid"] == launched_uid and state["event_sent"] is True
    # The times are the clock's: the task finished at the moment it started, on a clock that stood still.
    assert event["data"]["status"]["completionTime"] == event["data"]["status"]["startTime"] == event["time"]
    assert event["time"] == "2025-06-15T15:06:40Z"  # FakeClock's start, 1,750,000,000
    # Both the SDK and the functions' own parser take it as a structured-mode CloudEvent.
    assert from_dict(event)["type"] == contract.EVENT_JOB_UPDATE
    parsed = cloudevent.parse({"content-type": cloudevent.STRUCTURED}, json.dumps(event).encode())
    assert parsed.get_data()["metadata"]["name"] == "agent-shape"


async def test_launch_is_idempotent_and_detects_conflicts(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        assert await runtime.launch(make_task("exit:0")) is True
        assert await runtime.launch(make_task("exit:0")) is False
        with pytest.raises(LaunchConflict):
            await runtime.launch(make_task("exit:1"))
        await wait_finished(runtime, sink)
        assert await runtime.launch(make_task("exit:0")) is False  # finished: still the same task
    finally:
        await runtime.close()  # waits for every supervision this runtime started
    assert len(lines(workspace(runtime) / "runs.log")) == 1
    assert len(sink.events) == 1
    assert await runtime.finished_job("nope") is None
    with pytest.raises(TaskNotFound):
        await runtime.cancel("nope")


@pytest.mark.parametrize("prompt", ["sleep:30", "stubborn:30"])
async def test_cancel_stops_the_agent_group(tmp_path, stand_in, clock, prompt):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, grace_seconds=0.5)
    try:
        await runtime.launch(make_task(prompt))
        runs = workspace(runtime) / "runs.log"
        (line,) = await eventually_async(lambda: lines(runs), "the agent to start")
        pid = int(line.split()[1])
        await runtime.cancel("t-1")
        assert not pid_alive(pid) and not group_alive(pid)  # cancel returns once the agent's group is gone
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.reason) == ("cancelled", "Cancelled")
    # SIGTERM ends the well-behaved agent (143); the stubborn one needs the SIGKILL after the grace period.
    assert state.exit_codes == [143 if prompt.startswith("sleep") else 128 + signal.SIGKILL]
    assert condition(sink.events[0])["type"] == "Failed"
    await runtime.cancel("t-1")  # cancelling a finished task is a no-op
    assert len(sink.events) == 1


async def test_a_new_runtime_resumes_unfinished_tasks(tmp_path, stand_in, clock):
    first_sink = Sink()
    first = runtime_for(tmp_path, stand_in, first_sink, clock)
    await first.launch(make_task("resume"))
    ws = workspace(first)
    await eventually_async(lambda: lines(ws / "runs.log"), "the agent to start")
    uid = state_of(first).uid
    await first.close()  # Ctrl-C of `dockyard dev`: the agent gets SIGTERM and exits 143
    state = state_of(first)
    assert not state.finished and state.exit_codes == [143]
    assert first_sink.events == []

    sink = Sink()
    second = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        assert await second.resume_running([{"task_id": "t-1", "state": "started"}]) == ["t-1"]
        state = await wait_finished(second, sink)
    finally:
        await second.close()
    assert (state.outcome, state.exit_codes) == ("done", [143, 0])
    assert sink.events[0]["data"]["metadata"]["uid"] == uid  # the same Job
    assert len(lines(ws / "runs.log")) == 2
    assert await runtime_for(tmp_path, stand_in, Sink(), clock).resume_running() == []  # nothing left to do


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
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_children_stop_when_the_runtime_process_dies(tmp_path, stand_in, clock, agent_env):
    """SIGKILL of the process that runs the runtime: the kernel SIGTERMs its children, a new runtime resumes."""
    data, store = tmp_path / "data", (tmp_path / "store").as_uri()
    parent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PARENT, str(data), store, *stand_in],
        env=agent_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    runs = data / "tasks" / "t-1" / "workspace" / "runs.log"
    try:
        assert parent.stdout.readline().strip() == "launched"
        (line,) = await eventually_async(lambda: lines(runs), "the agent to start")
        pid = int(line.split()[1])
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
    finally:
        parent.kill()
        parent.wait()
    eventually(lambda: not pid_alive(pid), "the agent to die with the runtime's process")

    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        assert await runtime.resume_running() == ["t-1"]
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert state.outcome == "done" and len(lines(runs)) == 2


async def test_finished_workspaces_are_removed_after_their_ttl_once_the_final_snapshot_is_stored(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(
        tmp_path, stand_in, sink, clock,
        ttl_succeeded_seconds=100, ttl_failed_seconds=1000, sweep_interval_seconds=10**9,
        env={"STANDIN_FINAL_UPLOAD": "1"},
    )  # fmt: skip
    try:
        await runtime.launch(make_task("exit:0", task_id="kept"))
        await runtime.launch(make_task("exit:0", task_id="gone"))
        await runtime.launch(make_task("exit:1", task_id="failed", retries=0))
        await eventually_async(lambda: len(sink.events) == 3, "three job events")
        # "kept" has no final snapshot in the store: its workspace stays.
        (tmp_path / "store" / "jobs" / "kept" / "final" / "result.json").unlink()
        ids = ("kept", "gone", "failed")

        clock.advance(99.5)
        await runtime.sweep()
        assert [workspace(runtime, i).exists() for i in ids] == [True, True, True]
        clock.advance(0.5)  # the succeeded tasks' TTL is over
        await runtime.sweep()
        assert [workspace(runtime, i).exists() for i in ids] == [True, False, True]
        clock.advance(900)  # so is the failed one's
        await runtime.sweep()
        assert [workspace(runtime, i).exists() for i in ids] == [True, False, False]
    finally:
        await runtime.close()
    assert [state_of(runtime, i).workspace_removed for i in ids] == [False, True, True]
    assert not runtime.folder("gone").home.exists()
    assert runtime.folder("gone").task_file.exists()  # the record of the task stays


async def test_the_janitor_sweeps_on_the_clock(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(
        tmp_path, stand_in, sink, clock, ttl_succeeded_seconds=0, sweep_interval_seconds=60, env={"STANDIN_FINAL_UPLOAD": "1"}
    )
    try:
        await runtime.launch(make_task("exit:0"))
        await wait_finished(runtime, sink)
        assert workspace(runtime).exists()  # the janitor swept at launch, before the task finished
        rounds = []

        def next_round_removed() -> bool:
            # A round may come before the supervisor has let go of the finished task (it skips it then):
            # move the clock one janitor interval whenever the janitor waits, until a round removes it.
            if 60 in clock.pending():
                rounds.append(clock.advance(60))
            return state_of(runtime).workspace_removed

        await eventually_async(next_round_removed, "a janitor round on the clock to remove the workspace")
        assert rounds  # it took the clock, not wall time
    finally:
        await runtime.close()
    assert not workspace(runtime).exists()


async def test_the_agent_gets_the_pod_command_line(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, default_model="scripted:example")
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
    # runtime=kubernetes: test_kubernetes_runtime.py::test_make_runtime_reads_the_kubeconfig_and_the_job_settings_from_the_environment


async def test_with_an_issuer_each_process_gets_its_own_credentials_file(tmp_path, stand_in, clock, nats_server):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, nats_url=nats_server.url, issuer=nats_server.auth.issuer(),
                          nats_creds=nats_server.creds("functions"))
    try:
        await runtime.launch(make_task("exit:0"))
        await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    folder = runtime.folder("t-1")
    for command, role in (("run", "agent"), ("snapshotter", "snapshotter")):
        argv = runtime.command_line(make_task("exit:0"), command)
        assert argv[argv.index("--nats-creds") + 1] == str(folder.nats_creds(role))
        assert folder.nats_creds(role).stat().st_mode & 0o777 == 0o600
    assert "--nats-creds" not in runtime.command_line(make_task("exit:0"), "restore")
    assert folder.nats_creds("agent").read_text() != folder.nats_creds("snapshotter").read_text()
    assert folder.secrets.stat().st_mode & 0o777 == 0o700 and not folder.secrets.is_relative_to(folder.workspace)


async def test_with_a_model_gateway_each_task_gets_its_own_token_and_a_finished_task_loses_its_grant(tmp_path, stand_in, clock):
    from gateway.grants import matches, read_grant, task_of

    sink = Sink()
    grants_dir = tmp_path / "gateway" / "grants"
    runtime = runtime_for(tmp_path, stand_in, sink, clock, model_gateway="http://127.0.0.1:9", gateway_grants=grants_dir, sweep_interval_seconds=10**9)
    try:
        task = make_task("exit:0", task_id="gw-task", max_tokens=500)
        argv = runtime.command_line(task, "run")
        # The agent learns where the gateway is and gets its own task's folder, not the dev stack's secrets.
        assert argv[argv.index("--model-gateway") + 1] == "http://127.0.0.1:9"
        assert argv[argv.index("--secrets-dir") + 1] == str(runtime.folder("gw-task").secrets)
        await runtime.launch(task)
        await eventually_async(lambda: len(sink.events) == 1, "the job event")
        token = (runtime.folder("gw-task").secrets / contract.GATEWAY_TOKEN_FILE).read_text()
        grant = read_grant(grants_dir, "gw-task")
        assert task_of(token) == "gw-task" and matches(grant, token) and grant.max_tokens == 500
        assert token not in (grants_dir / "gw-task.json").read_text()  # the gateway keeps a hash only
        await runtime.sweep()
        assert read_grant(grants_dir, "gw-task") is None  # finished: the token opens nothing any more
    finally:
        await runtime.close()
