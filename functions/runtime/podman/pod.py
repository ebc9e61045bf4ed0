"""One task's attempts as podman pods (the `Pod` of functions.runtime.local.pod): each attempt is the
rendered Job's pod, made by `translate.plan` and run as the kubelet would run it.

Invariants
- An attempt: the pod `agent-<id>` made fresh (any earlier one removed), the Secret and downward-API
  files written (root:<fsGroup>, the Secret's mode), the init container run to completion, the native
  sidecars started in order, each waiting for its startup probe, then the agent. When the agent exits
  (or is stopped: cancel, shutdown, deadline, liveness) the sidecars are stopped in reverse order, each
  with the grace period, so the snapshotter's final upload finishes.
- The agent's end is read from podman (`State.ExitCode`, `State.OOMKilled`, or the kernel's OOM
  notification: oom.py) and recorded as the kubelet reports it: `agent_exit` {reason OOMKilled|Error|
  Completed, exitCode} and the termination message (the agent's summary, else the last 80 lines /
  2048 bytes of its log: FallbackToLogsOnError), on the task's state and so on the Job event.
- The pod of the last attempt stays (exited) until the next attempt or the TTL janitor: `podman
  inspect` and `podman logs` show what ran, as a Job's pods stay until its TTL.
- After a restart of the process, a pod left running is stopped (the agent gets SIGTERM, stops after
  its step) and the attempt runs again from the checkpoint, as after any interrupted attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from agent import contract
from functions.runtime.local.pod import TERMINATION_MESSAGE_BYTES, AttemptEnd, JobSpec, Supervised, log_tail, summary_this_attempt
from functions.runtime.local.processes import wait_or_stop
from functions.runtime.podman.cli import Podman, PodmanError
from functions.runtime.podman.oom import OomWatch
from functions.runtime.podman.translate import JOB_UID_LABEL, ContainerPlan, PodPlan, Probe

log = logging.getLogger("dockyard.runtime.podman")

LOG_TAIL_LINES = 80
POD_RM_TRIES = 5


class PodmanPod:
    def __init__(self, sup: Supervised, podman: Podman, make_plan: Callable[[], PodPlan], spec: JobSpec,
                 read_summary: Callable[[], object]):
        self.sup = sup
        self.podman = podman
        self.make_plan = make_plan  # renders the Job now (with this attempt's credentials) and translates it
        self.spec = spec
        self.read_summary = read_summary
        self.name = contract.job_name(sup.state.task_id)
        self.agent_stopped = asyncio.Event()
        self.agent_stopped.set()

    # --- the Pod protocol -----------------------------------------------------

    async def recover(self) -> None:
        pod = await self.podman.inspect("pod", self.name)
        if pod is not None and _job_uid(pod) == self.sup.state.uid and _live(pod):
            log.warning("task %s: stopping the pod %s left by the previous process", self.sup.state.task_id, self.name)
            await self._stop_pod()

    async def run_attempt(self) -> AttemptEnd:
        """One attempt. A pod podman cannot make or start is a failed attempt (the Job controller counts a
        pod that fails to start), with podman's error as its termination message: retried with backoff."""
        sup, state = self.sup, self.sup.state
        plan = self.make_plan()
        try:
            return await self._attempt(plan)
        except PodmanError as exc:
            log.warning("task %s: the pod failed: %s", state.task_id, exc)
            await self.podman.run("pod", "stop", "--time", "0", self.name, check=False)
            if len(state.exit_codes) >= state.attempts:  # not counted yet (the agent's start counts it)
                state.attempts += 1
            state.exit_codes.append(1)
            state.termination_message = f"the pod could not run: {exc}"[:TERMINATION_MESSAGE_BYTES]
            state.agent_exit = None
            sup.save()
            return AttemptEnd(1, None, "pod")

    async def _attempt(self, plan: PodPlan) -> AttemptEnd:
        sup, state = self.sup, self.sup.state
        await self._create(plan)
        began = time.time()
        for container in plan.containers:
            if container.kind == "main":
                break
            if container.kind == "init":
                code, stopped_by = await self._run_to_end(container.name)
                if stopped_by or code != 0:
                    if not stopped_by:
                        state.attempts += 1
                        state.exit_codes.append(code)
                        state.termination_message = log_tail(await self._logs(container.name)) or f"{container.name} exited with code {code}"
                        state.agent_exit = None
                        sup.save()
                    await self._stop_sidecars(plan)
                    return AttemptEnd(code, stopped_by, container.name)
            else:
                await self.podman.run("start", self._cname(container.name))
                ok, stopped_by = await self._started(container)
                if not ok:
                    await self._stop_sidecars(plan)
                    if stopped_by:
                        return AttemptEnd(-1, stopped_by, container.name)
                    state.attempts += 1
                    state.exit_codes.append(1)
                    state.termination_message = f"the startup probe of {container.name} failed {container.startup_probe.failure_threshold} times"
                    sup.save()
                    return AttemptEnd(1, None, container.name)
        agent = next(c for c in plan.containers if c.kind == "main")
        state.attempts += 1
        sup.save()
        code, stopped_by, oom = await self._run_agent(agent)
        await self._stop_sidecars(plan)
        state.exit_codes.append(code)
        reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
        state.agent_exit = {"reason": reason, "exitCode": code, **({"signal": code - 128} if code > 128 else {})}
        state.termination_message = await self._termination_message(agent.name, code, began)
        sup.save()
        return AttemptEnd(code, stopped_by)

    async def finish(self) -> None:
        """Each attempt's pod stopped its own sidecars: the final upload is done."""

    async def agent_gone(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.agent_stopped.wait(), self.spec.grace_seconds + 15)

    async def close(self) -> None:
        if not self.agent_stopped.is_set():  # a shutdown: SIGTERM, the agent stops after its step
            await self._stop_pod()

    # --- steps ----------------------------------------------------------------

    async def _create(self, plan: PodPlan) -> None:
        """A fresh pod; the workspace volume kept from an earlier attempt. A pod or volume of the same name
        that belongs to another Job (another launch: another data dir, or one removed) is removed when it
        no longer runs, or when its workspace folder is gone; else it is a conflict, named."""
        uid = self.sup.state.uid
        pod = await self.podman.inspect("pod", self.name)
        if pod is not None and _job_uid(pod) != uid and _live(pod):
            raise PodmanError(f"the pod {self.name} runs for another Job (uid {_job_uid(pod)}): another `dockyard dev` "
                              f"with a task {self.sup.state.task_id}? (`podman pod rm -f {self.name}` if not)")
        for _ in range(POD_RM_TRIES):  # podman 4.3 sometimes finds a container's shm still busy: a moment later it is not
            code, _, err = await self.podman.run("pod", "rm", "--force", "--time", "0", self.name, check=False)
            if await self.podman.inspect("pod", self.name) is None:
                break
            await asyncio.sleep(0.5)
        else:
            raise PodmanError(f"the pod {self.name} of an earlier attempt cannot be removed: {err.strip()[-400:]}")
        self._write_files(plan)
        workspace = self.sup.folder.workspace
        workspace.mkdir(parents=True, exist_ok=True)
        os.chown(workspace, *plan.owner)
        volume = await self.podman.inspect("volume", plan.volume)
        if volume is not None and _job_uid(volume) != uid:
            device = ((volume.get("Options") or {}).get("device")) or ""
            if device and Path(device).exists():
                raise PodmanError(f"the volume {plan.volume} holds the workspace {device} of another Job (uid "
                                  f"{_job_uid(volume)}); (`podman volume rm {plan.volume}` if it is not wanted)")
            log.warning("task %s: removing the volume %s of a Job that is gone (%s)", self.sup.state.task_id, plan.volume, device)
            await self.podman.run("volume", "rm", "--force", plan.volume)
            volume = None
        if volume is None:
            await self.podman.run("volume", "create", *plan.volume_args)
        await self.podman.run("pod", "create", *plan.pod_args)
        for container in plan.containers:
            await self.podman.run("create", *container.args)

    def _write_files(self, plan: PodPlan) -> None:
        root = self.files_dir(self.sup.folder.root)
        for file in plan.files:
            path = root / file.volume / file.path
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o755)
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(file.data)
            os.chown(tmp, 0, file.gid)
            os.chmod(tmp, file.mode)
            os.replace(tmp, path)
        for container in plan.containers:  # a volume with no files (an optional Secret that is absent) is an empty dir
            for arg in container.args:
                if arg.startswith("type=bind,src="):
                    Path(arg.split(",")[1].removeprefix("src=")).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def files_dir(task_root: Path) -> Path:
        return task_root / "pod"

    async def _run_to_end(self, container: str) -> tuple[int, str | None]:
        await self.podman.run("start", self._cname(container))
        stopped_by = await self._wait(container)
        if stopped_by:
            await self.podman.run("stop", "--time", str(int(self.spec.grace_seconds)), self._cname(container), check=False)
        return await self._exit_code(container), stopped_by

    async def _started(self, container: ContainerPlan) -> tuple[bool, str | None]:
        """Wait for the sidecar's startup probe (none: started is enough)."""
        probe = container.startup_probe
        if probe is None:
            return True, None
        for _ in range(probe.failure_threshold):
            if await self._probe(container.name, probe):
                return True, None
            if self.sup.stop_reason or self.sup.deadline_left() <= 0:
                return False, self.sup.stop_reason or "deadline"
            if not await self._running(container.name):
                return False, None
            await asyncio.sleep(probe.period_seconds)
        return False, None

    async def _run_agent(self, agent: ContainerPlan) -> tuple[int, str | None, bool]:
        cname = self._cname(agent.name)
        await self.podman.run("init", cname)
        info = await self.podman.inspect("container", cname) or {}
        watch = OomWatch(int((info.get("State") or {}).get("Pid") or 0))  # the container's init, in its cgroup
        self.agent_stopped.clear()
        try:
            await self.podman.run("start", cname)
            liveness = asyncio.ensure_future(self._liveness(agent.name, agent.liveness_probe)) if agent.liveness_probe else None
            try:
                stopped_by = await self._wait_agent(agent.name)
            finally:
                if liveness is not None:
                    liveness.cancel()
            if stopped_by:
                await self.podman.run("stop", "--time", str(int(self.spec.grace_seconds)), cname, check=False)
            info = await self.podman.inspect("container", cname) or {}
            state = info.get("State") or {}
            oom = bool(state.get("OOMKilled")) or bool(await watch.oom_killed())
            code = int(state.get("ExitCode", -1))
            if stopped_by is None and code == -1 and self.sup.stop_reason:
                stopped_by = self.sup.stop_reason  # no exit status while a stop was under way: the stop's doing, no failure
            return code, stopped_by, oom
        finally:
            watch.close()
            self.agent_stopped.set()

    async def _liveness(self, container: str, probe: Probe) -> None:
        """The kubelet's liveness probe: after failureThreshold failures in a row the container is stopped."""
        await asyncio.sleep(probe.initial_delay_seconds)
        failures = 0
        while True:
            failures = 0 if await self._probe(container, probe) else failures + 1
            if failures >= probe.failure_threshold:
                grace = probe.termination_grace_seconds if probe.termination_grace_seconds is not None else self.spec.grace_seconds
                log.warning("task %s: the liveness probe of %s failed %d times; stopping it", self.sup.state.task_id, container, failures)
                await self.podman.run("stop", "--time", str(int(grace)), self._cname(container), check=False)
                return
            await asyncio.sleep(probe.period_seconds)

    async def _wait_agent(self, container: str) -> str | None:
        """`_wait`, trusted only once the container has stopped: a `podman wait` that answers while the agent still
        runs (seen once, as dev shut down) would count a running agent as a failed attempt and leave it running."""
        while True:
            stopped_by = await self._wait(container)
            if stopped_by or not await self._running(container):
                return stopped_by
            if self.sup.stop_reason:
                return self.sup.stop_reason
            log.warning("task %s: podman wait answered while %s runs; waiting again", self.sup.state.task_id, container)
            await asyncio.sleep(0.5)

    async def _wait(self, container: str) -> str | None:
        """Wait until the container exits (None) or a cancel, shutdown or the deadline stops it first."""
        waiter = self.podman.run("wait", self._cname(container), check=False, timeout=None)
        return await wait_or_stop(self.sup, waiter)

    async def _stop_sidecars(self, plan: PodPlan) -> None:
        for container in reversed([c for c in plan.containers if c.kind == "sidecar"]):
            await self.podman.run("stop", "--time", str(int(self.spec.grace_seconds)), self._cname(container.name), check=False)

    async def _stop_pod(self) -> None:
        await self.podman.run("stop", "--time", str(int(self.spec.grace_seconds)), self._cname("agent"), check=False, timeout=None)
        await self.podman.run("pod", "stop", "--time", str(int(self.spec.grace_seconds)), self.name, check=False, timeout=None)

    async def _termination_message(self, container: str, code: int, began: float) -> str | None:
        summary = summary_this_attempt(self.sup.folder, self.read_summary, began)
        if summary or code == contract.EXIT_DONE:
            return summary
        return log_tail(await self._logs(container))

    async def _logs(self, container: str) -> str | None:
        code, out, err = await self.podman.run("logs", "--tail", str(LOG_TAIL_LINES), self._cname(container), check=False)
        return (out + err) if code == 0 else None

    async def _exit_code(self, container: str) -> int:
        info = await self.podman.inspect("container", self._cname(container)) or {}
        return int((info.get("State") or {}).get("ExitCode", -1))

    async def _running(self, container: str) -> bool:
        info = await self.podman.inspect("container", self._cname(container)) or {}
        return bool((info.get("State") or {}).get("Running"))

    async def _probe(self, container: str, probe: Probe) -> bool:
        try:
            code, _, _ = await self.podman.run("exec", self._cname(container), *probe.command, check=False,
                                               timeout=probe.timeout_seconds + 5)
        except Exception:  # noqa: BLE001 - a probe that cannot run has failed
            return False
        return code == 0

    def _cname(self, container: str) -> str:
        return f"{self.name}-{container}"


def _live(pod: dict) -> bool:
    """Some container of the pod runs (podman says Degraded when others have exited, as the init container has)."""
    return pod.get("State") in ("Running", "Degraded")


def _job_uid(inspected: dict) -> str | None:
    """The Job uid label of an inspected pod or volume."""
    labels = inspected.get("Labels") or (inspected.get("Config") or {}).get("Labels") or {}
    return labels.get(JOB_UID_LABEL)
