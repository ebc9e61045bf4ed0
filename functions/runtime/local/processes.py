"""The child processes of a local task: restore, the snapshotter and the agent, as the pod's containers.

Invariants
- Every child leads its own process group (`start_new_session`) and gets SIGTERM
  from the kernel if this process dies (`agent.procs.die_with_parent`), so no
  agent outlives `dockyard dev`; the groups are recorded in the task's state so
  a new process reaps what a hard crash left behind.
- Stopping a child is SIGTERM to its whole group, a grace period, then SIGKILL
  to the group; a child that exits on its own gets SIGKILL for stragglers left
  in its group. Grace periods are real time: they are about real processes.
- A child's output is appended to `logs/<role>.log`, each run after a header
  line, and the offset where the run began is kept for FallbackToLogsOnError.
- The children get the flags the pod's containers get (`AgentCommand`).
- With a warm template (template.py), `restore` and the agent are forked from
  it instead of exec'd, set up the same way (session, parent-death SIGTERM,
  log, cwd, environment); if it cannot launch, they are exec'd. A recorded
  group is known by its leader's pid and start time (/proc/<pid>/stat), not by
  its command line: a forked child keeps the template's, and (pid, start
  time) is what the kernel never gives two processes, with no library and no
  rewriting of argv memory (setproctitle) needed; a state file from before
  start times were recorded falls back to the command line naming the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import contract
from agent.procs import die_with_parent, group_alive, signal_group, start_time
from functions.core.git_push import push_flags
from functions.core.task import Task, restore_parent_args
from functions.runtime.local.pod import AttemptEnd, JobSpec, Supervised, log_tail, summary_this_attempt
from functions.runtime.local.state import TaskFolder
from functions.runtime.local.template import ForkedProcess, TemplateUnavailable, WarmTemplate

log = logging.getLogger("dockyard.runtime.local")

ROLES = ("restore", "agent", "snapshotter")
SNAPSHOTTER_READY = "starting:"  # the snapshotter's first line, written once it handles SIGTERM (agent/snapshotter.py)
TEMPLATE_ROLES = ("restore", "agent")  # forked from the warm template when there is one; the snapshotter is exec'd
REAP_POLL_SECONDS = 0.05  # a group that is not our child cannot be waited on, only looked at
KILL_SETTLE_SECONDS = 10.0  # after SIGKILL: how long a stop waits for the rest of the group to be gone


@dataclass(frozen=True)
class AgentCommand:
    """`<argv> run|restore|snapshotter ...`: the agent CLI (or a stand-in in tests) and its flags."""

    argv: tuple[str, ...]
    store_url: str
    nats_url: str | None = None
    default_model: str | None = None
    secrets_dir: str | None = None
    snapshot_interval: float | None = None
    scripts_dir: str | None = None  # where `scripted:NAME` is looked up; None: the agent's bundled examples
    allow_file_repos: bool = False
    nats_creds: bool = False  # each process gets its own `.creds` in the task's secrets folder (the launcher minted them)
    model_gateway: str | None = None  # the dev stack's model gateway: the agent's secrets dir is then its task's own folder
    git_credentials_dir: str | None = None  # repo.push's credentials: the snapshotter's flag only, outside the agent's sandbox

    def line(self, task: Task, command: str, folder: TaskFolder) -> list[str]:
        """The command line of one container, the flags as the pod's containers get them."""
        argv = [*self.argv, command, "--task-id", task.task_id, "--workspace", str(folder.workspace)]
        if command == "restore":
            return [*argv, "--store", self.store_url, *restore_parent_args(task, str(folder.task_file))]
        if command == "snapshotter":
            argv += ["--store", self.store_url]
            argv += self._nats(folder, "snapshotter")
            if self.snapshot_interval:
                argv += ["--interval", str(self.snapshot_interval)]
            return argv + push_flags(task, self.git_credentials_dir and str(Path(self.git_credentials_dir).absolute()))
        argv += ["--task-file", str(folder.task_file), "--home", str(folder.home)]
        model = task.model or self.default_model
        if model:
            argv += ["--model", model]
        argv += self._nats(folder, "agent")
        if self.model_gateway:  # the key stays with the gateway; the agent's secrets are its task's token and NATS user
            argv += ["--model-gateway", self.model_gateway, "--secrets-dir", str(folder.secrets)]
        elif self.secrets_dir:
            argv += ["--secrets-dir", self.secrets_dir]
        if self.scripts_dir:
            argv += ["--scripts-dir", str(Path(self.scripts_dir).absolute())]
        if self.allow_file_repos:
            argv.append("--allow-file-repos")
        return argv

    def _nats(self, folder: TaskFolder, role: str) -> list[str]:
        if not self.nats_url:
            return []
        return ["--nats", self.nats_url, *(["--nats-creds", str(folder.nats_creds(role))] if self.nats_creds else [])]


