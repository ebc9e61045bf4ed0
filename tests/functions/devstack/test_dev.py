"""`dockyard dev` and `dockyard demo` end to end: the real agent, the real functions, a real nats-server.

The stack runs as a child process (tests/dev_process.py) exactly as a user starts it;
tests talk to it over HTTP only, and reach into its data dir only to find an agent's pid.
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

import httpx
import pytest

from agent import contract
from functions.cli import client
from functions.cli import main as cli
from functions.cli.demo import EXAMPLE_MODEL, EXAMPLE_TASK
from functions.devstack.nats_embedded import EmbeddedNats
from functions.cli.sse_client import follow
from tests.conftest import REPO_ROOT, eventually, free_port, process_alive
from tests.dev_process import DevServer


def example_task() -> dict:
    task = json.loads(EXAMPLE_TASK.read_text())
    return {**task, "model": EXAMPLE_MODEL}


async def collect(token: str, url: str, task_id: str, until=None, after: int | None = None, timeout: float = 90.0) -> list:
    """The task's SSE messages until `end` (or until `until(message)` is true)."""
    messages = []

    async def run():
        async for message in follow(f"{url}/api/stream/{task_id}", after, headers=client.auth_headers(token)):
            messages.append(message)
            if until is not None and until(message):
                return

    await asyncio.wait_for(run(), timeout)
    return messages


def statuses(messages) -> list[dict]:
    return [m.data for m in messages if m.event == contract.EV_STATUS]


def wait_record(token: str, url: str, task_id: str, timeout: float = 30.0) -> dict:
    """The task's record once job_finished has recorded the end (within `timeout` of the call)."""

    def finished() -> dict | None:
        record = httpx.get(f"{url}/api/tasks/{task_id}", headers=client.auth_headers(token), timeout=5).json()
        return record if record.get("finished_uids") else None

    return eventually(finished, f"job_finished to record task {task_id}", timeout)


@pytest.fixture
def stack(tmp_path):
    stacks: list[DevServer] = []

    def make() -> DevServer:
        stacks.append(DevServer(tmp_path / "data").start())
        return stacks[-1]

    yield make
    for s in stacks:
        s.stop()


