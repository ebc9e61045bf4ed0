"""One task's Job controller, imitated: attempts, retries with backoff, the deadline, the job event.

Invariants
- Where an attempt's containers run is a `Pod` (pod.py): child processes by default
  (`processes.LocalPod`: restore, then the agent, the snapshotter beside it for the whole
  task), or a podman pod (functions.runtime.podman). The rules come from its `JobSpec`.
- Retries follow the Job: exponential backoff (`backoff_seconds` doubling up to
  `backoff_max_seconds`, never past the deadline), at most `backoffLimit`
  failed attempts after the first; the podFailurePolicy's FailJob exit codes
  fail the task at once; the deadline counts from the first start, across restarts.
- The state is saved after every change, so a supervisor started over the same
  folder by a new process continues: it reaps children a crash left behind,
  resumes the attempts (the agent resumes from its checkpoint) or delivers a
  job event still owed.
- The job event is delivered until the sink takes it (backoff 0.5 s doubling to
  30 s), or until shutdown; the next start delivers it then.
- A task runs only once `Policy.admission` grants it a slot, held until its
  agent has exited for good (the final snapshot, mostly waiting on the store,
  is taken outside it) or a shutdown stops it; while queued its state stays
  `queued` and nothing runs.
- Every wait (backoff, deadline, redelivery) is on the injected `Clock`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent import contract
from functions.core.task import Task
from functions.runtime.local.admission import Admission
from functions.runtime.local.clock import Clock, sleep_unless
from functions.runtime.local.job_event import (
    REASON_BACKOFF,
    REASON_CANCELLED,
    REASON_COMPLETE,
    REASON_DEADLINE,
    REASON_FAILURE_POLICY,
    job_event,
)
from functions.runtime.local.pod import AttemptEnd, JobSpec, Pod
from functions.runtime.local.processes import AgentCommand, LocalPod
from functions.runtime.local.state import SupervisorState, TaskFolders
from functions.runtime.local.status_events import StatusEvents
from functions.runtime.local.template import WarmTemplate

log = logging.getLogger("dockyard.runtime.local")

EmitJobEvent = Callable[[dict], Awaitable[Any]]

REDELIVERY_FIRST_SECONDS = 0.5
REDELIVERY_MAX_SECONDS = 30.0


@dataclass
class Policy:
    """What every task's supervisor shares: where things are, what to run, and the timings."""

    folders: TaskFolders
    command: AgentCommand
    env: dict[str, str]
    emit_job_event: EmitJobEvent
    status: StatusEvents
    clock: Clock
    shutdown: asyncio.Event
    backoff_seconds: float = 2.0
    backoff_max_seconds: float = 60.0
    grace_seconds: float = 10.0
    snapshotter_grace_seconds: float = 120.0
    admission: Admission = field(default_factory=Admission)
    prepare: Callable[[Task], None] | None = None  # once admitted, before the first child (the task's credentials)
    template: WarmTemplate | None = None  # forks restore and the agent pre-imported; None: every child is exec'd
    # Where attempts run, and the Job spec they obey; None: child processes, the spec from the task.
    make_pod: Callable[[TaskSupervisor], tuple[Pod, JobSpec]] | None = None

    def backoff(self, failures: int) -> float:
        """The wait after the `failures`-th failed attempt: doubling, capped."""
        return min(self.backoff_seconds * 2 ** (failures - 1), self.backoff_max_seconds)


