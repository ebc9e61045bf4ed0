"""One task's Job controller, imitated: attempts, retries with backoff, the deadline, the job event.

Invariants
- Every attempt runs `restore`, then the agent. The snapshotter runs beside the
  agent for the whole task and gets SIGTERM only once the agent has exited for
  good, so its final upload sees the final workspace.
- Retries follow the Job: exponential backoff (`backoff_seconds` doubling up to
  `backoff_max_seconds`, never past the deadline), at most `limits.retries`
  failed attempts after the first; the exit codes in
  `contract.NO_RETRY_EXIT_CODES` fail the task at once (podFailurePolicy); the
  deadline counts from the first start, across restarts.
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
import time
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
from functions.runtime.local.processes import (
    AgentCommand,
    Children,
    exit_code,
    reap_orphans,
)
from functions.runtime.local.state import SupervisorState, TaskFolders
from functions.runtime.local.status_events import StatusEvents
from functions.runtime.local.template import WarmTemplate

log = logging.getLogger("dockyard.runtime.local")

EmitJobEvent = Callable[[dict], Awaitable[Any]]

TERMINATION_MESSAGE_BYTES = 2048  # what Kubernetes keeps of a termination message
TERMINATION_MESSAGE_LINES = 80  # FallbackToLogsOnError: the last 80 lines of the log
REDELIVERY_FIRST_SECONDS = 0.5
REDELIVERY_MAX_SECONDS = 30.0
ROLES = ("restore", "agent", "snapshotter")


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
        self.children = Children(self.folder, policy.env, state.pgids, self._save, state.starts, policy.template)
        self.stop_reason: str | None = None  # "cancel" or "shutdown"
        self.interrupt = asyncio.Event()
        self.runner: asyncio.Task | None = None

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
        await self.children.wait_gone("agent", self.policy.grace_seconds + 5)

    async def run(self) -> None:
        policy = self.policy
        try:
            if self.state.pgids:
                await reap_orphans(self.state.pgids, self.state.task_id, policy.grace_seconds, self.state.starts)
                self._save()
            if not self.state.finished:
                admitted = await self._admitted()
                try:
                    await self._attempts()  # not admitted: a cancel finishes it here, a shutdown leaves it queued
                finally:
                    if admitted:
                        policy.admission.release(self.state.task_id)
            if self.state.finished:
                await self._stop_snapshotter()
                await self._deliver_job_event()
        except Exception:
            log.exception("supervising task %s failed; it is picked up again on the next start", self.state.task_id)
        finally:
            for role in ROLES:
                await self.children.stop(role, policy.snapshotter_grace_seconds if role == "snapshotter" else policy.grace_seconds)

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
        state, limits, policy = self.state, self.task.limits, self.policy
        while True:
            if self.stop_reason == "shutdown":
                return
            if self.stop_reason == "cancel":
                return self._finish(contract.OUTCOME_CANCELLED, REASON_CANCELLED, "cancelled by request")
            if state.started_at is None:
                state.started_at = policy.clock.time()
                self._save()
            if self._deadline_left() <= 0:
                return self._finish_deadline()

            state.state = contract.STATE_STARTED
            self._save()
            code, stopped_by = await self._one_attempt()
            if stopped_by == "shutdown":
                return
            if stopped_by == "cancel":
                return self._finish(contract.OUTCOME_CANCELLED, REASON_CANCELLED, "cancelled by request")
            if stopped_by == "deadline":
                return self._finish_deadline()

            if self._finished_by_exit(code):
                return

            state.failures += 1
            if state.failures > limits.retries:
                return self._finish(contract.OUTCOME_FAILED, REASON_BACKOFF, "Job has reached the specified backoff limit")
            delay = policy.backoff(state.failures)
            state.state = contract.STATE_RETRYING
            self._save()
            await policy.status.publish(
                state.task_id,
                state=contract.STATE_RETRYING,
                attempt=state.attempts + 1,
                exit_code=code,
                retries_left=limits.retries - state.failures,
                backoff_seconds=delay,
            )
            log.info("task %s: attempt %d exited %s, retrying in %.1fs", state.task_id, state.attempts, code, delay)
            await sleep_unless(policy.clock, self.interrupt, min(delay, max(self._deadline_left(), 0)))

    def _finished_by_exit(self, code: int) -> bool:
        """Finish the task if the agent's exit code ends it (success, or a FailJob code), as the Job would."""
        if code == contract.EXIT_DONE:
            # The agent stops itself at a budget or its own deadline with exit 0 too.
            outcome = self.policy.folders.read_result(self.state.task_id).get("outcome")
            if outcome not in (contract.OUTCOME_DONE, contract.OUTCOME_BUDGET, contract.OUTCOME_DEADLINE):
                outcome = contract.OUTCOME_DONE
            self._finish(outcome, REASON_COMPLETE, "Reached expected number of succeeded pods")
            return True
        if code in contract.NO_RETRY_EXIT_CODES:
            outcome = contract.OUTCOME_CANCELLED if code == contract.EXIT_CANCELLED else contract.OUTCOME_FAILED
            self._finish(outcome, REASON_FAILURE_POLICY, f"Container agent failed with exit code {code} matching FailJob rule")
            return True
        return False

    async def _one_attempt(self) -> tuple[int, str | None]:
        """Run restore, then the agent. Returns (exit code, what stopped it early if anything)."""
        state, command = self.state, self.policy.command
        code, stopped_by = await self._run_child("restore", command.line(self.task, "restore", self.folder))
        if stopped_by or code != 0:
            if not stopped_by:
                state.attempts += 1
                state.exit_codes.append(code)
                state.termination_message = f"restore exited with code {code}; see {self.folder.log('restore')}"
                self._save()
            return code, stopped_by
        await self._ensure_snapshotter()
        state.attempts += 1
        self._save()
        began = time.time()  # compared with the result file's mtime: the real clock, as the file system's
        code, stopped_by = await self._run_child("agent", command.line(self.task, "run", self.folder))
        state.exit_codes.append(code)
        state.termination_message = self._termination_message(code, began)
        self._save()
        return code, stopped_by

    async def _run_child(self, role: str, argv: list[str]) -> tuple[int, str | None]:
        """Run one child until it exits, or until a cancel, a shutdown or the deadline stops it."""
        proc = await self.children.start(role, argv)
        waiter = asyncio.ensure_future(proc.wait())
        interrupted = asyncio.ensure_future(self.interrupt.wait())
        deadline = asyncio.ensure_future(self.policy.clock.sleep(max(self._deadline_left(), 0)))
        try:
            await asyncio.wait({waiter, interrupted, deadline}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
            deadline.cancel()
        stopped_by = None
        if proc.returncode is None:
            stopped_by = self.stop_reason or "deadline"
            waiter.cancel()
            await self.children.stop(role, self.policy.grace_seconds)
        else:
            await self.children.exited(role)
        return exit_code(proc.returncode), stopped_by

    async def _ensure_snapshotter(self) -> None:
        proc = self.children.procs.get("snapshotter")
        if proc is not None and proc.returncode is None:
            return
        if proc is not None:
            log.warning("task %s: snapshotter exited with %s; starting it again", self.state.task_id, proc.returncode)
        await self.children.start("snapshotter", self.policy.command.line(self.task, "snapshotter", self.folder))

    async def _stop_snapshotter(self) -> None:
        """SIGTERM makes the snapshotter take the final snapshot and upload it: wait for that."""
        await self.children.stop("snapshotter", self.policy.snapshotter_grace_seconds)

    # --- the end ---------------------------------------------------------------

    def _finish_deadline(self) -> None:
        seconds = self.task.limits.deadline_seconds
        self._finish(contract.OUTCOME_DEADLINE, REASON_DEADLINE, f"Job was active longer than specified deadline ({seconds}s)")

    def _finish(self, outcome: str, reason: str, message: str) -> None:
        state = self.state
        state.state = contract.STATE_FINISHED
        state.outcome, state.reason, state.message = outcome, reason, message
        state.finished_at = self.policy.clock.time()
        self._save()
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
            self._save()
            return

    def _termination_message(self, code: int, began: float) -> str | None:
        """The summary the agent left in its result file during this attempt; else, on failure,
        the tail of its log (FallbackToLogsOnError)."""
        result_file = self.folder.result_file
        fresh = result_file.exists() and result_file.stat().st_mtime >= began - 1
        summary = self.policy.folders.read_result(self.state.task_id).get("summary") if fresh else None
        if summary:
            return str(summary).encode()[:TERMINATION_MESSAGE_BYTES].decode(errors="ignore")
        if code == contract.EXIT_DONE:
            return None
        text = self.children.output_since_start("agent")
        if text is None:
            return None
        tail = "\n".join(text.splitlines()[-TERMINATION_MESSAGE_LINES:])
        return tail.encode()[-TERMINATION_MESSAGE_BYTES:].decode(errors="ignore") or None

    # --- small helpers -----------------------------------------------------------

    def _deadline_left(self) -> float:
        now = self.policy.clock.time()
        started = self.state.started_at or now
        return started + self.task.limits.deadline_seconds - now

    def _save(self) -> None:
        self.policy.folders.save(self.state)
