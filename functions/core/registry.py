"""The task registry: one JSON record per task in the NATS KV bucket `dockyard-tasks`.

Invariants: a record is created only by `create` (kv.create: exactly one
caller wins for a task id, however many deliveries race), and changed only by
`update`, a compare-and-set on the entry's revision retried until it lands,
so concurrent writers (functions, the tracker) never lose each other's fields.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Callable, NotRequired, TypedDict

from agent import contract
from functions.errors import RegistryConflict

UPDATE_ATTEMPTS = 50
ROUND_KEY_PREFIX = "_round."  # keys of `claim_round`: never a task id, so `list` leaves them out


class TaskRecord(TypedDict):
    """A task's record. `new_record` sets the first group; the writers named add the rest.
    Every writer changes only the keys it owns and keeps the others (`{**current, ...}`)."""

    task_id: str
    state: str  # contract.STATE_*
    phase: str | None
    outcome: str | None
    reason: str | None
    created_at: str  # contract.iso_utc
    updated_at: str
    spec_hash: str | None  # None when rebuilt from a Job (job_finished)
    task: dict | None  # Task.to_dict()
    attempts: int
    job_uid: str | None
    snapshot_keys: list[str]
    termination_message: str | None
    finished_uids: list[str]  # Jobs whose end was recorded (job_finished is idempotent by uid)
    retention_seconds: int | None  # how long a finished record is kept (snapshot_due expires it)
    events_seq: NotRequired[int]  # the tracker: last stream sequence applied (forward-only updates)
    summary: NotRequired[str | None]  # job_finished: from the agent's result
    final_snapshot_missing: NotRequired[bool]  # job_finished
    finished_at: NotRequired[str]  # job_finished: when the Job ended
    failure_class: NotRequired[str | None]  # job_finished (the tracker from the agent's own end first): "fatal" | "transient"
    detail: NotRequired[str | None]  # job_finished: what lies behind `reason` (git's message, the log tail)
    deadline_seconds: NotRequired[int | None]  # job_finished: the limit, counted from the first start
    started_at: NotRequired[str | None]  # job_finished: the first start (the Job's startTime: when it was admitted)
    queued_seconds: NotRequired[float | None]  # job_finished: submitted (created_at) to the first start
    last_snapshot_at: NotRequired[str]  # snapshot_due: the last good snapshot
    last_snapshot_key: NotRequired[str | None]
    cancel_requested_at: NotRequired[str]  # task_command
    parent: NotRequired[dict]  # task_submitted, for a retry or fork: {"task_id", "snapshot", "workspace"} (Task.parent)
    usage: NotRequired[dict]  # the tracker: the model gateway's usage events summed (calls, tokens, cost_usd, ...)


def new_record(task_id: str, *, task: dict | None, spec_hash: str | None, now: str) -> TaskRecord:
    """A freshly queued task."""
    return TaskRecord(
        task_id=task_id,
        state=contract.STATE_QUEUED,
        phase=None,
        outcome=None,
        reason=None,
        created_at=now,
        updated_at=now,
        spec_hash=spec_hash,
        task=task,
        attempts=0,
        job_uid=None,
        snapshot_keys=[],
        termination_message=None,
        finished_uids=[],
        retention_seconds=None,
    )


class TaskRegistry:
    def __init__(self, kv, js):
        self.kv = kv
        self.js = js

    @classmethod
    async def open(cls, js) -> "TaskRegistry":
        """The bucket, created if missing (concurrent creators are fine)."""
        from nats.js.errors import BadRequestError, BucketNotFoundError

        try:
            return cls(await js.key_value(contract.KV_BUCKET), js)
        except BucketNotFoundError:
            pass
        try:
            kv = await js.create_key_value(bucket=contract.KV_BUCKET, history=1, description="dockyard tasks")
        except BadRequestError:
            kv = await js.key_value(contract.KV_BUCKET)
        return cls(kv, js)

    async def _entry(self, task_id: str):
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            return await self.kv.get(task_id)
        except (KeyNotFoundError, KeyDeletedError):  # never written, or deleted or purged
            return None

    async def get(self, task_id: str) -> TaskRecord | None:
        entry = await self._entry(task_id)
        return json.loads(entry.value) if entry is not None and entry.value else None

    async def create(self, task_id: str, record: TaskRecord) -> int | None:
        """Store the record unless the task exists; its revision when this call created it, else None."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return await self.kv.create(task_id, _encode(record))
        except KeyWrongLastSequenceError:
            return None

    async def update(
        self, task_id: str, mutate: Callable[[TaskRecord], TaskRecord | None], known: tuple[TaskRecord, int] | None = None
    ) -> TaskRecord | None:
        """Apply `mutate` to the current record with compare-and-set, retrying on conflict.

        `mutate` gets a copy of the record and returns the new record, or None for
        no change. Returns the record as stored afterwards; None if the task is unknown.
        `known`: a record and its revision the caller just wrote, tried first without reading
        it back (one round trip less; a conflict falls back to reading)."""
        from nats.js.errors import KeyWrongLastSequenceError

        for attempt in range(UPDATE_ATTEMPTS):
            if known is not None:
                (current, revision), known = known, None
            else:
                entry = await self._entry(task_id)
                if entry is None or not entry.value:
                    return None
                current, revision = json.loads(entry.value), entry.revision
            changed = mutate(json.loads(json.dumps(current)))  # a copy: `mutate` may change what it gets
            if changed is None or changed == current:
                return current
            try:
                await self.kv.update(task_id, _encode(changed), last=revision)
                return changed
            except KeyWrongLastSequenceError:
                # Someone else wrote in between: back off a little and re-read.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise RegistryConflict(f"task {task_id}: registry entry kept changing; {UPDATE_ATTEMPTS} updates lost the race")

    async def claim_round(self, name: str, now: float, min_interval: float) -> bool:
        """True when the caller may run the periodic round `name` now: none was claimed in the last
        `min_interval` seconds. The time is one key of this bucket, set by compare-and-set, so of
        concurrent callers (any process, any function instance) exactly one wins a window."""
        from nats.js.errors import KeyWrongLastSequenceError

        key = ROUND_KEY_PREFIX + name
        entry = await self._entry(key)
        last = _claimed_at(entry)
        if last is not None and abs(now - last) < min_interval:
            return False  # (a claim up to a window ahead counts too: callers' clocks and reads interleave)
        value = json.dumps({"at": now}).encode()
        try:
            if entry is None:
                await self.kv.create(key, value)
            else:
                await self.kv.update(key, value, last=entry.revision)
        except KeyWrongLastSequenceError:
            return False  # another caller claimed it in between
        return True

    async def delete(self, task_id: str) -> None:
        await self.kv.delete(task_id)

    async def list(self) -> list[TaskRecord]:
        """Every task's record: the keys from the bucket's stream (its per-subject state), then each read.

        Not `kv.watchall()`: nats-py's watcher can end its initial replay early
        (nats-io/nats.py#842) and so leave existing records out of a listing,
        which was seen here under load."""
        import asyncio

        prefix = f"$KV.{contract.KV_BUCKET}."
        info = await self.js.stream_info(f"KV_{contract.KV_BUCKET}", subjects_filter=f"{prefix}>")
        keys = [subject[len(prefix) :] for subject in (info.state.subjects or {})]
        task_ids = [key for key in keys if contract.is_valid_task_id(key)]
        records = [r for r in await asyncio.gather(*(self.get(t) for t in task_ids)) if r is not None]
        return sorted(records, key=lambda r: (r.get("created_at") or "", r.get("task_id") or ""))


def _claimed_at(entry) -> float | None:
    try:
        at = json.loads(entry.value)["at"] if entry is not None and entry.value else None
    except (ValueError, TypeError, KeyError):
        return None
    return float(at) if isinstance(at, (int, float)) else None


def _encode(record: TaskRecord) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
