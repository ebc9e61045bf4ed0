"""The seam between the functions and where agents run (implementations: functions.runtime).

A runtime turns a validated task into a running agent (a Kubernetes Job, or
child processes on this machine) and answers questions about it. Every method
is idempotent: the broker delivers at least once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from functions.core.task import Task


@dataclass
class TaskStatus:
    task_id: str
    state: str  # contract.STATE_* ("queued", "started", "retrying", "finished")
    outcome: str | None = None  # contract.OUTCOME_* once finished
    attempts: int = 0
    reason: str | None = None
    details: dict = field(default_factory=dict)


class Runtime(Protocol):
    async def launch(self, task: Task) -> bool:
        """Start the task. Returns True if this call created it, False if it already existed
        with the same spec. Raises LaunchConflict for the same id with another spec."""

    async def status(self, task_id: str) -> TaskStatus:
        """Raises TaskNotFound."""

    async def cancel(self, task_id: str) -> None:
        """Stop the task's agent and its job. Raises TaskNotFound."""

    async def list(self) -> list[TaskStatus]: ...

    async def finished_job(self, task_id: str) -> dict | None:
        """The task's Job, in the shape the ApiServerSource sends, once it has a Complete or Failed
        condition; None while it runs or when it is gone. `snapshot_due` uses it to record Jobs
        whose job-finished event never arrived."""
