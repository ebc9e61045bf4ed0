"""dev.dockyard.task.submitted -> a registered, announced, launched task.

Order matters for at-least-once delivery:
1. the registry record is created (kv.create: of any number of concurrent
   deliveries exactly one creates it);
2. that delivery publishes the `queued` status event, before the launch: the
   tracker applies events in stream order, so `queued` must precede the
   agent's own `started`;
3. the runtime launches (idempotent: a redelivery completes a half-done launch);
4. the Job's uid is recorded (`job_uid`): `job_finished` acts only on that Job.
   A crash before this step leaves `job_uid` empty; the redelivery records it.
A redelivery with the same spec is answered 200 "already submitted" (and a
finished task is not launched again); the same id with another spec is a 409.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudevents.http import CloudEvent

from agent import contract
from functions.core.cloudevent import require_type
from functions.core.registry import TaskRecord, new_record
from functions.errors import LaunchConflict
from functions.core.task import parse_task

if TYPE_CHECKING:
    from functions.handlers.context import Context


async def handle(event: CloudEvent, ctx: "Context") -> dict:
    require_type(event, contract.EVENT_TASK_SUBMITTED)
    task = parse_task(event.get_data(), source=event["source"], event_id=event["id"], policy=ctx.settings.limits,
                      allow_file_repos=ctx.settings.allow_file_repos)

    record = new_record(task.task_id, task=task.to_dict(), spec_hash=task.spec_hash, now=contract.iso_utc())
    revision = await ctx.registry.create(task.task_id, record)
    created = revision is not None
    if not created:
        existing = await ctx.registry.get(task.task_id)
        if existing is not None and existing.get("spec_hash") not in (None, task.spec_hash):
            raise LaunchConflict(
                f"task {task.task_id} already exists with a different spec; "
                "choose another task_id (or omit it to have one derived from the event)"
            )
        if existing is not None and existing.get("state") in contract.TERMINAL_STATES:
            # Launching again would re-run a finished task once its Job is gone.
            return {"task_id": task.task_id, "status": "already finished"}

    if created:
        await ctx.bus.publish_event(task.task_id, contract.EV_STATUS, state=contract.STATE_QUEUED)
    await ctx.runtime.launch(task)
    await _record_job_uid(ctx, task.task_id, (record, revision) if created else None)
    return {"task_id": task.task_id, "status": "submitted" if created else "already submitted"}


async def _record_job_uid(ctx: "Context", task_id: str, known: "tuple[TaskRecord, int] | None") -> None:
    uid = await ctx.runtime.job_uid(task_id)
    if uid is None:
        return  # gone already (cancelled, or expired): nothing to bind

    def bind(current: TaskRecord) -> TaskRecord | None:
        if current.get("job_uid") == uid:
            return None
        return {**current, "job_uid": uid, "updated_at": contract.iso_utc()}

    await ctx.registry.update(task_id, bind, known)