class TaskSupervisor:
    """Runs one task to its end (or until shutdown): `start()`, then `cancel()` or `shutdown()`."""

    def __init__(self, policy: Policy, state: SupervisorState, task: Task):
        self.policy = policy
        self.state = state
        self.task = task
        self.folder = policy.folders.folder(state.task_id)
        self.clock = policy.clock
        self.stop_reason: str | None = None  # "cancel" or "shutdown"
        self.interrupt = asyncio.Event()
        self.runner: asyncio.Task | None = None
        if policy.make_pod is not None:
            self.pod, self.spec = policy.make_pod(self)
        else:
            self.spec = JobSpec.for_task(task, policy.grace_seconds)
            self.pod = LocalPod(self, policy.command, policy.env, self.spec, policy.snapshotter_grace_seconds,
                                lambda: policy.folders.read_result(state.task_id).get("summary"), policy.template)

    def start(self, on_done: Callable[[TaskSupervisor], None]) -> None:
        async def run() -> None:
            try:
                await self.run()
            finally:
                on_done(self)

        self.runner = asyncio.get_running_loop().create_task(run(), name=f"supervise-{self.state.task_id}")

    def stop(self, reason: str) -> None:
        """Ask the supervision to end: "cancel" finishes the task, "shutdown" leaves it to the next
        start. A cancel wins over a shutdown, never the other way round."""
        if reason == "cancel" or self.stop_reason is None:
            self.stop_reason = reason
        self.interrupt.set()

    async def agent_gone(self) -> None:
        """Wait until the agent has exited (SIGTERM, grace, SIGKILL take at most the grace period)."""
        await self.pod.agent_gone()

    async def run(self) -> None:
        policy = self.policy
        try:
            await self.pod.recover()
            if not self.state.finished:
                admitted = await self._admitted()
                try:
                    await self._attempts()  # not admitted: a cancel finishes it here, a shutdown leaves it queued
                finally:
                    if admitted:
                        policy.admission.release(self.state.task_id)
            if self.state.finished:
                await self.pod.finish()
                await self._deliver_job_event()
        except Exception:
            log.exception("supervising task %s failed; it is picked up again on the next start", self.state.task_id)
        finally:
            await self.pod.close()

    # --- admission -----------------------------------------------------------

    async def _admitted(self) -> bool:
        """Wait for a slot (False: stopped while queued). Queue time does not count against the deadline:
        it counts from the first start, as a Job's activeDeadlineSeconds (a Kueue-suspended Job's clock stands)."""
        state, admission = self.state, self.policy.admission
        never_started = state.started_at is None
        future = admission.enqueue(state.task_id, (int(never_started), state.created_at))
        if future is not None:
            position = admission.position(state.task_id)
            log.info("task %s queued at position %s (%d running)", state.task_id, position, admission.running)
            if never_started:  # a started task that waits again (a lower limit after a restart) keeps its state
                await self.policy.status.publish(state.task_id, state=contract.STATE_QUEUED, position=position)
        admitted = await admission.wait(state.task_id, future, self.interrupt)
        if admitted and self.policy.prepare is not None:
            try:
                self.policy.prepare(self.task)
            except BaseException:
                admission.release(state.task_id)
                raise
        return admitted

    # --- attempts ------------------------------------------------------------

    async def _attempts(self) -> None:
        state, spec, policy = self.state, self.spec, self.policy
        while True:
            if self.stop_reason == "shutdown":
                return
            if self.stop_reason == "cancel":
                return self._finish(contract.OUTCOME_CANCELLED, REASON_CANCELLED, "cancelled by request")
            if state.started_at is None:
                state.started_at = policy.clock.time()
                self.save()
            if self.deadline_left() <= 0:
                return self._finish_deadline()

            state.state = contract.STATE_STARTED
            self.save()
            end: AttemptEnd = await self.pod.run_attempt()
            code, stopped_by = end.code, end.stopped_by
            if stopped_by == "shutdown":
                return
            if stopped_by == "cancel":
                return self._finish(contract.OUTCOME_CANCELLED, REASON_CANCELLED, "cancelled by request")
            if stopped_by == "deadline":
                return self._finish_deadline()

            if self._finished_by_exit(end):
                return

            state.failures += 1
            if state.failures > spec.backoff_limit:
                return self._finish(contract.OUTCOME_FAILED, REASON_BACKOFF, "Job has reached the specified backoff limit")
            delay = policy.backoff(state.failures)
            state.state = contract.STATE_RETRYING
            self.save()
            await policy.status.publish(
                state.task_id,
                state=contract.STATE_RETRYING,
                attempt=state.attempts + 1,
                exit_code=code,
                retries_left=spec.backoff_limit - state.failures,
                backoff_seconds=delay,
            )
            log.info("task %s: attempt %d exited %s, retrying in %.1fs", state.task_id, state.attempts, code, delay)
            await sleep_unless(policy.clock, self.interrupt, min(delay, max(self.deadline_left(), 0)))

    def _finished_by_exit(self, end: AttemptEnd) -> bool:
        """Finish the task if the exit code ends it (the agent's success, or a FailJob code), as the Job would."""
        code = end.code
        if code == contract.EXIT_DONE and end.container == "agent":
            # The agent stops itself at a budget or its own deadline with exit 0 too.
            outcome = self.policy.folders.read_result(self.state.task_id).get("outcome")
            if outcome not in (contract.OUTCOME_DONE, contract.OUTCOME_BUDGET, contract.OUTCOME_DEADLINE):
                outcome = contract.OUTCOME_DONE
            self._finish(outcome, REASON_COMPLETE, "Reached expected number of succeeded pods")
            return True
        if self.spec.fails_job(end.container, code):
            cancelled = end.container == "agent" and code == contract.EXIT_CANCELLED
            outcome = contract.OUTCOME_CANCELLED if cancelled else contract.OUTCOME_FAILED
            message = f"Container {end.container} failed with exit code {code} matching FailJob rule"
            self._finish(outcome, REASON_FAILURE_POLICY, message)
            return True
        return False

    # --- the end ---------------------------------------------------------------

    def _finish_deadline(self) -> None:
        seconds = self.spec.deadline_seconds
        self._finish(contract.OUTCOME_DEADLINE, REASON_DEADLINE, f"Job was active longer than specified deadline ({seconds}s)")

    def _finish(self, outcome: str, reason: str, message: str) -> None:
        state = self.state
        state.state = contract.STATE_FINISHED
        state.outcome, state.reason, state.message = outcome, reason, message
        state.finished_at = self.policy.clock.time()
        self.save()
        log.info("task %s finished: %s (%s)", state.task_id, outcome, reason)

    async def _deliver_job_event(self) -> None:
        if self.state.event_sent:
            return
        event = job_event(self.state, self.task)
        delay = REDELIVERY_FIRST_SECONDS
        while True:
            try:
                await self.policy.emit_job_event(event)
            except Exception as exc:  # noqa: BLE001 - whatever the sink raises, try again later
                log.warning("task %s: delivering the job event failed (%s); retrying in %.1fs", self.state.task_id, exc, delay)
                if await sleep_unless(self.policy.clock, self.policy.shutdown, delay):
                    return  # shutting down: the next start delivers it
                delay = min(delay * 2, REDELIVERY_MAX_SECONDS)
                continue
            self.state.event_sent = True
            self.save()
            return

    # --- small helpers -----------------------------------------------------------

    def deadline_left(self) -> float:
        now = self.policy.clock.time()
        started = self.state.started_at or now
        return started + self.spec.deadline_seconds - now

    def save(self) -> None:
        self.policy.folders.save(self.state)
