"""dev.dockyard.task.command -> cancel or message a running agent over cmd.agent.<id>.

cancel: the agent is asked to stop after its current step; if it does not ack
within the cancel timeout, the runtime stops the task (Job deleted, or the
local processes killed). Cancelling a finished task is a 200 no-op.
message: delivered only with the agent's ack; no ack is a 503 so the broker
retries (the agent may be restarting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudevents.http import CloudEvent

from agent import contract
from functions.errors import NoReply
from functions.core.cloudevent import data_object, require_type
from functions.errors import TaskNotFound
from functions.errors import BadInput

if TYPE_CHECKING:
    from functions.core.registry import TaskRecord
    from functions.handlers.context import Context

OPS = ("cancel", "message")
MAX_TEXT_BYTES = 16 * 1024


def _parse(data: dict) -> tuple[str, str, str | None]:
    task_id = data.get("task_id")
    for name in ("task_id", "op"):
        value = data.get(name)
        if isinstance(value, str) and contract.has_control_chars(value):
            raise BadInput(f"{name} must not contain control characters (NUL, newline, ESC, ...)", name)
    if not contract.is_valid_task_id(task_id):
        raise BadInput("task_id is required: the id of the task to command (a DNS-1123 label)", "task_id")
    op = data.get("op")
    if op not in OPS:
        raise BadInput(f"op must be one of {', '.join(OPS)}", "op")
    text = data.get("text")
    if op == "message":
        if not isinstance(text, str) or not text.strip():
            raise BadInput("a message needs 'text': a non-empty string for the agent", "text")
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise BadInput(f"text is larger than {MAX_TEXT_BYTES} bytes", "text", 413)
    return task_id, op, text


async def _record_cancelled(ctx: "Context", task_id: str) -> None:
    """The runtime stopped the job without the agent: no job-finished event will tell, so say it here."""
    reason = "the agent did not answer the cancel request; the runtime stopped it"

    def finish(record: "TaskRecord") -> "TaskRecord | None":
        if record.get("state") in contract.TERMINAL_STATES:
            return None
        return {**record, "state": contract.STATE_FINISHED, "outcome": contract.OUTCOME_CANCELLED, "reason": reason, "updated_at": contract.iso_utc()}

    await ctx.registry.update(task_id, finish)
    await ctx.bus.publish_event(
        task_id,
        contract.EV_STATUS,
        msg_id=f"cancelled-{task_id}",
        state=contract.STATE_FINISHED,
        outcome=contract.OUTCOME_CANCELLED,
        reason=reason,
    )


async def handle(event: CloudEvent, ctx: "Context") -> dict:
    require_type(event, contract.EVENT_TASK_COMMAND)
    task_id, op, text = _parse(data_object(event))

    record = await ctx.registry.get(task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id}; list tasks with `dockyard tasks`")
    finished = record.get("state") in contract.TERMINAL_STATES
    subject = contract.subject_cmd(task_id)

    if op == "cancel":
        if finished:
            return {"task_id": task_id, "status": "already finished", "outcome": record.get("outcome")}
        at = contract.iso_utc()
        await ctx.registry.update(task_id, lambda r: {**r, "cancel_requested_at": r.get("cancel_requested_at") or at})
        try:
            reply = await ctx.bus.request(subject, {"op": "cancel"}, timeout=ctx.settings.cancel_timeout_seconds,
                                           reply_prefix=contract.command_reply_prefix(task_id))
        except NoReply:
            reply = {"ok": False}
        if reply.get("ok") is True:
            return {"task_id": task_id, "status": "cancelling", "via": "agent"}
        await ctx.runtime.cancel(task_id)
        await _record_cancelled(ctx, task_id)
        return {"task_id": task_id, "status": "cancelled", "via": "runtime"}

    if finished:
        raise BadInput(f"task {task_id} has finished; it takes no more messages", "task_id", 409)
    try:
        reply = await ctx.bus.request(subject, {"op": "message", "text": text}, timeout=ctx.settings.command_timeout_seconds,
                                       reply_prefix=contract.command_reply_prefix(task_id))
    except NoReply as exc:
        raise NoReply(f"the agent of task {task_id} did not take the message: {exc}") from exc
    if reply.get("ok") is not True:
        raise BadInput(f"the agent refused the message: {reply.get('error') or 'no reason given'}", "text", 422)
    return {"task_id": task_id, "status": "delivered"}
