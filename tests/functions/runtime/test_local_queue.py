"""Fair queueing in the LocalRuntime: at most N tasks run, the rest wait in submit order.

Real processes (the stand-in's `gate` task works until the test writes `go` into its
workspace), a fake clock for the submit times and the deadline.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from agent import contract
from functions.core.settings import Settings
from functions.core.tracker import apply_event
from functions.errors import SettingsError
from functions.runtime import make_runtime
from functions.runtime.local.admission import Admission
from tests.conftest import eventually_async
from tests.functions.runtime.local_stand_in import (
    Sink,
    lines,
    make_task,
    runtime_for,
    state_of,
    wait_finished,
    workspace,
)


class Recorder:
    """Stands in for the runtime's StatusEvents: what it would have published."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    async def publish(self, task_id: str, **fields) -> None:
        self.events.append((task_id, fields))

    async def close(self) -> None:
        pass


def started(runtime, task_id: str) -> bool:
    return bool(lines(workspace(runtime, task_id) / "runs.log"))


def running(runtime, ids) -> list[str]:
    """The tasks whose agent has started and not finished."""
    return [t for t in ids if started(runtime, t) and not state_of(runtime, t).finished]


def release(runtime, task_id: str) -> None:
    (workspace(runtime, task_id) / "go").write_text("")


async def test_at_most_n_run_the_rest_start_in_submit_order_as_others_finish(tmp_path, stand_in, clock):
    sink, status = Sink(), Recorder()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, max_running=2)
    runtime.policy.status = status
    ids = ["q-5", "q-1", "q-4", "q-2", "q-3"]  # submit order, not name order
    try:
        for task_id in ids:
            assert await runtime.launch(make_task("gate", task_id=task_id)) is True
        await eventually_async(lambda: running(runtime, ids) == ["q-5", "q-1"], "the first two submitted to start")
        assert runtime.admission.queued() == ["q-4", "q-2", "q-3"]
        for task_id in ("q-4", "q-2", "q-3"):
            state = state_of(runtime, task_id)
            assert (state.state, state.started_at, state.attempts) == (contract.STATE_QUEUED, None, 0)
            assert lines(workspace(runtime, task_id) / "restore.log") == []  # nothing of it ran
        queued = [(t, f) for t, f in status.events if f["state"] == contract.STATE_QUEUED]
        assert queued == [("q-4", {"state": "queued", "position": 1}), ("q-2", {"state": "queued", "position": 2}),
                          ("q-3", {"state": "queued", "position": 3})]
        # The trace's queued event leaves the registry record queued, position and all.
        record = apply_event({"task_id": "q-2", "state": "queued"}, {"type": "status", **queued[1][1]}, 7)
        assert record["state"] == "queued" and not record.get("attempts")

        order = ["q-5", "q-1"]
        for finishing in ("q-1", "q-5", "q-4", "q-2"):
            release(runtime, finishing)
            await wait_finished(runtime, sink, finishing)
            expected = min(len(order) + 1, len(ids))
            await eventually_async(lambda n=expected: len([t for t in ids if started(runtime, t)]) == n,
                                   f"the next task to start once {finishing} finished")
            newly = [t for t in ids if started(runtime, t) and t not in order]
            order += newly
            assert len(running(runtime, ids)) <= 2
        assert order == ids
        release(runtime, "q-3")
        await wait_finished(runtime, sink, "q-3")
    finally:
        await runtime.close()
    assert all(state_of(runtime, t).outcome == "done" for t in ids)
    assert runtime.admission.running == 0


async def test_queue_time_does_not_count_against_the_deadline(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, max_running=1)
    try:
        await runtime.launch(make_task("gate", task_id="first"))
        await runtime.launch(make_task("gate", task_id="second", deadline_seconds=10))
        await eventually_async(lambda: started(runtime, "first"), "the first task to start")
        created = state_of(runtime, "second").created_at
        clock.advance(100)  # ten times the second task's deadline, spent queued
        release(runtime, "first")
        await eventually_async(lambda: started(runtime, "second"), "the second task to start")
        state = state_of(runtime, "second")
        assert state.started_at == created + 100 and state.state == contract.STATE_STARTED
        assert 10 in clock.pending()  # its deadline counts from its start
        release(runtime, "second")
        state = await wait_finished(runtime, sink, "second")
    finally:
        await runtime.close()
    assert state.outcome == "done"


