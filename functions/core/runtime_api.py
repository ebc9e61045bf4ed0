"""The seam between the functions and where agents run (implementations: functions.runtime).

A runtime turns a validated task into a running agent (a Kubernetes Job, or
child processes on this machine), stops it, and hands over its Job once it has
finished. Every method is idempotent: the broker delivers at least once.
"""

from __future__ import annotations

from typing import Protocol

from functions.core.task import Task


class Runtime(Protocol):
    async def launch(self, task: Task) -> bool:
        """Start the task. Returns True if this call completed its launch, False if it already existed
        with the same spec (of concurrent deliveries exactly one answers True). Raises LaunchConflict
        for the same id with another spec."""

    async def job_uid(self, task_id: str) -> str | None:
        """The uid of the task's Job as the runtime knows it (running or finished); None when there is none.
        `task_submitted` records it after the launch: `job_finished` acts only on that Job."""

    async def cancel(self, task_id: str) -> None:
        """Stop the task's agent and its job. Raises TaskNotFound."""

    async def finished_job(self, task_id: str) -> dict | None:
        """The task's Job, in the shape the ApiServerSource sends, once it has a Complete or Failed
        condition; None while it runs or when it is gone. `snapshot_due` uses it to record Jobs
        whose job-finished event never arrived."""
