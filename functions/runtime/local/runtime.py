"""LocalRuntime: the Runtime of `dockyard dev`, the cluster's Job controller and TTL controller imitated.

Invariants
- Launch is idempotent by task id: the folder `<data_dir>/tasks/<id>/` is the
  arbiter (same spec: nothing new; another spec: LaunchConflict), and one
  `TaskSupervisor` at most runs per task in this process.
- `close()` stops every agent with SIGTERM and leaves its task unfinished;
  `resume_running()` in the next process supervises every unfinished task again
  and delivers every job event still owed.
- The janitor (every `sweep_interval_seconds`, like ttlSecondsAfterFinished)
  removes the workspace of a task finished longer than its TTL ago (a failed
  one is kept longer, to look into), once its final snapshot is in the store;
  the task's record stays.
- Launch only records the task and hands it to its supervisor, which waits for
  one of `max_running` slots (default: the number of cores) in submit order;
  a task launched but never admitted is `queued` in its folder, so a restart
  queues it again. Cancel of a queued task finishes it `cancelled`, nothing run.
- All waiting and every persisted time is on the injected `Clock`.
- With the real agent (`python -m agent`, not a stand-in) restore and the agent
  are forked from one warm template per runtime (template.py), started by
  `resume_running()` or the first launch and ended by `close()`; `warm=False`
  execs every child.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from agent import contract
from functions.core.nats_jwt import TASK_ROLES, Issuer, task_credentials_expiry, write_secret_file
from gateway.grants import grant_path
from functions.core.task import Task
from functions.errors import LaunchConflict, TaskNotFound, TransientError
from functions.runtime.local.admission import Admission
from functions.runtime.local.clock import Clock
from functions.runtime.local.job_event import REASON_COMPLETE, job_object
from functions.runtime.local.processes import AgentCommand, child_env
from functions.runtime.local.state import SupervisorState, TaskFolder, TaskFolders
from functions.runtime.local.status_events import StatusEvents
from functions.runtime.local.supervisor import EmitJobEvent, Policy, TaskSupervisor
from functions.runtime.local.template import WarmTemplate

log = logging.getLogger("dockyard.runtime.local")


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
        scripts_dir: str | None = None,
        allow_file_repos: bool = False,
        backoff_seconds: float = 2.0,
        backoff_max_seconds: float = 60.0,
        grace_seconds: float = 10.0,
        snapshotter_grace_seconds: float = 120.0,
        ttl_succeeded_seconds: float = 3600.0,
        ttl_failed_seconds: float = 7 * 24 * 3600.0,
        sweep_interval_seconds: float = 60.0,
        clock: Clock | None = None,
        issuer: Issuer | None = None,
        nats_creds: str = "",
        max_running: int | None = None,
        warm: bool | None = None,
        model_gateway: str | None = None,
        gateway_grants: Path | None = None,
        git_credentials_dir: str | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.folders = TaskFolders(self.data_dir / "tasks")
        self.store_url = store_url
        self.clock = clock or Clock()
        self.ttl_succeeded_seconds = ttl_succeeded_seconds
        self.ttl_failed_seconds = ttl_failed_seconds
        self.sweep_interval_seconds = sweep_interval_seconds
        self._shutdown = asyncio.Event()
        self.issuer = issuer
        self.gateway_grants = Path(gateway_grants) if gateway_grants else None
        self._status = StatusEvents(nats_url, nats_creds)
        argv, environment = tuple(agent_cmd or (sys.executable, "-m", "agent")), child_env(env)
        if warm is None:  # a stand-in agent (the tests') is exec'd: the template runs the real one only
            warm = argv == (sys.executable, "-m", "agent")
        self.template = WarmTemplate(argv, environment) if warm else None
        self.policy = Policy(
            folders=self.folders,
            # `<agent_cmd> run|restore|snapshotter ...`: the agent CLI, or a stand-in in tests.
            command=AgentCommand(
                argv,
                store_url,
                nats_url=nats_url,
                default_model=default_model,
                secrets_dir=secrets_dir,
                snapshot_interval=snapshot_interval,
                scripts_dir=scripts_dir,
                allow_file_repos=allow_file_repos,
                nats_creds=issuer is not None and bool(nats_url),
                model_gateway=model_gateway,
                git_credentials_dir=git_credentials_dir or None,
            ),
            env=environment,
            emit_job_event=emit_job_event,
            status=self._status,
            clock=self.clock,
            shutdown=self._shutdown,
            backoff_seconds=backoff_seconds,
            backoff_max_seconds=backoff_max_seconds,
            grace_seconds=grace_seconds,
            snapshotter_grace_seconds=snapshotter_grace_seconds,
            admission=Admission(max_running),
            prepare=self._mint_credentials,
            template=self.template,
        )
        self._supervised: dict[str, TaskSupervisor] = {}
        self._lock = asyncio.Lock()
        self._janitor: asyncio.Task | None = None

    # --- the Runtime protocol ------------------------------------------------

    async def launch(self, task: Task) -> bool:
        if self._shutdown.is_set():
            raise TransientError("the local runtime is stopping; retry once `dockyard dev` runs again")
        async with self._lock:
            existing = self.folders.load(task.task_id)
            if existing is not None:
                if existing.spec_hash != task.spec_hash:
                    raise LaunchConflict(
                        f"task {task.task_id} already exists with a different spec; submit under another task_id"
                    )
                if not existing.finished or not existing.event_sent:
                    self._supervise(existing, task)  # e.g. launched again before resume_running()
                return False
            state = SupervisorState(
                task_id=task.task_id, spec_hash=task.spec_hash, uid=str(uuid.uuid4()), created_at=self.clock.time()
            )
            self.folders.create(task, state)
            self._supervise(state, task)
            self._start_janitor()
            log.info("launched task %s (job uid %s)", task.task_id, state.uid)
            return True

    async def finished_job(self, task_id: str) -> dict | None:
        state = self._current(task_id)
        if state is None or not state.finished:
            return None
        return job_object(state, self.folders.load_task(task_id))

    async def job_uid(self, task_id: str) -> str | None:
        state = self._current(task_id) if contract.is_valid_task_id(task_id) else None
        return state.uid if state is not None else None

    async def cancel(self, task_id: str) -> None:
        """Stop the agent (SIGTERM, grace, SIGKILL); the task finishes with outcome cancelled."""
        async with self._lock:
            state = self._current(task_id)
            if state is None:
                raise TaskNotFound(f"no task {task_id} in {self.folders.tasks_dir}")
            if state.finished:
                return
            sup = self._supervised.get(task_id) or self._supervise(state, self.folders.load_task(task_id))
            sup.stop("cancel")
        # Wait for the agent to be gone, not for the job event: its delivery may need this caller.
        await sup.agent_gone()

    # --- lifecycle of this process -------------------------------------------

    async def resume_running(self, registry_records: Iterable[Any] = ()) -> list[str]:
        """Pick up what the last process left: every task whose folder says it is not finished
        is supervised again (its agent resumes from its checkpoint), and a job event that was
        never delivered is sent now. `registry_records` (entries of the task registry that are
        not finished) only serve to warn about tasks that have no folder here."""
        resumed = []
        async with self._lock:
            states = [s for s in map(self.folders.load, self.folders.task_ids()) if s is not None]
            for state in sorted(states, key=lambda s: (s.created_at, s.task_id)):  # the queue in submit order
                if state.task_id in self._supervised or (state.finished and state.event_sent):
                    continue
                self._supervise(state, self.folders.load_task(state.task_id))
                resumed.append(state.task_id)
        for record in registry_records:
            task_id = _record_task_id(record)
            if task_id and self.folders.load(task_id) is None:
                log.warning("task %s is unfinished in the registry but has no folder in %s", task_id, self.folders.tasks_dir)
        if resumed:
            log.info("resumed %d task(s): %s", len(resumed), ", ".join(resumed))
        self._start_janitor()
        if self.template is not None and not self._shutdown.is_set():
            self.template.warm_up()
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
            sup.stop("shutdown")
        runners = [sup.runner for sup in self._supervised.values() if sup.runner]
        if runners:
            await asyncio.gather(*runners, return_exceptions=True)
        if self.template is not None:
            await self.template.close()
        await self._status.close()

    async def sweep(self) -> None:
        """Deliver job events still owed, and remove the workspaces of tasks finished longer than
        their TTL ago once their final snapshot is in the store."""
        for task_id in self.folders.task_ids():
            state = self.folders.load(task_id)
            if state is None or not state.finished or task_id in self._supervised:
                continue
            if not state.event_sent:
                self._supervise(state, self.folders.load_task(task_id))
                continue
            if self.gateway_grants is not None:  # a finished task's token opens the model gateway no more
                grant_path(self.gateway_grants, task_id).unlink(missing_ok=True)
            ttl = self.ttl_succeeded_seconds if state.reason == REASON_COMPLETE else self.ttl_failed_seconds
            if state.workspace_removed or self.clock.time() - (state.finished_at or 0) < ttl:
                continue
            if await self._final_snapshot_stored(task_id):
                folder = self.folders.folder(task_id)
                shutil.rmtree(folder.workspace, ignore_errors=True)
                shutil.rmtree(folder.home, ignore_errors=True)
                state.workspace_removed = True
                self.folders.save(state)
                log.info("removed the workspace of task %s (final snapshot stored)", task_id)

    # --- for the dev stack and the tests -------------------------------------------

    @property
    def admission(self) -> Admission:
        return self.policy.admission

    def folder(self, task_id: str) -> TaskFolder:
        return self.folders.folder(task_id)

    def command_line(self, task: Task, command: str) -> list[str]:
        """`<agent_cmd> run|restore|snapshotter ...`, the flags as the pod's containers get them."""
        return self.policy.command.line(task, command, self.folder(task.task_id))

    # --- helpers ---------------------------------------------------------------------

    def _current(self, task_id: str) -> SupervisorState | None:
        sup = self._supervised.get(task_id)
        return sup.state if sup else self.folders.load(task_id)

    def _supervise(self, state: SupervisorState, task: Task) -> TaskSupervisor:
        sup = self._supervised.get(state.task_id)
        if sup is None:
            sup = TaskSupervisor(self.policy, state, task)
            self._supervised[state.task_id] = sup
            sup.start(lambda done: self._supervised.pop(done.state.task_id, None))
        return sup

    def _mint_credentials(self, task: Task) -> None:
        """Fresh NATS users for the task's agent and snapshotter, each in its own file, whenever its
        supervision is admitted (after launch, or on resume after a restart): valid for the deadline and
        an hour more from then, so time spent queued does not eat into them. With a model gateway, a
        fresh gateway token too (gateway.grants: the gateway keeps the task's totals across tokens)."""
        if self.gateway_grants is not None:
            self._grant_model_gateway(task)
        if self.issuer is None or not self.policy.command.nats_creds:
            return
        folder = self.folder(task.task_id)
        folder.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        expires_at = task_credentials_expiry(task.limits.deadline_seconds, time.time())
        for role in TASK_ROLES:
            write_secret_file(folder.nats_creds(role), self.issuer.task_creds(task.task_id, role, expires_at=expires_at))

    def _grant_model_gateway(self, task: Task) -> None:
        from gateway.grants import Grant, new_token, sha256, write_grant

        folder = self.folder(task.task_id)
        folder.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = new_token(task.task_id)
        write_grant(self.gateway_grants, Grant(task.task_id, sha256(token), task.limits.max_tokens, task.limits.max_cost_usd))
        write_secret_file(folder.secrets / contract.GATEWAY_TOKEN_FILE, token)

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
            except Exception:
                log.exception("sweeping finished tasks failed")
            await self.clock.sleep(self.sweep_interval_seconds)


def _record_task_id(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return record.get("task_id")
    return getattr(record, "task_id", None)
