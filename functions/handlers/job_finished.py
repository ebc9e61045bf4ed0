"""dev.knative.apiserver.resource.update (data: a Job) -> the task's terminal status.

The event is a hint to look, never the truth: anyone who reaches the Broker
can forge one. From its data only the task id (label) and the Job uid are
taken; the Job itself, its conditions and its termination message, are read
from the runtime (`runtime.finished_job`: the Kubernetes API, or the local
runtime). The task's end is recorded only when the runtime has a finished Job
for the task, its uid is the event's, and it is the Job recorded at launch
(the record's `job_uid`). Anything else is answered 200 "ignored" (so the
Broker does not retry) and changes nothing. Only Jobs labelled managed-by
dockyard with a `Complete` or `Failed` condition whose status is "True" count.

Idempotent per Job UID: the UID goes into the record's `finished_uids` after
the terminal event is published (with the UID as JetStream message id, so a
concurrent duplicate is dropped). A crash in between re-publishes on
redelivery, which is at-least-once as promised; a UID already recorded is a
200 no-op.

The final snapshot is complete when `final/result.json` exists: the
snapshotter uploads it after the workspace archive.

The end is said in words (functions.core.outcome): reason, failure class, detail,
attempts, the deadline, first start, queue time; the status event and the record
carry the same fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cloudevents.http import CloudEvent

from agent import contract
from functions.core.cloudevent import data_object, require_type
from functions.core.outcome import describe_end
from functions.core.registry import TaskRecord, new_record
from functions.errors import BadInput, StoreUnavailable

if TYPE_CHECKING:
    from functions.handlers.context import Context

log = logging.getLogger(__name__)

FINISHED_CONDITIONS = ("Complete", "Failed")
# The ApiServerSource posts the whole Job, which carries the task twice (its annotations and the
# pod template's, which the downward API reads): a 64 KiB prompt makes a Job over the default
# 256 KiB. A Kubernetes object is at most ~1.5 MiB (etcd's request limit); the Broker that sends
# it is cluster-local. Only the uid and the task-id label are taken from it (the runtime is the truth).
MAX_BODY_BYTES = 2 * 1024 * 1024


def finished_condition(job: dict) -> dict | None:
    """The Job's Complete/Failed condition with status "True", if any."""
    status = job.get("status") if isinstance(job.get("status"), dict) else {}
    for condition in status.get("conditions") or []:
        if (
            isinstance(condition, dict)
            and condition.get("type") in FINISHED_CONDITIONS
            and str(condition.get("status")) == "True"
        ):
            return condition
    return None


def _termination_message(job: dict) -> str | None:
    """The agent's termination message when the sender put it on the Job (the local runtime does)."""
    status = job.get("status") if isinstance(job.get("status"), dict) else {}
    message = status.get("terminationMessage")
    return message if isinstance(message, str) and message else None


def _agent_exit_reason(job: dict) -> str | None:
    """How the agent container ended, when it did not end well (`OOMKilled`, `Error (exit code 2)`,
    `signal 9`): the Kubernetes runtime puts it on the Job as `status.agentExit` (from the pod)."""
    status = job.get("status") if isinstance(job.get("status"), dict) else {}
    exit_ = status.get("agentExit") if isinstance(status.get("agentExit"), dict) else {}
    reason, code, signal = exit_.get("reason"), exit_.get("exitCode"), exit_.get("signal")
    if not exit_ or (code == 0 and not signal and reason in (None, "Completed")):
        return None
    detail = f"exit code {code}" if isinstance(code, int) else (f"signal {signal}" if signal else "")
    if isinstance(reason, str) and reason and reason != "Error":
        return f"{reason} ({detail})" if detail else reason
    return f"Error ({detail})" if detail else None


def _read_store(open_store: Callable[[], Any], task_id: str) -> tuple[dict | None, bool, list[str]]:
    """(result.json or None, final snapshot missing, snapshot keys) — blocking I/O.

    The store is opened inside the try: a credentials file it cannot read (a Secret mounted
    with a mode its user cannot read) is the store's trouble, a 503, not a 500."""
    from agent.storage import ObjectNotFound, StorageError

    try:
        store = open_store()
        keys = store.list(contract.checkpoints_prefix(task_id))
        final_key = contract.final_result_key(task_id)
        if not store.exists(final_key):
            return None, True, keys
        try:
            raw = store.get_bytes(final_key)
        except ObjectNotFound:
            return None, True, keys
    except (StorageError, OSError) as exc:
        raise StoreUnavailable(f"object store: {exc}") from exc
    keys += [contract.final_archive_key(task_id), final_key]
    try:
        result = json.loads(raw)
    except ValueError:
        result = None
    return (result if isinstance(result, dict) else None), False, keys


def _outcome(condition: dict, result: dict | None, record: TaskRecord) -> str:
    reported = (result or {}).get("outcome")
    if isinstance(reported, str) and reported and reported != "unknown":
        return reported
    if condition["type"] == "Complete":
        return contract.OUTCOME_DONE
    if record.get("cancel_requested_at") or condition.get("reason") == "Cancelled":  # "Cancelled": the local runtime
        return contract.OUTCOME_CANCELLED
    if condition.get("reason") == "DeadlineExceeded":
        return contract.OUTCOME_DEADLINE
    return contract.OUTCOME_FAILED


def _job_uid(job: dict) -> str | None:
    metadata = job.get("metadata") if isinstance(job.get("metadata"), dict) else {}
    uid = metadata.get("uid")
    return uid if isinstance(uid, str) and uid else None


