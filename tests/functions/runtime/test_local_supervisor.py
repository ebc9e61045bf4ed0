"""The Job controller imitation: retries, backoff, the deadline and the job event's delivery.

Real child processes (a stand-in for the agent) on a fake clock: every backoff and
deadline is a wait on the clock, so the tests see each one begin, check its length,
and end it by moving time on; nothing waits for wall time to pass.
"""

from __future__ import annotations

import json

import pytest

from agent import contract
from tests.conftest import eventually_async
from tests.functions.runtime.local_stand_in import (
    Sink,
    condition,
    lines,
    make_task,
    runtime_for,
    state_of,
    wait_backoff,
    wait_finished,
    workspace,
)


async def test_retries_with_exponential_backoff_then_completes(tmp_path, stand_in, clock, nats_server):

    nc = await nats_server.connect()
    retrying = []

    async def on_msg(msg):
        retrying.append(json.loads(msg.data))

    await nc.subscribe(contract.subject_events("t-1"), cb=on_msg)
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, nats_url=nats_server.url, backoff_seconds=2.0,
                          nats_creds=nats_server.creds("functions"))
    ws = workspace(runtime)
    sink.on_event = lambda event: (ws / "emitted.log").write_text("\n".join(lines(ws / "snapshotter.log")))
    try:
        assert await runtime.launch(make_task("exit:1,1,0")) is True
        for failures, backoff in ((1, 2.0), (2, 4.0)):  # doubling
            await wait_backoff(runtime, clock, failures, backoff)
            clock.advance(backoff - 0.5)
            assert 0.5 in clock.pending()  # still waiting: the next attempt starts when the backoff is over
            assert len(lines(ws / "runs.log")) == failures
            clock.advance(0.5)
        state = await wait_finished(runtime, sink)
        await eventually_async(lambda: len(retrying) == 2, "two retrying events")
    finally:
        await runtime.close()
        await nc.close()

    assert (state.outcome, state.attempts, state.exit_codes) == ("done", 3, [1, 1, 0])
    assert state.finished_at - state.started_at == 6.0  # 2 s, then 4 s of backoff on the clock
    assert len(lines(ws / "restore.log")) == 3  # restore before every attempt, like an init container
    # One snapshotter for the whole task, stopped (final upload) before the job event went out.
    assert lines(ws / "emitted.log") == ["start", "final"]
    assert [(e["state"], e["attempt"], e["exit_code"], e["backoff_seconds"]) for e in retrying] == [
        ("retrying", 2, 1, 2.0),
        ("retrying", 3, 1, 4.0),
    ]
    assert all(e["type"] == contract.EV_STATUS and e["task_id"] == "t-1" and e["source"] == "runtime" for e in retrying)

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


async def test_the_backoff_is_capped(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, backoff_seconds=2.0, backoff_max_seconds=5.0)
    try:
        await runtime.launch(make_task("exit:1,1,1,0", retries=3))
        for failures, backoff in ((1, 2.0), (2, 4.0), (3, 5.0)):
            await wait_backoff(runtime, clock, failures, backoff)
            clock.advance(backoff)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.exit_codes) == ("done", [1, 1, 1, 0])


async def test_retries_stop_at_the_limit(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        await runtime.launch(make_task("exit:1", retries=2))
        for failures, backoff in ((1, 2.0), (2, 4.0)):
            await wait_backoff(runtime, clock, failures, backoff)
            clock.advance(backoff)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.reason, state.exit_codes) == ("failed", "BackoffLimitExceeded", [1, 1, 1])
    job = sink.events[0]["data"]
    assert condition(sink.events[0])["type"] == "Failed"
    assert (job["status"]["succeeded"], job["status"]["failed"]) == (0, 3)
    # FallbackToLogsOnError: the tail of the last attempt's log.
    assert job["status"]["terminationMessage"].strip() == "stand-in attempt 3 exits with 1"


@pytest.mark.parametrize("code,outcome", [(contract.EXIT_FATAL, "failed"), (contract.EXIT_CANCELLED, "cancelled")])
async def test_no_retry_exit_codes_fail_at_once(tmp_path, stand_in, clock, code, outcome):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        await runtime.launch(make_task(f"exit:{code},0", retries=3))
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.reason, state.attempts) == (outcome, "PodFailurePolicy", 1)
    assert condition(sink.events[0])["type"] == "Failed"


