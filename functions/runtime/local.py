"""Agents as child processes on this machine: the pod, mirrored.

Invariants
- A task owns the folder `<data_dir>/tasks/<id>/`: `workspace/` (the PVC),
  `home/` (the emptyDir), `task.json` (the downward-API file), `logs/`, and
  `supervisor.json`, the Job's status. That file is replaced atomically after
  every change, so a new LocalRuntime over the same folder continues where the
  last one stopped; the agent resumes from its checkpoint.
- Every attempt runs `restore`, then the agent. The snapshotter runs beside the
  agent for the whole task and gets SIGTERM only once the agent has exited for
  good, so its final upload sees the final workspace.
- Every child runs in its own process group and gets SIGTERM if this process
  dies. Stopping one is SIGTERM to its group, a grace period, then SIGKILL.
- Retries follow the Job: exponential backoff, at most `limits.retries` failed
  attempts after the first; the exit codes in `contract.NO_RETRY_EXIT_CODES`
  fail the task at once; the deadline counts from the first start, across restarts.
- The end of a task is reported as a `batch/v1` Job object in a
  `dev.knative.apiserver.resource.update` CloudEvent (ApiServerSource, Resource
  mode), so `job_finished` runs the same code here as in the cluster. Delivery
  is retried until it succeeds, also across restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

from agent import contract
from agent.procs import die_with_parent, group_alive, signal_group
from functions.core.runtime_api import TaskStatus
from functions.errors import LaunchConflict, TaskNotFound, TransientError
from functions.core.task import Limits, Task

log = logging.getLogger("dockyard.runtime.local")

STATE_FILE = "supervisor.json"
TERMINATION_MESSAGE_BYTES = 2048  # what Kubernetes keeps of a termination message
TERMINATION_MESSAGE_LINES = 80  # FallbackToLogsOnError: the last 80 lines of the log

# Job condition reasons, as the Job controller writes them.
REASON_COMPLETE = "CompletionsReached"
REASON_BACKOFF = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_FAILURE_POLICY = "PodFailurePolicy"
REASON_CANCELLED = "Cancelled"  # local only: a Job is deleted, a local task is stopped

EmitJobEvent = Callable[[dict], Awaitable[Any]]


def _now_iso(ts: float | None = None) -> str:
    when = datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class SupervisorState:
    """What `supervisor.json` holds: the Job's status and what is needed to pick it up again."""

    task_id: str
    spec_hash: str
    uid: str  # the Job's uid: one per launch, stable across restarts
    created_at: float
    state: str = contract.STATE_QUEUED
    attempts: int = 0  # agent runs started
    failures: int = 0  # attempts that count against limits.retries
    exit_codes: list[int] = field(default_factory=list)
    started_at: float | None = None  # first agent start; the deadline counts from here
    finished_at: float | None = None
    outcome: str | None = None
    reason: str | None = None  # the Job condition reason once finished
    message: str | None = None
    termination_message: str | None = None
    event_sent: bool = False
    workspace_removed: bool = False
    pgids: dict[str, int] = field(default_factory=dict)  # live process groups, reaped after a crash

    @property
    def finished(self) -> bool:
        return self.state == contract.STATE_FINISHED

    @classmethod
    def from_dict(cls, data: dict) -> "SupervisorState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class _Supervised:
    """A task this process supervises: its state, its children, and why it should stop."""

    state: SupervisorState
    task: Task
    stop_reason: str | None = None  # "cancel" or "shutdown"
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    log_offsets: dict[str, int] = field(default_factory=dict)
    runner: asyncio.Task | None = None