async def test_a_restart_keeps_the_queue_in_submit_order(tmp_path, stand_in, clock):
    first = runtime_for(tmp_path, stand_in, Sink(), clock, max_running=1)
    ids = ["r-b", "r-c", "r-a"]
    for task_id in ids:
        await first.launch(make_task("gate", task_id=task_id))
        clock.advance(1)
    await eventually_async(lambda: started(first, "r-b"), "the first task to start")
    await first.close()  # Ctrl-C of `dockyard dev`
    assert [state_of(first, t).state for t in ids] == [contract.STATE_STARTED, contract.STATE_QUEUED, contract.STATE_QUEUED]
    assert not started(first, "r-c") and not started(first, "r-a")

    sink = Sink()
    second = runtime_for(tmp_path, stand_in, sink, clock, max_running=1)
    try:
        assert await second.resume_running() == ["r-b", "r-c", "r-a"]
        await eventually_async(lambda: len(lines(workspace(second, "r-b") / "runs.log")) == 2, "r-b to resume first")
        assert second.admission.queued() == ["r-c", "r-a"]
        order = []
        for task_id in ids:
            await eventually_async(lambda t=task_id: started(second, t) and running(second, ids) == [t], f"{task_id} to run alone")
            order.append(task_id)
            release(second, task_id)
            await wait_finished(second, sink, task_id)
    finally:
        await second.close()
    assert order == ids
    assert [state_of(second, t).exit_codes for t in ids] == [[143, 0], [0], [0]]


async def test_cancel_while_queued_finishes_it_cancelled_without_running_anything(tmp_path, stand_in, clock):
    sink = Sink()
    runtime = runtime_for(tmp_path, stand_in, sink, clock, max_running=1)
    try:
        await runtime.launch(make_task("gate", task_id="runs"))
        await runtime.launch(make_task("gate", task_id="waits"))
        await eventually_async(lambda: started(runtime, "runs"), "the first task to start")
        await runtime.cancel("waits")
        state = await wait_finished(runtime, sink, "waits")
        assert (state.outcome, state.reason, state.attempts, state.started_at) == ("cancelled", "Cancelled", 0, None)
        assert lines(workspace(runtime, "waits") / "restore.log") == [] and not started(runtime, "waits")
        assert runtime.admission.queued() == [] and runtime.admission.running == 1
        assert running(runtime, ["runs"]) == ["runs"]
        release(runtime, "runs")
        await wait_finished(runtime, sink, "runs")
    finally:
        await runtime.close()
    assert runtime.admission.running == 0


async def test_admission_grants_in_key_order_and_an_interrupted_waiter_holds_nothing():
    admission = Admission(1)
    assert admission.enqueue("a", (1, 5.0)) is None  # a free slot: taken at once
    later, earlier, resumed = admission.enqueue("later", (1, 9.0)), admission.enqueue("earlier", (1, 7.0)), admission.enqueue("resumed", (0, 8.0))
    assert admission.queued() == ["resumed", "earlier", "later"] and admission.position("earlier") == 2
    stop = asyncio.Event()
    stop.set()
    assert await admission.wait("resumed", resumed, stop) is False  # cancelled while queued
    assert admission.queued() == ["earlier", "later"]
    admission.release("a")
    assert await admission.wait("earlier", earlier, asyncio.Event()) is True and admission.running == 1
    assert not later.done()
    later_stop = asyncio.Event()
    admission.release("earlier")  # granted to "later" ...
    later_stop.set()  # ... which was stopped in the same instant: it hands the slot on
    assert await admission.wait("later", later, later_stop) is False and admission.running == 0


def test_max_running_comes_from_the_settings(tmp_path):
    async def emit(event):
        pass

    assert make_runtime(Settings(data_dir=tmp_path, max_running=3), emit_job_event=emit).admission.limit == 3
    assert make_runtime(Settings(data_dir=tmp_path), emit_job_event=emit).admission.limit == os.cpu_count()
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"DOCKYARD_MAX_RUNNING": "-1"})
    assert err.value.field == "DOCKYARD_MAX_RUNNING"