def child_env(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of every child: `env` (default: this process's), with this checkout on the path."""
    import agent

    env = dict(os.environ if env is None else env)
    env.pop(f"{contract.ENV_PREFIX}GIT_CREDENTIALS_DIR", None)  # the snapshotter gets it as a flag; no other child
    # The children import `agent` from this checkout even when it is not installed.
    root = str(Path(agent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def exit_code(returncode: int | None) -> int:
    """As a container reports it: a death by signal N is 128+N (SIGKILL → 137)."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


Process = asyncio.subprocess.Process | ForkedProcess  # exec'd, or forked from the warm template


class Children:
    """The running children of one task, by role. `groups` is the task's persisted record of
    live process groups; `persist` saves it after every change."""

    def __init__(
        self,
        folder: TaskFolder,
        env: dict[str, str],
        groups: dict[str, int],
        persist: Callable[[], None],
        starts: dict[str, int] | None = None,
        template: WarmTemplate | None = None,
    ):
        self.folder = folder
        self.env = env
        self.groups = groups
        self.starts = {} if starts is None else starts  # the group leaders' start times, persisted with `groups`
        self.persist = persist
        self.template = template
        self.procs: dict[str, Process] = {}
        self.log_offsets: dict[str, int] = {}

    def running(self, role: str) -> Process | None:
        proc = self.procs.get(role)
        return proc if proc is not None and proc.returncode is None else None

    async def start(self, role: str, argv: list[str]) -> Process:
        self.folder.logs.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        if role == "agent":
            env["HOME"] = str(self.folder.home)
            env["PYTHONUSERBASE"] = str(self.folder.home / ".local")
        with open(self.folder.log(role), "ab") as logfile:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            logfile.write(f"--- {stamp} {role} starts\n".encode())
            logfile.flush()
            self.log_offsets[role] = logfile.tell()  # where this run's output begins
            proc = await self._fork(role, argv, env)
            if proc is None:
                proc = await self._exec(argv, env, logfile)
        self.procs[role] = proc
        self.groups[role] = proc.pid
        start = proc.start if isinstance(proc, ForkedProcess) else start_time(proc.pid)
        if start is not None:
            self.starts[role] = start
        self.persist()
        return proc

    async def _fork(self, role: str, argv: list[str], env: dict[str, str]) -> ForkedProcess | None:
        """`role` forked from the warm template, or None when there is none or it cannot launch (exec then)."""
        template = self.template
        if template is None or role not in TEMPLATE_ROLES or tuple(argv[: len(template.argv)]) != template.argv:
            return None
        try:
            return await template.spawn(argv[len(template.argv) :], env, str(self.folder.workspace), str(self.folder.log(role)))
        except TemplateUnavailable as exc:
            if not template.broken:
                log.warning("task %s: the warm template cannot start the %s (%s); starting it by exec", self.folder.root.name, role, exc)
            return None

    async def _exec(self, argv: list[str], env: dict[str, str], logfile) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logfile,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(self.folder.workspace),
            env=env,
            start_new_session=True,  # its own process group, so a stop reaches its children too
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    async def exited(self, role: str) -> None:
        """After `role` exited on its own: SIGKILL what it left in its group, and forget it."""
        proc = self.procs.pop(role, None)
        if proc is not None:
            await proc.wait()
            signal_group(proc.pid, signal.SIGKILL)
        self._forget(role)

    async def stop(self, role: str, grace: float) -> None:
        """SIGTERM to the group of `role`, `grace` seconds, then SIGKILL to the group."""
        proc = self.procs.pop(role, None)
        if proc is None:
            return
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.warning("task %s: %s ignored SIGTERM for %.0fs; killing it", self.folder.root.name, role, grace)
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        # The leader is reaped; other members may still be on their way out of a SIGKILL.
        deadline = time.monotonic() + KILL_SETTLE_SECONDS
        while group_alive(proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._forget(role)

    async def wait_gone(self, role: str, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until `role` has exited and a stop under way has finished
        with its whole group (`stop` forgets the group last; it takes the process out of `procs` first)."""
        deadline = time.monotonic() + timeout
        proc = self.running(role)
        if proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout)
        while role in self.groups and role not in self.procs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # a stop is killing what is left of the group

    async def ready(self, role: str, marker: str, timeout: float) -> bool:
        """Wait until `role` wrote `marker` to its log during this run, exited, or `timeout` passed."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while self.running(role) is not None and loop.time() < give_up:
            if marker in (self.output_since_start(role) or ""):
                return True
            await asyncio.sleep(0.05)
        return marker in (self.output_since_start(role) or "")

    def output_since_start(self, role: str) -> str | None:
        """What `role` wrote to its log during its last run."""
        try:
            with open(self.folder.log(role), "rb") as fh:
                fh.seek(self.log_offsets.get(role, 0))
                return fh.read().decode(errors="replace")
        except OSError:
            return None

    def _forget(self, role: str) -> None:
        self.starts.pop(role, None)
        if self.groups.pop(role, None) is not None:
            self.persist()


async def reap_orphans(groups: dict[str, int], task_id: str, grace: float, starts: dict[str, int] | None = None) -> None:
    """Children of a process that died hard got SIGTERM from the kernel; make sure they are gone.
    Empties `groups` and `starts`."""
    starts = {} if starts is None else starts
    for role, pgid in list(groups.items()):
        if _is_our_group(pgid, task_id, starts.get(role)):
            log.warning("task %s: stopping the %s left over by the previous process", task_id, role)
            signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while group_alive(pgid) and time.monotonic() < deadline:
                await asyncio.sleep(REAP_POLL_SECONDS)
            signal_group(pgid, signal.SIGKILL)
    groups.clear()
    starts.clear()


def _is_our_group(pgid: int, task_id: str, start: int | None = None) -> bool:
    """A recorded group still alive whose leader is the process recorded (same start time; without one,
    its command line names the task): not a reused pid."""
    if not group_alive(pgid):
        return False
    if start is not None:
        now = start_time(pgid)
        return now is None or now == start  # leader gone but the group lives: ours, as below
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # leader gone but the group lives: ours, since group ids are not reused while alive
    return task_id.encode() in cmdline


class LocalPod:
    """A task's attempts as child processes (the `Pod` of pod.py): every attempt runs `restore`, then
    the agent; the snapshotter runs beside the agent for the whole task and gets SIGTERM only once the
    agent has exited for good, so its final upload sees the final workspace."""

    def __init__(self, sup: Supervised, command: AgentCommand, env: dict[str, str], spec: JobSpec,
                 snapshotter_grace_seconds: float, read_summary: Callable[[], object], template: WarmTemplate | None = None):
        self.sup = sup
        self.command = command
        self.spec = spec
        self.snapshotter_grace_seconds = snapshotter_grace_seconds
        self.read_summary = read_summary
        state = sup.state
        self.children = Children(sup.folder, env, state.pgids, sup.save, state.starts, template)

    async def recover(self) -> None:
        state = self.sup.state
        if state.pgids:
            await reap_orphans(state.pgids, state.task_id, self.spec.grace_seconds, state.starts)
            self.sup.save()

    async def run_attempt(self) -> AttemptEnd:
        """Run restore, then the agent."""
        sup, state = self.sup, self.sup.state
        code, stopped_by = await self._run_child("restore", self.command.line(sup.task, "restore", sup.folder))
        if stopped_by or code != 0:
            if not stopped_by:
                state.attempts += 1
                state.exit_codes.append(code)
                state.termination_message = f"restore exited with code {code}; see {sup.folder.log('restore')}"
                sup.save()
            return AttemptEnd(code, stopped_by, "restore")
        await self._ensure_snapshotter()
        state.attempts += 1
        sup.save()
        began = time.time()  # compared with the result file's mtime: the real clock, as the file system's
        code, stopped_by = await self._run_child("agent", self.command.line(sup.task, "run", sup.folder))
        state.exit_codes.append(code)
        state.termination_message = self._termination_message(code, began)
        sup.save()
        return AttemptEnd(code, stopped_by)

    async def finish(self) -> None:
        """SIGTERM makes the snapshotter take the final snapshot and upload it: wait for that.

        Only once it handles SIGTERM: before its "starting:" line a SIGTERM kills it with nothing
        uploaded (an agent that ends within a second of its start, as a fork may, would lose its
        final set). It gets its grace period to get there."""
        await self.children.ready("snapshotter", SNAPSHOTTER_READY, self.snapshotter_grace_seconds)
        await self.children.stop("snapshotter", self.snapshotter_grace_seconds)

    async def agent_gone(self) -> None:
        """SIGTERM, grace, SIGKILL take at most the grace period."""
        await self.children.wait_gone("agent", self.spec.grace_seconds + 5)

    async def close(self) -> None:
        for role in ROLES:
            await self.children.stop(role, self.snapshotter_grace_seconds if role == "snapshotter" else self.spec.grace_seconds)

    async def _run_child(self, role: str, argv: list[str]) -> tuple[int, str | None]:
        """Run one child until it exits, or until a cancel, a shutdown or the deadline stops it."""
        sup = self.sup
        proc = await self.children.start(role, argv)
        stopped_by = await wait_or_stop(sup, proc.wait())
        if stopped_by is not None:
            await self.children.stop(role, self.spec.grace_seconds)
        else:
            await self.children.exited(role)
        return exit_code(proc.returncode), stopped_by

    async def _ensure_snapshotter(self) -> None:
        proc = self.children.procs.get("snapshotter")
        if proc is not None and proc.returncode is None:
            return
        if proc is not None:
            log.warning("task %s: snapshotter exited with %s; starting it again", self.sup.state.task_id, proc.returncode)
        await self.children.start("snapshotter", self.command.line(self.sup.task, "snapshotter", self.sup.folder))

    def _termination_message(self, code: int, began: float) -> str | None:
        """The summary the agent left during this attempt; else, on failure, the tail of its log (FallbackToLogsOnError)."""
        summary = summary_this_attempt(self.sup.folder, self.read_summary, began)
        if summary or code == contract.EXIT_DONE:
            return summary
        return log_tail(self.children.output_since_start("agent"))


async def wait_or_stop(sup: Supervised, exited) -> str | None:
    """Wait for `exited` (an awaitable), or a cancel, a shutdown or the deadline: None when it finished
    first, else what stops it ("cancel", "shutdown", "deadline"); then the caller stops it."""
    waiter = asyncio.ensure_future(exited)
    interrupted = asyncio.ensure_future(sup.interrupt.wait())
    deadline = asyncio.ensure_future(sup.clock.sleep(max(sup.deadline_left(), 0)))
    try:
        await asyncio.wait({waiter, interrupted, deadline}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
        deadline.cancel()
    if waiter.done():
        return None
    waiter.cancel()
    return sup.stop_reason or "deadline"