async def test_restore_failure_counts_as_a_failed_attempt(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, env={"STANDIN_RESTORE_EXIT": "1"})
    try:
        await runtime.launch(make_task("exit:0", retries=1))
        await wait_backoff(runtime, clock, 1, 2.0)
        clock.advance(2.0)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.reason, state.exit_codes) == ("failed", "BackoffLimitExceeded", [1, 1])
    assert not lines(workspace(runtime) / "runs.log")  # the agent never started
    assert "restore exited with code 1" in sink.events[0]["data"]["status"]["terminationMessage"]


async def test_the_deadline_stops_the_agent(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    runs = workspace(runtime) / "runs.log"
    try:
        await runtime.launch(make_task("sleep:600", deadline_seconds=5))
        # Once the agent runs, the only 5 s wait is its deadline (restore's ended before it started).
        await eventually_async(lambda: lines(runs) and 5.0 in clock.pending(), "the agent running against its deadline")
        clock.advance(4.5)
        assert state_of(runtime).state == contract.STATE_STARTED
        clock.advance(0.5)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.reason, state.exit_codes) == ("deadline", "DeadlineExceeded", [143])
    assert condition(sink.events[0])["type"] == "Failed"
    assert condition(sink.events[0])["message"] == "Job was active longer than specified deadline (5s)"


async def test_a_backoff_never_outlasts_the_deadline(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, backoff_seconds=2.0)
    try:
        await runtime.launch(make_task("exit:1", retries=5, deadline_seconds=3))
        await wait_backoff(runtime, clock, 1, 2.0)
        clock.advance(2.0)
        await wait_backoff(runtime, clock, 2, 1.0)  # 4 s by the doubling, but 1 s is left of the deadline
        clock.advance(1.0)
        state = await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert (state.outcome, state.reason, state.exit_codes) == ("deadline", "DeadlineExceeded", [1, 1])


async def test_the_deadline_counts_from_the_first_start_across_restarts(tmp_path, stand_in, clock):
    first = runtime_for(tmp_path, stand_in, Sink(), clock)
    await first.launch(make_task("resume", deadline_seconds=10))
    await eventually_async(lambda: lines(workspace(first) / "runs.log"), "the agent to start")
    await first.close()
    clock.advance(10)  # `dockyard dev` was stopped for as long as the deadline

    sink = Sink()
    second = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        assert await second.resume_running() == ["t-1"]
        state = await wait_finished(second, sink)
    finally:
        await second.close()
    assert (state.outcome, state.reason, state.exit_codes) == ("deadline", "DeadlineExceeded", [143])
    assert len(lines(workspace(second) / "runs.log")) == 1  # not started again


async def test_job_event_delivery_is_retried_with_backoff(tmp_path, stand_in, clock):
    sink = Sink(fail_first=2)
    runtime = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        await runtime.launch(make_task("exit:0"))
        for calls, backoff in ((1, 0.5), (2, 1.0)):
            await eventually_async(
                lambda calls=calls, backoff=backoff: sink.calls == calls and backoff in clock.pending(), f"redelivery in {backoff}s"
            )
            clock.advance(backoff)
        await wait_finished(runtime, sink)
    finally:
        await runtime.close()
    assert sink.calls == 3 and len(sink.events) == 1


async def test_a_job_event_still_owed_is_delivered_by_the_next_start(tmp_path, stand_in, clock):
    first_sink = Sink(fail_first=1)
    first = runtime_for(tmp_path, stand_in, first_sink, clock)
    await first.launch(make_task("exit:0"))
    await eventually_async(lambda: first_sink.calls == 1 and 0.5 in clock.pending(), "a failed delivery waiting to retry")
    await first.close()  # shutdown ends the wait: the event stays owed
    state = state_of(first)
    assert state.finished and not state.event_sent and first_sink.events == []

    sink = Sink()
    second = runtime_for(tmp_path, stand_in, sink, clock)
    try:
        assert await second.resume_running() == ["t-1"]
        await wait_finished(second, sink)
    finally:
        await second.close()
    assert len(sink.events) == 1 and sink.events[0]["id"] == f"{state.uid}-finished"
    assert len(lines(workspace(second) / "runs.log")) == 1  # only the event was left to do