def test_demo_runs_the_example_task(tmp_path, agent_env):
    result = subprocess.run(
        [sys.executable, "-m", "functions.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        cwd=REPO_ROOT,
        env=agent_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== STRATEGIC ==" in out and "== TACTICAL ==" in out
    assert out.index("== STRATEGIC ==") < out.index("== TACTICAL ==")
    assert "$ execute: " in out and "outcome: done" in out
    (line,) = [line for line in out.splitlines() if line.startswith("final snapshot: ")]
    archive = Path(line.removeprefix("final snapshot: file://"))
    assert archive.is_file() and archive.name == "workspace.tar.gz"
    # The stack stopped with the demo: nothing listens any more.
    assert "stopped the dev stack" in out


def test_dev_makes_its_token_once_and_prints_the_cockpit_url_with_it(stack):
    dev = stack()
    token_file, tokens_file = dev.data_dir / "api-token", dev.data_dir / "api-tokens"
    assert token_file.stat().st_mode & 0o777 == 0o600 and tokens_file.stat().st_mode & 0o777 == 0o600
    token = dev.token
    assert token not in tokens_file.read_text()  # stored hashed
    assert f"{dev.url}/?token={token}" in dev.output()
    assert httpx.get(f"{dev.url}/api/tasks", headers=dev.headers, timeout=5).status_code == 200
    assert httpx.get(f"{dev.url}/api/tasks", timeout=5).status_code == 401
    dev.stop()
    dev.start()  # the same data dir: the same token, one line for it
    assert dev.token == token and tokens_file.read_text().count(" write ") == 1


def test_an_agent_killed_mid_task_is_retried_and_resumes(stack):
    dev = stack()
    task_id = client.submit_task(dev.url, {**example_task(), "task_id": "killed"}, dev.token)
    assert task_id == "killed"
    killed: list[int] = []

    def kill_at_first_tool(message) -> bool:
        if message.event == contract.EV_TOOL and not killed:
            pid = dev.supervisor_state(task_id)["pgids"]["agent"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return message.event == "end"

    messages = asyncio.run(collect(dev.token, dev.url, task_id, until=kill_at_first_tool))
    states = [s.get("state") for s in statuses(messages)]
    assert killed
    retrying = [s for s in statuses(messages) if s.get("state") == contract.STATE_RETRYING]
    assert retrying and retrying[0]["exit_code"] == 137 and retrying[0]["attempt"] == 2
    assert states.index(contract.STATE_RETRYING) < states.index(contract.STATE_RESUMED) < states.index(contract.STATE_FINISHED)
    assert statuses(messages)[-1]["outcome"] == contract.OUTCOME_DONE
    record = wait_record(dev.token, dev.url, task_id)
    assert record["outcome"] == contract.OUTCOME_DONE
    assert contract.final_archive_key(task_id) in record["snapshot_keys"]
    assert dev.supervisor_state(task_id)["exit_codes"] == [137, 0]


def test_ctrl_c_stops_agents_and_the_next_start_resumes_them(stack):
    first = stack()
    task_id = client.submit_task(first.url, {**example_task(), "task_id": "restarted"}, first.token)
    seen = asyncio.run(collect(first.token, first.url, task_id, until=lambda m: m.data.get("phase") == contract.PHASE_TACTICAL))
    assert first.stop() == 0
    state = first.supervisor_state(task_id)
    assert state["state"] != contract.STATE_FINISHED and state["exit_codes"] == [contract.EXIT_INTERRUPTED]
    assert state["pgids"] == {}  # nothing left running

    second = stack()
    messages = asyncio.run(collect(second.token, second.url, task_id, after=seen[-1].id))
    states = [s.get("state") for s in statuses(messages)]
    assert contract.STATE_RESUMED in states and states[-1] == contract.STATE_FINISHED
    assert wait_record(second.token, second.url, task_id)["outcome"] == contract.OUTCOME_DONE


def test_cancel_through_the_stack(stack, capsys):
    dev = stack()
    task_id = client.submit_task(dev.url, {**example_task(), "task_id": "cancelled"}, dev.token)
    seen = asyncio.run(collect(dev.token, dev.url, task_id, until=lambda m: m.data.get("phase") == contract.PHASE_TACTICAL))
    assert cli.main(["cancel", task_id, "--url", dev.url, "--token", dev.token]) == 0
    assert capsys.readouterr().out.strip() == f"cancel {task_id}: cancelling"  # the agent took it
    messages = asyncio.run(collect(dev.token, dev.url, task_id, after=seen[-1].id))
    assert statuses(messages)[-1]["outcome"] == contract.OUTCOME_CANCELLED
    assert wait_record(dev.token, dev.url, task_id)["outcome"] == contract.OUTCOME_CANCELLED
    state = dev.supervisor_state(task_id)  # exit 4 is not retried
    assert (state["exit_codes"], state["reason"]) == ([contract.EXIT_CANCELLED], "PodFailurePolicy")


def test_submit_to_the_dev_stack_refuses_bad_input(stack, capsys):
    dev = stack()
    assert cli.main(["submit", "x", "--task-id", "Not_Valid", "--url", dev.url, "--token", dev.token]) == 2
    assert "(field: task_id)" in capsys.readouterr().err
    assert cli.main(["tasks", "--url", dev.url, "--token", dev.token]) == 0
    assert capsys.readouterr().out.strip() == "no tasks"


async def _post_same_event_concurrently(url: str, token: str, times: int) -> list[httpx.Response]:
    event = {
        "specversion": "1.0", "id": "dup-1", "source": "test/duplicates", "type": contract.EVENT_TASK_SUBMITTED,
        "datacontenttype": "application/json", "data": example_task(),
    }
    headers = {"content-type": "application/cloudevents+json", **client.auth_headers(token)}
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(http.post(f"{url}/", json=event, headers=headers) for _ in range(times)))


def test_the_same_event_twenty_times_concurrently_makes_one_task_and_one_workspace(stack):
    dev = stack()
    responses = asyncio.run(_post_same_event_concurrently(dev.url, dev.token, 20))
    assert [r.status_code for r in responses] == [202] * 20, [r.text for r in responses]
    task_id = contract.derive_task_id("test/duplicates", "dup-1")
    assert [p.name for p in (dev.data_dir / "tasks").iterdir()] == [task_id]
    messages = asyncio.run(collect(dev.token, dev.url, task_id))
    assert [s["state"] for s in statuses(messages)].count(contract.STATE_STARTED) == 1
    assert statuses(messages)[-1]["outcome"] == contract.OUTCOME_DONE
    assert [r["task_id"] for r in httpx.get(f"{dev.url}/api/tasks", headers=dev.headers, timeout=5).json()] == [task_id]


# --- the embedded nats-server ------------------------------------------------------


async def test_embedded_nats_serves_jetstream_and_keeps_its_store(tmp_path):
    import nats

    port = free_port()
    with EmbeddedNats(tmp_path, port=port) as server:
        assert server.url == f"nats://127.0.0.1:{port}"
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.one", b"1")
        await nc.close()
    with EmbeddedNats(tmp_path) as server:  # a free port this time, the same store
        nc = await nats.connect(server.url)
        assert (await nc.jetstream().stream_info("KEEP")).state.messages == 1
        await nc.close()


def test_embedded_nats_dies_with_its_parent(tmp_path, agent_env):
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            f"""
            import time
            from functions.devstack.nats_embedded import EmbeddedNats
            server = EmbeddedNats({str(tmp_path)!r}).start()
            print(server.proc.pid, flush=True)
            time.sleep(60)
            """
        )],
        env=agent_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
    finally:
        parent.kill()
    # Gone, or a zombie waiting for init to reap it: exited either way.
    eventually(lambda: not process_alive(pid), "nats-server to die with its parent", timeout=10)


def test_embedded_nats_reports_a_taken_port(tmp_path):
    with EmbeddedNats(tmp_path / "a") as first:
        with pytest.raises(Exception, match="nats-server exited"):
            EmbeddedNats(tmp_path / "b", port=first.port).start()
