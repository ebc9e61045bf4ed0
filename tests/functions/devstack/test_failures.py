"""Failures a person understands (issue 12, item 4), end to end through `dockyard dev`: the real agent,
the real local runtime and functions, a real nats-server. The record, the terminal status event and
`dockyard tasks` / `dockyard logs` say the reason in words, its class, the attempts counted right,
and for a deadline its limit and the time queued before the first start."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import nats
import pytest
import yaml

from agent import contract
from functions.cli import client
from functions.cli import main as cli
from tests.dev_process import DevServer
from tests.functions.devstack.test_dev import collect, example_task, wait_record

SLEEPY = [  # a task that runs until its deadline stops it
    {"tool_calls": [{"name": "plan", "args": {"todos": ["wait"], "objective": "wait"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": "sleep 600", "timeout_seconds": 900}}]},
]


@pytest.fixture
def dev(tmp_path):
    started: list[DevServer] = []

    def make(*args: str, env: dict[str, str] | None = None) -> DevServer:
        started.append(DevServer(tmp_path / "data", env=env, args=args).start())
        return started[-1]

    yield make
    for server in started:
        server.stop()


def finished_event(dev: DevServer, task_id: str) -> dict:
    """job_finished's terminal status event (the one with `attempts`), read from the task's JetStream
    subject, with the states of every status event before it in `_states` and the agent's own terminal
    event, if any, in `_agent`."""

    async def read() -> dict:
        nc = await nats.connect(dev.nats_url, **dev.nats_connect_options)
        try:
            sub = await nc.jetstream().subscribe(contract.subject_events(task_id), ordered_consumer=True)
            states, agents = [], []
            while True:
                event = json.loads((await sub.next_msg(timeout=60)).data)
                if event.get("type") != contract.EV_STATUS:
                    continue
                states.append(event.get("state"))
                if event.get("state") == contract.STATE_FINISHED and "attempts" not in event:
                    agents.append(event)  # the agent's own
                if event.get("state") == contract.STATE_FINISHED and "attempts" in event:
                    return {**event, "_states": states, "_agent": agents[0] if agents else {}}
        finally:
            await nc.close()

    return asyncio.run(read())


def test_an_unclonable_repository_fails_fatal_in_words_after_one_attempt_without_a_retry(dev, tmp_path, capsys):
    server = dev("--allow-file-repos")
    task = {**example_task(), "task_id": "noclone", "repo": {"url": (tmp_path / "no-such-repo").as_uri()}}
    task_id = client.submit_task(server.url, task, server.token)
    record = wait_record(server.token, server.url, task_id)
    assert (record["outcome"], record["failure_class"], record["reason"]) == (
        contract.OUTCOME_FAILED, contract.FAILURE_FATAL, "git clone failed: repository not found")
    assert record["attempts"] == 1 and record["detail"]
    assert server.supervisor_state(task_id)["exit_codes"] == [contract.EXIT_FATAL]  # exit 3: FailJob, no retry
    end = finished_event(server, task_id)
    assert contract.STATE_RETRYING not in end["_states"]
    # The agent's own terminal event, first, holds what lies behind the reason. (The record has it too
    # unless the final set was lost and job_finished ran before the tracker: then the agent's summary.)
    assert "no-such-repo" in end["_agent"]["detail"] and end["_agent"]["failure_class"] == "fatal"
    assert (end["reason"], end["failure_class"], end["attempts"]) == (record["reason"], "fatal", 1)
    assert record["started_at"] and record["queued_seconds"] is not None and record["finished_at"]

    assert cli.main(["tasks", "--url", server.url, "--token", server.token]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(task_id)]
    assert "failed (fatal)" in row and row.rstrip().endswith("git clone failed: repository not found")


def test_a_deadline_states_its_limit_and_counts_from_the_first_start_not_from_the_queue(dev, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "sleepy.yaml").write_text(yaml.safe_dump(SLEEPY))
    server = dev("--max-running", "1", env={"DOCKYARD_SCRIPTS_DIR": str(scripts)})
    sleepy = {"prompt": "wait", "model": "scripted:sleepy"}
    first = client.submit_task(server.url, {**sleepy, "task_id": "holds-the-slot", "limits": {"deadline_seconds": 8}}, server.token)
    queued = client.submit_task(server.url, {**sleepy, "task_id": "queued-behind", "limits": {"deadline_seconds": 5}}, server.token)

    held = wait_record(server.token, server.url, first)
    record = wait_record(server.token, server.url, queued)
    assert held["outcome"] == record["outcome"] == contract.OUTCOME_DEADLINE
    # It waited the whole of the first task's run (at least its 8 s deadline), longer than its own limit:
    # counted from submission it would have ended at its admission, without a start.
    assert record["queued_seconds"] >= 7 > record["deadline_seconds"] == 5
    assert record["attempts"] == 1 and record["failure_class"] == contract.FAILURE_TRANSIENT
    assert record["reason"] == "the deadline of 5 s passed, counted from the first start"
    assert record["started_at"] >= held["started_at"]
    end = finished_event(server, queued)
    assert (end["deadline_seconds"], end["queued_seconds"]) == (5, record["queued_seconds"])


def test_a_transient_crash_is_retried_and_counted_and_with_no_retries_left_it_fails_transient(dev):
    server = dev()
    for task in ({"task_id": "crashes-once"}, {"task_id": "crashes-out", "limits": {"retries": 0}}):
        task_id = client.submit_task(server.url, {**example_task(), **task}, server.token)
        killed: list[int] = []

        def kill_at_first_tool(message, task_id=task_id, killed=killed) -> bool:
            if message.event == contract.EV_TOOL and not killed:
                pid = server.supervisor_state(task_id)["pgids"]["agent"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return message.event == "end"

        asyncio.run(collect(server.token, server.url, task_id, until=kill_at_first_tool, timeout=180))
        assert killed
    retried, last_try = "crashes-once", "crashes-out"

    record = wait_record(server.token, server.url, retried)
    assert (record["outcome"], record["attempts"], record.get("failure_class")) == (contract.OUTCOME_DONE, 2, None)
    assert server.supervisor_state(retried)["exit_codes"] == [137, 0]

    record = wait_record(server.token, server.url, last_try)
    assert (record["outcome"], record["failure_class"], record["attempts"]) == (contract.OUTCOME_FAILED, contract.FAILURE_TRANSIENT, 1)
    assert record["reason"].startswith("the agent failed, with no retry left: ")
    body = httpx.get(f"{server.url}/api/tasks/{last_try}", headers=server.headers, timeout=5).json()
    assert body["reason"] == record["reason"]