def launched_here(job: dict, record: TaskRecord | None) -> bool:
    """The runtime's Job is the one recorded at launch (a record without a uid takes the runtime's word)."""
    recorded = (record or {}).get("job_uid")
    return recorded is None or recorded == _job_uid(job)


def _hint(job: dict) -> tuple[str, str] | dict:
    """(task id, Job uid) named by the event's data; or the answer for an event to ignore."""
    metadata = job.get("metadata")
    if not isinstance(metadata, dict):
        raise BadInput("event data must be a Kubernetes object with metadata", "data.metadata")
    labels = metadata.get("labels") if isinstance(metadata.get("labels"), dict) else {}
    if labels.get(contract.LABEL_MANAGED_BY) != contract.MANAGED_BY:
        return {"status": "ignored", "reason": "not a dockyard job"}
    if finished_condition(job) is None:
        return {"status": "ignored", "reason": "job not finished"}
    task_id = labels.get(contract.LABEL_TASK_ID)
    if not contract.is_valid_task_id(task_id):
        raise BadInput(f"label {contract.LABEL_TASK_ID} must hold a task id", "data.metadata.labels")
    uid = _job_uid(job)
    if uid is None:
        raise BadInput("the Job has no metadata.uid", "data.metadata.uid")
    return task_id, uid


async def handle(event: CloudEvent, ctx: "Context") -> dict:
    require_type(event, contract.EVENT_JOB_UPDATE)
    hint = _hint(data_object(event))
    if isinstance(hint, dict):
        return hint
    task_id, uid = hint
    job = await ctx.runtime.finished_job(task_id)
    if job is None:
        return _ignored(task_id, uid, "the runtime has no finished Job for this task")
    if _job_uid(job) != uid:
        return _ignored(task_id, uid, "the event's Job uid is not the uid of the task's Job")
    if not launched_here(job, await ctx.registry.get(task_id)):
        return _ignored(task_id, uid, "the Job is not the one launched for this task")
    return await record_finished_job(job, ctx)


def _ignored(task_id: str, uid: str, reason: str) -> dict:
    log.warning("job-finished event for task %s (Job uid %s) ignored: %s", task_id, uid, reason)
    return {"task_id": task_id, "status": "ignored", "reason": reason}


async def record_finished_job(job: dict, ctx: "Context") -> dict:
    """Record the end of a finished Job read from the runtime (never one taken from an event):
    `handle` calls it once the event's hint is confirmed, `snapshot_due` for Jobs whose event was missed."""
    hint = _hint(job)
    if isinstance(hint, dict):
        return hint
    task_id, uid = hint
    metadata = job["metadata"]
    condition = finished_condition(job) or {"type": "Failed"}  # _hint checked that there is one

    record = await ctx.registry.get(task_id)
    if record is None:
        # The entry is gone (expired, or the registry was reset): rebuild it from the Job.
        task = _annotated_task(metadata)
        await ctx.registry.create(task_id, new_record(task_id, task=task, spec_hash=None, now=contract.iso_utc()))
        record = await ctx.registry.get(task_id) or {}
    if uid in (record.get("finished_uids") or []):
        return {"task_id": task_id, "status": "already handled"}

    result, final_missing, snapshot_keys = await asyncio.to_thread(_read_store, lambda: ctx.store, task_id)
    # Read again: the tracker may have put the agent's own words for its end on the record meanwhile
    # (they stand in for a result.json the snapshotter could not upload).
    record = await ctx.registry.get(task_id) or record
    outcome = _outcome(condition, result, record)
    summary = (result or {}).get("summary")
    termination_message = _termination_message(job)
    end = describe_end(outcome=outcome, condition=condition, job=job, result=result, record=record,
                       termination_message=termination_message, agent_exit=_agent_exit_reason(job))
    succeeded = condition["type"] == "Complete" and outcome == contract.OUTCOME_DONE
    retention = ctx.settings.ttl_succeeded_seconds if succeeded else ctx.settings.ttl_failed_seconds

    await ctx.bus.publish_event(
        task_id,
        contract.EV_STATUS,
        msg_id=f"finished-{uid}",
        state=contract.STATE_FINISHED,
        outcome=outcome,
        summary=summary,
        termination_message=termination_message,
        snapshot_keys=snapshot_keys,
        final_snapshot_missing=final_missing,
        **end,
    )

    def finish(current: TaskRecord) -> TaskRecord | None:
        if uid in (current.get("finished_uids") or []):
            return None
        return {
            **current,
            **end,
            "state": contract.STATE_FINISHED,
            "outcome": outcome,
            "summary": summary,
            "termination_message": termination_message,
            "snapshot_keys": snapshot_keys,
            "final_snapshot_missing": final_missing,
            "job_uid": uid,
            "finished_uids": [*(current.get("finished_uids") or []), uid],
            "retention_seconds": retention,
            "attempts": max(end["attempts"], current.get("attempts") or 0),
            "updated_at": contract.iso_utc(),
        }

    await ctx.registry.update(task_id, finish)
    return {"task_id": task_id, "status": "finished", "outcome": outcome, "final_snapshot_missing": final_missing}


def _annotated_task(metadata: dict) -> dict | None:
    annotations = metadata.get("annotations") if isinstance(metadata.get("annotations"), dict) else {}
    raw = annotations.get(contract.ANNOTATION_TASK)
    try:
        task = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return task if isinstance(task, dict) else None
