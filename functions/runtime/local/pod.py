"""The seam between one task's Job controller (supervisor.py) and where an attempt's containers run.

The supervisor decides *whether* and *when* to run an attempt (admission, retries, backoff, the
deadline, the job event); a `Pod` runs one attempt and tells how it ended. Two kinds exist:
child processes on this machine (`processes.LocalPod`) and a podman pod
(`functions.runtime.podman.pod.PodmanPod`).

Invariants
- The Job's semantics reach the supervisor as a `JobSpec`: the local runtime builds it from the task,
  the podman runtime reads it from the rendered Job (`JobSpec.from_job`), so both follow the same rules.
- A pod records on the task's state what the Job controller would (attempts, exit codes, the
  termination message, the agent container's end) and saves it through `Supervised.save`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Protocol

from agent import contract
from functions.core.task import Task
from functions.runtime.local.clock import Clock
from functions.runtime.local.state import SupervisorState, TaskFolder

TERMINATION_MESSAGE_BYTES = 2048  # what Kubernetes keeps of a termination message
TERMINATION_MESSAGE_LINES = 80  # FallbackToLogsOnError: the last 80 lines of the log


@dataclass(frozen=True)
class JobSpec:
    """What of a Job's spec its controller obeys."""

    backoff_limit: int
    deadline_seconds: int
    grace_seconds: float  # terminationGracePeriodSeconds: SIGTERM to SIGKILL
    fail_job_exit_codes: dict[str, frozenset[int]] = field(default_factory=dict)  # podFailurePolicy FailJob, by container

    @classmethod
    def for_task(cls, task: Task, grace_seconds: float) -> JobSpec:
        """The local runtime's Job: the same rules the factory renders (factory.render_job)."""
        return cls(
            backoff_limit=task.limits.retries,
            deadline_seconds=task.limits.deadline_seconds,
            grace_seconds=grace_seconds,
            fail_job_exit_codes={
                "agent": frozenset(contract.NO_RETRY_EXIT_CODES),
                "restore": frozenset({contract.EXIT_FATAL}),
            },
        )

    @classmethod
    def from_job(cls, job: dict) -> JobSpec:
        """Read from a rendered `batch/v1` Job: backoffLimit, activeDeadlineSeconds,
        terminationGracePeriodSeconds and the podFailurePolicy's FailJob rules on exit codes."""
        spec = job["spec"]
        codes: dict[str, frozenset[int]] = {}
        for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
            on = rule.get("onExitCodes")
            if rule.get("action") != "FailJob" or not on or on.get("operator") != "In":
                continue
            name = on.get("containerName") or "*"
            codes[name] = codes.get(name, frozenset()) | frozenset(on["values"])
        return cls(
            backoff_limit=int(spec.get("backoffLimit", 6)),
            deadline_seconds=int(spec["activeDeadlineSeconds"]),
            grace_seconds=float(spec["template"]["spec"].get("terminationGracePeriodSeconds", 30)),
            fail_job_exit_codes=codes,
        )

    def fails_job(self, container: str, code: int) -> bool:
        return code in self.fail_job_exit_codes.get(container, ()) or code in self.fail_job_exit_codes.get("*", ())


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended: the exit code of `container` (the agent, or the init container that
    failed), and what stopped it early if anything ("cancel", "shutdown", "deadline")."""

    code: int
    stopped_by: str | None = None
    container: str = "agent"


class Supervised(Protocol):
    """What a pod sees of its task's supervisor."""

    state: SupervisorState
    task: Task
    folder: TaskFolder
    interrupt: asyncio.Event
    stop_reason: str | None
    clock: Clock

    def deadline_left(self) -> float: ...

    def save(self) -> None: ...


class Pod(Protocol):
    """Where one task's attempts run. Every method may be called again after a restart of the process."""

    async def recover(self) -> None:
        """Deal with what a previous process left running for this task (stop it, or adopt it)."""

    async def run_attempt(self) -> AttemptEnd:
        """One attempt: init container, sidecars, the agent until it exits or is stopped."""

    async def finish(self) -> None:
        """The task is finished: let the sidecars end (the snapshotter's final upload)."""

    async def agent_gone(self) -> None:
        """Wait until the agent has exited (after a stop, at most the grace period and a little)."""

    async def close(self) -> None:
        """Stop whatever still runs (a shutdown, or the end of the supervision)."""


def log_tail(text: str | None) -> str | None:
    """FallbackToLogsOnError: the last 80 lines of a container's log, at most 2048 bytes."""
    if text is None:
        return None
    tail = "\n".join(text.splitlines()[-TERMINATION_MESSAGE_LINES:])
    return tail.encode()[-TERMINATION_MESSAGE_BYTES:].decode(errors="ignore") or None


def summary_this_attempt(folder: TaskFolder, read_summary: Callable[[], object], began: float) -> str | None:
    """The summary the agent left in its result file during the attempt that began at `began`, cut as
    a termination message is; None when the file is older (a previous attempt's) or has none."""
    result_file = folder.result_file
    fresh = result_file.exists() and result_file.stat().st_mtime >= began - 1
    summary = read_summary() if fresh else None
    return str(summary).encode()[:TERMINATION_MESSAGE_BYTES].decode(errors="ignore") if summary else None
