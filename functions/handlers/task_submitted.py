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

Lineage (`from: {task_id, snapshot?, workspace?}`): the parent's record gives
the fields the data leaves out (prompt, repo, model, limits); a fork
(workspace "restore") needs a finished parent with its final set stored, and
its snapshot is resolved to a key here (the newest when none is named), so the
child's spec, and its hash, say exactly where it starts. A finished parent's
snapshots no longer change, so a redelivery resolves the same key: the same
child, the same spec hash.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from cloudevents.http import CloudEvent

from agent import contract
from functions.core.cloudevent import require_type
from functions.core.registry import TaskRecord, new_record
from functions.errors import BadInput, LaunchConflict, StoreUnavailable
from functions.core.task import WORKSPACE_RESTORE, inherit, parse_from, parse_task, with_parent

if TYPE_CHECKING:
    from agent.storage import Store
    from functions.handlers.context import Context


async def handle(event: CloudEvent, ctx: "Context") -> dict:
    require_type(event, contract.EVENT_TASK_SUBMITTED)
    data, parent = event.get_data(), None
    if isinstance(data, dict) and data.get("from") is not None:
        data, parent = await _lineage(ctx, data)
    task = parse_task(data, source=event["source"], event_id=event["id"], policy=ctx.settings.limits,
                      allow_file_repos=ctx.settings.allow_file_repos)
    if parent is not None:
        task = with_parent(task, parent)

    record = new_record(task.task_id, task=task.to_dict(), spec_hash=task.spec_hash, now=contract.iso_utc())
    if task.parent:
        record["parent"] = dict(task.parent)
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


async def _lineage(ctx: "Context", data: dict) -> tuple[dict, dict]:
    """(the child's data with the parent's fields filled in, the lineage with its snapshot resolved)."""
    lineage = parse_from(data["from"])
    parent_id = lineage["task_id"]
    record = await ctx.registry.get(parent_id)
    if record is None:
        raise BadInput(f"from.task_id: there is no task {parent_id!r} (it never existed, or its record expired)", "from.task_id", 404)
    spec = record.get("task")
    if not isinstance(spec, dict):
        raise BadInput(f"from.task_id: task {parent_id!r} has no recorded spec to start from; submit the task anew", "from.task_id", 409)
    child = inherit({k: v for k, v in data.items() if k != "from"}, spec)
    if lineage["workspace"] == WORKSPACE_RESTORE:
        if record.get("state") not in contract.TERMINAL_STATES:
            raise BadInput(
                f"from.task_id: task {parent_id!r} is still running; fork it once it has finished "
                "(its final workspace is stored then), or retry it with a fresh workspace", "from.task_id", 409)
        lineage["snapshot"] = await asyncio.to_thread(_resolve_snapshot, lambda: ctx.store, parent_id, lineage["snapshot"])
    return child, lineage


def _resolve_snapshot(open_store, parent_id: str, requested: str | None) -> str | None:
    """The key of the parent's snapshot a fork starts from (blocking I/O): the one named (its key, or
    its name with or without `.db`), else the newest; None when the parent has none (the fork then starts
    a new conversation in the parent's workspace). The parent's final set must be stored."""
    from agent.storage import StorageError

    try:
        store: "Store" = open_store()
        if not store.exists(contract.final_result_key(parent_id)):
            raise BadInput(
                f"from.task_id: task {parent_id!r} ended without a final workspace archive, so there is nothing to "
                "fork from; retry it instead (workspace \"fresh\")", "from.task_id", 409)
        # Checkpoint snapshots are `<UTC time stamp>.db` (contract.checkpoint_key): sorted, the newest is last.
        keys = sorted(k for k in store.list(contract.checkpoints_prefix(parent_id)) if k.endswith(".db"))
    except (StorageError, OSError) as exc:
        raise StoreUnavailable(f"object store: {exc}") from exc
    if requested is None:
        return keys[-1] if keys else None
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if requested in (key, name, name.removesuffix(".db")):
            return key
    names = ", ".join(k.rsplit("/", 1)[-1] for k in keys[-5:]) or "none"
    raise BadInput(f"from.snapshot: task {parent_id!r} has no snapshot {requested!r}; its newest: {names}", "from.snapshot", 404)


async def _record_job_uid(ctx: "Context", task_id: str, known: "tuple[TaskRecord, int] | None") -> None:
    uid = await ctx.runtime.job_uid(task_id)
    if uid is None:
        return  # gone already (cancelled, or expired): nothing to bind

    def bind(current: TaskRecord) -> TaskRecord | None:
        if current.get("job_uid") == uid:
            return None
        return {**current, "job_uid": uid, "updated_at": contract.iso_utc()}

    await ctx.registry.update(task_id, bind, known)