class LocalRuntime:
    """The Runtime for `dockyard dev`: restore, snapshotter and agent as child processes."""

    def __init__(
        self,
        data_dir: Path | str,
        nats_url: str | None,
        store_url: str,
        emit_job_event: EmitJobEvent,
        agent_cmd: Sequence[str] | None = None,
        *,
        env: dict[str, str] | None = None,
        default_model: str | None = None,
        secrets_dir: str | None = None,
        snapshot_interval: float | None = None,
        backoff_seconds: float = 2.0,
        backoff_max_seconds: float = 60.0,
        grace_seconds: float = 10.0,
        snapshotter_grace_seconds: float = 120.0,
        ttl_succeeded_seconds: float = 3600.0,
        ttl_failed_seconds: float = 7 * 24 * 3600.0,
        sweep_interval_seconds: float = 60.0,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.tasks_dir = self.data_dir / "tasks"
        self.nats_url = nats_url
        self.store_url = store_url
        self.emit_job_event = emit_job_event
        # `<agent_cmd> run|restore|snapshotter ...`: the agent CLI, or a stand-in in tests.
        self.agent_cmd = list(agent_cmd or [sys.executable, "-m", "agent"])
        self.env = self._child_env(env)
        self.default_model = default_model
        self.secrets_dir = secrets_dir
        self.snapshot_interval = snapshot_interval
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.grace_seconds = grace_seconds
        self.snapshotter_grace_seconds = snapshotter_grace_seconds
        self.ttl_succeeded_seconds = ttl_succeeded_seconds
        self.ttl_failed_seconds = ttl_failed_seconds
        self.sweep_interval_seconds = sweep_interval_seconds
        self._supervised: dict[str, _Supervised] = {}
        self._lock = asyncio.Lock()
        self._nc = None  # NATS connection for runtime status events, opened on first use
        self._janitor: asyncio.Task | None = None
        self._shutdown = asyncio.Event()
        self.tasks_dir.mkdir(parents=True, exist_ok=True)

    # --- the Runtime protocol ------------------------------------------------

    async def launch(self, task: Task) -> bool:
        if self._shutdown.is_set():
            raise TransientError("the local runtime is stopping; retry once `dockyard dev` runs again")
        async with self._lock:
            existing = self._load(task.task_id)
            if existing is not None:
                if existing.spec_hash != task.spec_hash:
                    raise LaunchConflict(
                        f"task {task.task_id} already exists with a different spec; submit under another task_id"
                    )
                if not existing.finished or not existing.event_sent:
                    self._supervise(existing, task)  # e.g. launched again before resume_running()
                return False
            paths = self.paths(task.task_id)
            for folder in (paths["workspace"], paths["home"], paths["logs"]):
                folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(paths["task"], task.to_json())
            state = SupervisorState(
                task_id=task.task_id, spec_hash=task.spec_hash, uid=str(uuid.uuid4()), created_at=time.time()
            )
            self._save(state)
            self._supervise(state, task)
            self._start_janitor()
            log.info("launched task %s (job uid %s)", task.task_id, state.uid)
            return True

    async def status(self, task_id: str) -> TaskStatus:
        state = self._current(task_id)
        if state is None:
            raise TaskNotFound(f"no task {task_id} in {self.tasks_dir}")
        return self._status_of(state)

    async def finished_job(self, task_id: str) -> dict | None:
        state = self._current(task_id)
        if state is None or not state.finished:
            return None
        return self.job_object(state, self._load_task(task_id))

    async def cancel(self, task_id: str) -> None:
        """Stop the agent (SIGTERM, grace, SIGKILL); the task finishes with outcome cancelled."""
        async with self._lock:
            state = self._current(task_id)
            if state is None:
                raise TaskNotFound(f"no task {task_id} in {self.tasks_dir}")
            if state.finished:
                return
            sup = self._supervised.get(task_id) or self._supervise(state, self._load_task(task_id))
            sup.stop_reason = "cancel"
            sup.interrupt.set()
        # Wait for the agent to be gone, not for the job event: its delivery may need this caller.
        deadline = time.monotonic() + self.grace_seconds + 5
        while "agent" in sup.procs and sup.procs["agent"].returncode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def list(self) -> list[TaskStatus]:
        statuses = []
        for folder in sorted(self.tasks_dir.iterdir()):
            state = self._current(folder.name)
            if state is not None:
                statuses.append(self._status_of(state))
        return statuses

    # --- lifecycle of this process -------------------------------------------

    async def resume_running(self, registry_records: Iterable[Any] = ()) -> list[str]:
        """Pick up what the last process left: every task whose folder says it is not finished
        is supervised again (its agent resumes from its checkpoint), and a job event that was
        never delivered is sent now. `registry_records` (entries of the task registry that are
        not finished) only serve to warn about tasks that have no folder here."""
        resumed = []
        async with self._lock:
            for folder in sorted(self.tasks_dir.iterdir()):
                state = self._load(folder.name)
                if state is None or folder.name in self._supervised:
                    continue
                if state.finished and state.event_sent:
                    continue
                self._supervise(state, self._load_task(state.task_id))
                resumed.append(state.task_id)
        for record in registry_records:
            task_id = _record_task_id(record)
            if task_id and self._load(task_id) is None:
                log.warning("task %s is unfinished in the registry but has no folder in %s", task_id, self.tasks_dir)
        if resumed:
            log.info("resumed %d task(s): %s", len(resumed), ", ".join(resumed))
        self._start_janitor()
        return resumed

    async def close(self) -> None:
        """Stop every agent (SIGTERM: it stops after its current step) and its snapshotter,
        leaving the tasks unfinished so the next process resumes them."""
        self._shutdown.set()
        if self._janitor:
            self._janitor.cancel()
        running = [sup.state.task_id for sup in self._supervised.values() if not sup.state.finished]
        if running:
            log.info("stopping %d agent(s) with SIGTERM; the next start resumes them: %s", len(running), ", ".join(running))
        for sup in list(self._supervised.values()):
            if sup.stop_reason is None:
                sup.stop_reason = "shutdown"
            sup.interrupt.set()
        runners = [sup.runner for sup in self._supervised.values() if sup.runner]
        if runners:
            await asyncio.gather(*runners, return_exceptions=True)
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self._nc = None

    async def sweep(self) -> None:
        """Deliver job events still owed, and remove the workspaces of tasks finished longer than
        their TTL ago (like ttlSecondsAfterFinished; a failed task is kept longer, to look into)
        once their final snapshot is in the store."""
        for folder in sorted(self.tasks_dir.iterdir()):
            state = self._load(folder.name)
            if state is None or not state.finished or folder.name in self._supervised:
                continue
            if not state.event_sent:
                self._supervise(state, self._load_task(state.task_id))
                continue
            ttl = self.ttl_succeeded_seconds if state.reason == REASON_COMPLETE else self.ttl_failed_seconds
            if state.workspace_removed or time.time() - (state.finished_at or 0) < ttl:
                continue
            if await self._final_snapshot_stored(state.task_id):
                paths = self.paths(state.task_id)
                shutil.rmtree(paths["workspace"], ignore_errors=True)
                shutil.rmtree(paths["home"], ignore_errors=True)
                state.workspace_removed = True
                self._save(state)
                log.info("removed the workspace of task %s (final snapshot stored)", state.task_id)

    # --- paths and persisted state -------------------------------------------

    def paths(self, task_id: str) -> dict[str, Path]:
        root = self.tasks_dir / task_id
        return {
            "root": root,
            "workspace": root / "workspace",
            "home": root / "home",
            "logs": root / "logs",
            "task": root / "task.json",
            "state": root / STATE_FILE,
            "result": root / "workspace" / contract.RESULT_FILE,
        }

    def _load(self, task_id: str) -> SupervisorState | None:
        if not contract.is_valid_task_id(task_id):
            return None
        try:
            return SupervisorState.from_dict(json.loads(self.paths(task_id)["state"].read_text()))
        except FileNotFoundError:
            return None

    def _current(self, task_id: str) -> SupervisorState | None:
        sup = self._supervised.get(task_id)
        return sup.state if sup else self._load(task_id)

    def _load_task(self, task_id: str) -> Task:
        """The task as launched: it was validated then, so it is rebuilt as it is."""
        data = json.loads(self.paths(task_id)["task"].read_text())
        return Task(
            task_id=data["task_id"],
            prompt=data["prompt"],
            limits=Limits(**data["limits"]),
            repo=data.get("repo"),
            model=data.get("model"),
        )

    def _save(self, state: SupervisorState) -> None:
        _write_atomic(self.paths(state.task_id)["state"], json.dumps(asdict(state), indent=2, sort_keys=True))

    def _status_of(self, state: SupervisorState) -> TaskStatus:
        paths = self.paths(state.task_id)
        return TaskStatus(
            task_id=state.task_id,
            state=state.state,
            outcome=state.outcome,
            attempts=state.attempts,
            reason=state.reason,
            details={
                "job": contract.job_name(state.task_id),
                "uid": state.uid,
                "exit_codes": list(state.exit_codes),
                "started_at": _now_iso(state.started_at) if state.started_at else None,
                "finished_at": _now_iso(state.finished_at) if state.finished_at else None,
                "message": state.message,
                "workspace": None if state.workspace_removed else str(paths["workspace"]),
                "logs": str(paths["logs"]),
            },
        )

    # --- supervision ----------------------------------------------------------

    def _supervise(self, state: SupervisorState, task: Task) -> _Supervised:
        sup = self._supervised.get(state.task_id)
        if sup is None:
            sup = _Supervised(state=state, task=task)
            self._supervised[state.task_id] = sup
            sup.runner = asyncio.get_running_loop().create_task(self._run(sup), name=f"supervise-{state.task_id}")
        return sup

    async def _run(self, sup: _Supervised) -> None:
        try:
            if sup.state.pgids:
                await self._reap_orphans(sup.state)
            if not sup.state.finished:
                await self._attempts(sup)
            if sup.state.finished:
                await self._stop_snapshotter(sup)
                await self._deliver_job_event(sup)
        except Exception:
            log.exception("supervising task %s failed; it is picked up again on the next start", sup.state.task_id)
        finally:
            for role in ("restore", "agent", "snapshotter"):
                await self._stop(sup, role, self.snapshotter_grace_seconds if role == "snapshotter" else self.grace_seconds)
            self._supervised.pop(sup.state.task_id, None)

    async def _attempts(self, sup: _Supervised) -> None:
        state, limits = sup.state, sup.task.limits
        while True:
            if sup.stop_reason == "shutdown":
                return
            if sup.stop_reason == "cancel":
                return self._finish(sup, contract.OUTCOME_CANCELLED, REASON_CANCELLED, "cancelled by request")
            if state.started_at is None:
                state.started_at = time.time()
                self._save(state)
            if self._deadline_left(sup) <= 0:
                return self._finish_deadline(sup)

            state.state = contract.STATE_STARTED
            self._save(state)
            code, stopped_by = await self._one_attempt(sup)
            if stopped_by == "shutdown":
                return
            if stopped_by == "cancel":
                return self._finish(sup, contract.OUTCOME_CANCELLED, REASON_CANCELLED, "cancelled by request")
            if stopped_by == "deadline":
                return self._finish_deadline(sup)

            if code == contract.EXIT_DONE:
                # The agent stops itself at a budget or its own deadline with exit 0 too.
                outcome = self._read_result(sup).get("outcome")
                if outcome not in (contract.OUTCOME_DONE, contract.OUTCOME_BUDGET, contract.OUTCOME_DEADLINE):
                    outcome = contract.OUTCOME_DONE
                return self._finish(sup, outcome, REASON_COMPLETE, "Reached expected number of succeeded pods")
            if code in contract.NO_RETRY_EXIT_CODES:
                outcome = contract.OUTCOME_CANCELLED if code == contract.EXIT_CANCELLED else contract.OUTCOME_FAILED
                message = f"Container agent failed with exit code {code} matching FailJob rule"
                return self._finish(sup, outcome, REASON_FAILURE_POLICY, message)

            state.failures += 1
            if state.failures > limits.retries:
                return self._finish(sup, contract.OUTCOME_FAILED, REASON_BACKOFF, "Job has reached the specified backoff limit")
            delay = min(self.backoff_seconds * 2 ** (state.failures - 1), self.backoff_max_seconds)
            state.state = contract.STATE_RETRYING
            self._save(state)
            await self._publish_status(
                sup,
                state=contract.STATE_RETRYING,
                attempt=state.attempts + 1,
                exit_code=code,
                retries_left=limits.retries - state.failures,
                backoff_seconds=delay,
            )
            log.info("task %s: attempt %d exited %s, retrying in %.1fs", state.task_id, state.attempts, code, delay)
            await self._wait_interrupt(sup, min(delay, max(self._deadline_left(sup), 0)))

    async def _one_attempt(self, sup: _Supervised) -> tuple[int, str | None]:
        """Run restore, then the agent. Returns (exit code, what stopped it early if anything)."""
        code, stopped_by = await self._run_child(sup, "restore", self.command_line(sup.task, "restore"))
        if stopped_by or code != 0:
            if not stopped_by:
                sup.state.attempts += 1
                sup.state.exit_codes.append(code)
                sup.state.termination_message = f"restore exited with code {code}; see {self._log_path(sup, 'restore')}"
                self._save(sup.state)
            return code, stopped_by
        await self._ensure_snapshotter(sup)
        sup.state.attempts += 1
        self._save(sup.state)
        began = time.time()
        code, stopped_by = await self._run_child(sup, "agent", self.command_line(sup.task, "run"))
        sup.state.exit_codes.append(code)
        sup.state.termination_message = self._termination_message(sup, code, began)
        self._save(sup.state)
        return code, stopped_by

    async def _run_child(self, sup: _Supervised, role: str, argv: list[str]) -> tuple[int, str | None]:
        """Run one child until it exits, or until a cancel, a shutdown or the deadline stops it."""
        proc = await self._spawn(sup, role, argv)
        waiter = asyncio.ensure_future(proc.wait())
        interrupted = asyncio.ensure_future(sup.interrupt.wait())
        try:
            timeout = max(self._deadline_left(sup), 0)
            await asyncio.wait({waiter, interrupted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
        stopped_by = None
        if proc.returncode is None:
            stopped_by = sup.stop_reason or "deadline"
            await self._stop(sup, role, self.grace_seconds)
        else:
            await waiter
            signal_group(proc.pid, signal.SIGKILL)  # stragglers left in its group
            sup.procs.pop(role, None)
            self._forget_pgid(sup, role)
        return _exit_code(proc.returncode), stopped_by

    async def _ensure_snapshotter(self, sup: _Supervised) -> None:
        proc = sup.procs.get("snapshotter")
        if proc is not None and proc.returncode is None:
            return
        if proc is not None:
            log.warning("task %s: snapshotter exited with %s; starting it again", sup.state.task_id, proc.returncode)
        await self._spawn(sup, "snapshotter", self.command_line(sup.task, "snapshotter"))

    async def _stop_snapshotter(self, sup: _Supervised) -> None:
        """SIGTERM makes the snapshotter take the final snapshot and upload it: wait for that."""
        if "snapshotter" in sup.procs:
            await self._stop(sup, "snapshotter", self.snapshotter_grace_seconds)

    def _finish_deadline(self, sup: _Supervised) -> None:
        seconds = sup.task.limits.deadline_seconds
        self._finish(sup, contract.OUTCOME_DEADLINE, REASON_DEADLINE, f"Job was active longer than specified deadline ({seconds}s)")

    def _finish(self, sup: _Supervised, outcome: str, reason: str, message: str) -> None:
        state = sup.state
        state.state = contract.STATE_FINISHED
        state.outcome, state.reason, state.message = outcome, reason, message
        state.finished_at = time.time()
        self._save(state)
        log.info("task %s finished: %s (%s)", state.task_id, outcome, reason)

    # --- the job event ----------------------------------------------------------

    def job_object(self, state: SupervisorState, task: Task) -> dict:
        """The Job as ApiServerSource would send it once finished."""
        complete = state.reason == REASON_COMPLETE
        condition = {
            "type": "Complete" if complete else "Failed",
            "status": "True",
            "reason": state.reason,
            "message": state.message,
            "lastProbeTime": _now_iso(state.finished_at),
            "lastTransitionTime": _now_iso(state.finished_at),
        }
        status: dict[str, Any] = {
            "conditions": [condition],
            "active": 0,
            "succeeded": 1 if complete else 0,
            "failed": max(len(state.exit_codes) - (1 if complete else 0), 0),
            "startTime": _now_iso(state.started_at or state.created_at),
        }
        if complete:
            status["completionTime"] = _now_iso(state.finished_at)
        if state.termination_message:
            status["terminationMessage"] = state.termination_message
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": contract.job_name(state.task_id),
                "namespace": contract.AGENTS_NAMESPACE,
                "uid": state.uid,
                "creationTimestamp": _now_iso(state.created_at),
                "labels": contract.agent_labels(state.task_id),
                "annotations": {contract.ANNOTATION_TASK: task.to_json()},
            },
            "spec": {
                "backoffLimit": task.limits.retries,
                "activeDeadlineSeconds": task.limits.deadline_seconds,
            },
            "status": status,
        }

    def job_event(self, state: SupervisorState, task: Task) -> dict:
        """A structured-mode CloudEvent (as a dict) carrying the finished Job."""
        name = contract.job_name(state.task_id)
        return {
            "specversion": "1.0",
            "id": f"{state.uid}-finished",  # the same on every redelivery
            "source": contract.EVENT_SOURCE_LOCAL_RUNTIME,
            "type": contract.EVENT_JOB_UPDATE,
            "subject": f"/apis/batch/v1/namespaces/{contract.AGENTS_NAMESPACE}/jobs/{name}",
            "time": _now_iso(state.finished_at),
            "datacontenttype": "application/json",
            "kind": "Job",
            "name": name,
            "namespace": contract.AGENTS_NAMESPACE,
            "data": self.job_object(state, task),
        }

    async def _deliver_job_event(self, sup: _Supervised) -> None:
        if sup.state.event_sent:
            return
        event = self.job_event(sup.state, sup.task)
        delay = 0.5
        while True:
            try:
                await self.emit_job_event(event)
            except Exception as exc:  # noqa: BLE001 - whatever the sink raises, try again later
                log.warning("task %s: delivering the job event failed (%s); retrying in %.1fs", sup.state.task_id, exc, delay)
                try:
                    await asyncio.wait_for(self._shutdown.wait(), delay)
                    return  # shutting down: the next start delivers it
                except asyncio.TimeoutError:
                    delay = min(delay * 2, 30.0)
                    continue
            sup.state.event_sent = True
            self._save(sup.state)
            return

    # --- children ------------------------------------------------------------------

    def command_line(self, task: Task, command: str) -> list[str]:
        """`<agent_cmd> run|restore|snapshotter ...`, the flags as the pod's containers get them."""
        task_id = task.task_id
        paths = self.paths(task_id)
        argv = [*self.agent_cmd, command, "--task-id", task_id, "--workspace", str(paths["workspace"])]
        if command == "restore":
            return [*argv, "--store", self.store_url]
        if command == "snapshotter":
            argv += ["--store", self.store_url]
            if self.nats_url:
                argv += ["--nats", self.nats_url]
            if self.snapshot_interval:
                argv += ["--interval", str(self.snapshot_interval)]
            return argv
        argv += ["--task-file", str(paths["task"]), "--home", str(paths["home"])]
        model = task.model or self.default_model
        if model:
            argv += ["--model", model]
        if self.nats_url:
            argv += ["--nats", self.nats_url]
        if self.secrets_dir:
            argv += ["--secrets-dir", self.secrets_dir]
        return argv

    def _log_path(self, sup: _Supervised, role: str) -> Path:
        return self.paths(sup.state.task_id)["logs"] / f"{role}.log"

    async def _spawn(self, sup: _Supervised, role: str, argv: list[str]) -> asyncio.subprocess.Process:
        paths = self.paths(sup.state.task_id)
        paths["logs"].mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        if role == "agent":
            env["HOME"] = str(paths["home"])
            env["PYTHONUSERBASE"] = str(paths["home"] / ".local")
        with open(self._log_path(sup, role), "ab") as logfile:
            logfile.write(f"--- {_now_iso()} {role} starts\n".encode())
            logfile.flush()
            sup.log_offsets[role] = logfile.tell()  # where this run's output begins
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                cwd=str(paths["workspace"]),
                env=env,
                start_new_session=True,  # its own process group, so a stop reaches its children too
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        sup.procs[role] = proc
        sup.state.pgids[role] = proc.pid
        self._save(sup.state)
        return proc

    async def _stop(self, sup: _Supervised, role: str, grace: float) -> None:
        proc = sup.procs.pop(role, None)
        if proc is None:
            return
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("task %s: %s ignored SIGTERM for %.0fs; killing it", sup.state.task_id, role, grace)
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        self._forget_pgid(sup, role)

    def _forget_pgid(self, sup: _Supervised, role: str) -> None:
        if sup.state.pgids.pop(role, None) is not None:
            self._save(sup.state)

    async def _reap_orphans(self, state: SupervisorState) -> None:
        """Children of a process that died hard got SIGTERM from the kernel; make sure they are gone."""
        for role, pgid in list(state.pgids.items()):
            if _is_our_group(pgid, state.task_id):
                log.warning("task %s: stopping the %s left over by the previous process", state.task_id, role)
                signal_group(pgid, signal.SIGTERM)
                deadline = time.monotonic() + self.grace_seconds
                while group_alive(pgid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                signal_group(pgid, signal.SIGKILL)
        state.pgids.clear()
        self._save(state)

    def _child_env(self, env: dict[str, str] | None) -> dict[str, str]:
        import agent

        env = dict(os.environ if env is None else env)
        # The children import `agent` from this checkout even when it is not installed.
        root = str(Path(agent.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # --- small helpers -----------------------------------------------------------------

    def _deadline_left(self, sup: _Supervised) -> float:
        started = sup.state.started_at or time.time()
        return started + sup.task.limits.deadline_seconds - time.time()

    async def _wait_interrupt(self, sup: _Supervised, seconds: float) -> bool:
        """Sleep, waking early on cancel or shutdown. True if woken."""
        try:
            await asyncio.wait_for(sup.interrupt.wait(), max(seconds, 0))
            return True
        except asyncio.TimeoutError:
            return False

    def _read_result(self, sup: _Supervised) -> dict:
        try:
            data = json.loads(self.paths(sup.state.task_id)["result"].read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _termination_message(self, sup: _Supervised, code: int, began: float) -> str | None:
        """The summary the agent left in its result file during this attempt; else, on failure,
        the tail of its log (FallbackToLogsOnError)."""
        result_file = self.paths(sup.state.task_id)["result"]
        fresh = result_file.exists() and result_file.stat().st_mtime >= began - 1
        summary = self._read_result(sup).get("summary") if fresh else None
        if summary:
            return str(summary).encode()[:TERMINATION_MESSAGE_BYTES].decode(errors="ignore")
        if code == contract.EXIT_DONE:
            return None
        try:
            with open(self._log_path(sup, "agent"), "rb") as fh:
                fh.seek(sup.log_offsets.get("agent", 0))
                text = fh.read().decode(errors="replace")
        except OSError:
            return None
        tail = "\n".join(text.splitlines()[-TERMINATION_MESSAGE_LINES:])
        return tail.encode()[-TERMINATION_MESSAGE_BYTES:].decode(errors="ignore") or None

    async def _publish_status(self, sup: _Supervised, **fields: Any) -> None:
        """Runtime status events go where the agent's go, so the stream shows retries too."""
        if not self.nats_url:
            return
        body = {"type": contract.EV_STATUS, "task_id": sup.state.task_id, "ts": _now_iso(), "source": "runtime", **fields}
        try:
            if self._nc is None or self._nc.is_closed:
                import nats

                self._nc = await nats.connect(self.nats_url, connect_timeout=2, max_reconnect_attempts=-1)
            await self._nc.publish(contract.subject_events(sup.state.task_id), json.dumps(body).encode())
            await self._nc.flush(timeout=2)
        except Exception as exc:  # noqa: BLE001 - status events are best effort
            log.warning("task %s: could not publish a status event: %s", sup.state.task_id, exc)

    async def _final_snapshot_stored(self, task_id: str) -> bool:
        from agent.storage import open_store

        try:
            store = open_store(self.store_url)
            return await asyncio.to_thread(store.exists, contract.final_result_key(task_id))
        except Exception as exc:  # noqa: BLE001 - keep the workspace when in doubt
            log.warning("task %s: cannot check the final snapshot (%s); keeping the workspace", task_id, exc)
            return False

    def _start_janitor(self) -> None:
        if self._janitor is None and not self._shutdown.is_set():
            self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop(), name="local-runtime-janitor")

    async def _janitor_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a sweep is retried on the next round
                log.exception("sweeping finished tasks failed")
            await asyncio.sleep(self.sweep_interval_seconds)


def _exit_code(returncode: int | None) -> int:
    """As a container reports it: a death by signal N is 128+N (SIGKILL → 137)."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


def _is_our_group(pgid: int, task_id: str) -> bool:
    """A recorded group still alive whose leader's command line names the task: not a reused pid."""
    if not group_alive(pgid):
        return False
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # leader gone but the group lives: ours, since group ids are not reused while alive
    return task_id.encode() in cmdline


def _record_task_id(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return record.get("task_id")
    return getattr(record, "task_id", None)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
