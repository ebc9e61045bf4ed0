"""dev.knative.sources.ping -> ask every unfinished task's snapshotter for a snapshot.

All tasks are asked concurrently, each with its own timeout, so one silent
agent never delays the others. A task whose last good snapshot (or, before
the first one, its creation) is older than the stale age gets a `warning`
event. The same tick drops registry entries of finished tasks whose retention
has passed, and records tasks whose Job has finished although no job-finished
event arrived (the ApiServerSource was down, or the event was dead-lettered):
the runtime is the truth, the event only the fast path. The answer is a
summary, also logged.

A ping is idempotent within `snapshot_min_interval_seconds`: the round is
claimed in NATS (`TaskRegistry.claim_round`), so a burst of pings at any
number of instances costs one round; the others answer 200 "skipped".
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from cloudevents.http import CloudEvent

from agent import contract
from functions.errors import NoReply
from functions.core.cloudevent import require_type
from functions.handlers.job_finished import launched_here, record_finished_job

if TYPE_CHECKING:
    from functions.core.registry import TaskRecord
    from functions.handlers.context import Context

log = logging.getLogger(__name__)

MAX_SNAPSHOT_KEYS = 50  # the newest keys kept in a record; the store holds them all


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _expired(record: "TaskRecord", now: datetime) -> bool:
    if record.get("state") not in contract.TERMINAL_STATES or not record.get("retention_seconds"):
        return False
    finished = _parse_time(record.get("finished_at") or record.get("updated_at"))
    return finished is not None and (now - finished).total_seconds() > record["retention_seconds"]


async def _snapshot(ctx: "Context", record: "TaskRecord", now: datetime) -> str:
    """Ask one task for a snapshot; returns "snapshotted", "no_reply" or "stale"."""
    task_id = record["task_id"]
    try:
        reply = await ctx.bus.request(
            contract.subject_cmd(task_id), {"op": "snapshot"}, timeout=ctx.settings.snapshot_timeout_seconds,
            reply_prefix=contract.command_reply_prefix(task_id),
        )
    except NoReply as exc:
        reply = {"ok": False, "error": str(exc)}

    if reply.get("ok", True) is True:
        key = reply.get("key")

        def remember(current: "TaskRecord") -> "TaskRecord":
            keys = list(current.get("snapshot_keys") or [])
            if isinstance(key, str) and key and key not in keys:
                keys = [*keys, key][-MAX_SNAPSHOT_KEYS:]
            at = contract.iso_utc()
            return {**current, "last_snapshot_at": at, "last_snapshot_key": key, "snapshot_keys": keys, "updated_at": at}

        await ctx.registry.update(task_id, remember)
        return "snapshotted"

    last_good = _parse_time(record.get("last_snapshot_at") or record.get("created_at"))
    age = (now - last_good).total_seconds() if last_good else None
    if age is None or age > ctx.settings.snapshot_stale_seconds:
        await ctx.bus.publish_event(
            task_id,
            contract.EV_WARNING,
            reason="snapshot_stale",
            message=(
                f"no good snapshot for {age:.0f}s (limit {ctx.settings.snapshot_stale_seconds:g}s); "
                f"last request: {reply.get('error') or 'refused'}"
                if age is not None
                else "no good snapshot yet"
            ),
            last_snapshot_at=record.get("last_snapshot_at"),
            last_snapshot_key=record.get("last_snapshot_key"),
        )
        return "stale"
    return "no_reply"


ROUND = "snapshot-due"


async def handle(event: CloudEvent, ctx: "Context") -> dict:
    require_type(event, contract.EVENT_PING)
    now = datetime.now(timezone.utc)
    window = ctx.settings.snapshot_min_interval_seconds
    if window > 0 and not await ctx.registry.claim_round(ROUND, now.timestamp(), window):
        log.info("snapshot due: skipped, a round ran less than %gs ago", window)
        return {"status": "skipped", "reason": f"a snapshot round ran less than {window:g}s ago", "asked": 0}
    records = await ctx.registry.list()

    expired = [r["task_id"] for r in records if _expired(r, now)]
    for task_id in expired:
        await ctx.registry.delete(task_id)

    active = [r for r in records if r.get("state") not in contract.TERMINAL_STATES]
    finished_jobs = await asyncio.gather(*(ctx.runtime.finished_job(r["task_id"]) for r in active))
    reconciled = []
    for record, job in zip(active, finished_jobs, strict=True):
        if job is not None and launched_here(job, record):
            await record_finished_job(job, ctx)
            reconciled.append(record["task_id"])
    active = [r for r in active if r["task_id"] not in reconciled]
    results = await asyncio.gather(*(_snapshot(ctx, r, now) for r in active), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result  # NATS itself is in trouble: 503, the next tick (or the retry) tries again

    summary = {"asked": len(active), "expired": expired, "reconciled": reconciled}
    for kind in ("snapshotted", "no_reply", "stale"):
        summary[kind] = [r["task_id"] for r, outcome in zip(active, results, strict=True) if outcome == kind]
    log.info(
        "snapshot due: asked %d, snapshotted %d, no reply %d, stale %d, expired %d, reconciled %d",
        summary["asked"],
        len(summary["snapshotted"]),
        len(summary["no_reply"]),
        len(summary["stale"]),
        len(expired),
        len(reconciled),
    )
    return summary
