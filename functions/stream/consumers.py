"""Reading a task's messages from the JetStream stream AGENT, and turning each into a redacted SSE frame.

Invariants:
- Every consumer is an ephemeral ordered consumer of exactly the task's two
  subjects (`events.agent.<id>`, `logs.agent.<id>`), started at a given stream
  sequence. nats-py recreates it after a NATS restart, after the last message
  it delivered (or from the task's first message if it delivered none: a
  replay, which readers drop by sequence).
- `release` never raises and never waits more than RELEASE_SECONDS, also in
  a cancelled scope: the NATS server reaps a consumer left behind after
  CONSUMER_INACTIVE_SECONDS.
- `encode` redacts a message once and frames it with its stream sequence.

Only public nats-py API is used; nats-py is imported on first use (cold start).
"""

from __future__ import annotations

import dataclasses
import logging

import anyio

from agent import contract
from agent.redact import Redactor
from functions.stream.filters import UNKNOWN_LEVEL, log_level
from functions.stream.redaction import redact_data
from functions.stream.sse import LOG_EVENT, event_name, frame

log = logging.getLogger(__name__)

CONSUMER_INACTIVE_SECONDS = 30.0
CONSUMER_IDLE_HEARTBEAT_SECONDS = 2.0  # a consumer silent for twice this is recreated (after a NATS restart)
MAX_BATCH = 512  # messages taken from a consumer at once
RELEASE_SECONDS = 2.0  # the most a release waits for NATS (it also runs on disconnect, shielded)


def is_terminal(event: object) -> bool:
    """Whether a published event is the task's terminal status event."""
    return (
        isinstance(event, dict)
        and event.get("type") == contract.EV_STATUS
        and event.get("state") in contract.TERMINAL_STATES
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    """One task message, redacted and framed."""

    seq: int
    frame: bytes
    kind: str  # the SSE event name: "log" or the event's type
    level: int  # the log level of a record (UNKNOWN_LEVEL for events)
    terminal: bool
    pending: int  # messages of the consumer still to come after this one


def encode(msg, logs_subject: str, redactor: Redactor) -> Encoded:
    metadata = msg.metadata
    seq = metadata.sequence.stream
    data, body = redact_data(msg.data, redactor)
    if msg.subject == logs_subject:
        return Encoded(seq, frame(seq, b"log", data), LOG_EVENT, log_level(body), False, metadata.num_pending)
    kind = event_name(body)
    return Encoded(seq, frame(seq, kind.encode(), data), kind, UNKNOWN_LEVEL, is_terminal(body), metadata.num_pending)


def task_subjects(task_id: str) -> str:
    """One subject filter matching exactly the task's logs and events subjects in the stream AGENT."""
    return f"*.agent.{task_id}"


async def last_message(js, subject: str):
    """The newest message on `subject` (wildcards allowed) in the stream, or None."""
    from nats.js.errors import NotFoundError

    try:
        return await js.get_last_msg(contract.STREAM_NAME, subject)
    except NotFoundError:
        return None


async def first_task_message_from(js, task_id: str, seq: int) -> int | None:
    """The sequence of the task's first message at or after `seq`, or None."""
    from nats.js.errors import NotFoundError

    try:
        return (await js.get_msg(contract.STREAM_NAME, seq=seq, subject=task_subjects(task_id), next=True)).seq
    except NotFoundError:
        return None


async def subscribe(js, task_id: str, start: int):
    """An ordered consumer of the task's two subjects from stream sequence `start`."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    events_subject = contract.subject_events(task_id)
    config = ConsumerConfig(
        filter_subjects=[events_subject, contract.subject_logs(task_id)],
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        inactive_threshold=CONSUMER_INACTIVE_SECONDS,
    )
    return await js.subscribe(
        events_subject,
        stream=contract.STREAM_NAME,
        config=config,
        ordered_consumer=True,
        idle_heartbeat=CONSUMER_IDLE_HEARTBEAT_SECONDS,
    )


async def release(js, sub) -> None:
    """Unsubscribe and delete the consumer (by its current name: nats-py renames it when it recreates it)."""
    with anyio.move_on_after(RELEASE_SECONDS, shield=True):  # also runs in a cancelled scope, on disconnect
        try:
            name = (await sub.consumer_info()).name
        except Exception as exc:  # gone already, or NATS away
            name = None
            log.debug("consumer of %s: %s", sub.subject, exc)
        try:
            await sub.unsubscribe()
        except Exception as exc:
            log.debug("unsubscribe from consumer %s: %s", name, exc)
        if name is not None:
            try:
                await js.delete_consumer(contract.STREAM_NAME, name)
            except Exception as exc:  # gone already, or NATS away
                log.debug("delete consumer %s: %s", name, exc)


async def batches(sub):
    """Lists of messages: the next one, plus those already waiting (at most MAX_BATCH)."""
    while True:
        batch = [await sub.next_msg(timeout=None)]
        while sub.pending_msgs and len(batch) < MAX_BATCH:
            batch.append(await sub.next_msg(timeout=None))
        yield batch
