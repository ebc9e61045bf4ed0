"""A finished task's end in words: the fields the terminal status event and the record carry.

`describe_end` is a pure function of what `job_finished` read: the Job's condition
and status (the runtime's, trusted), the agent's result.json (the agent's words,
when it wrote one), the termination message and the record. It answers

- `reason`: a sentence a person understands ("git clone failed: repository not found",
  "the deadline of 25 s passed, counted from the first start"), never a bare
  Kubernetes word;
- `failure_class` (failed, deadline and budget outcomes only): `fatal` when running
  the task again cannot help (the agent exited with EXIT_FATAL, or a budget is
  spent), else `transient`;
- `detail`: what lies behind the reason (git's message, the log tail with the traceback);
- `attempts`: pod starts, the larger of the tracker's count of started/resumed
  events and the Job's pods (a pod that died before its first event still counts);
- `deadline_seconds`, `started_at` (the first start: the Job's startTime, which is
  when it was admitted, so queue time is not in it), `queued_seconds` (submitted to
  first start) and `finished_at`.

Invariant: only values of the right type from result.json are taken (it is written
in a workspace the model's commands can write to); the class is one of the two.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from agent import contract

CLASSED_OUTCOMES = (contract.OUTCOME_FAILED, contract.OUTCOME_DEADLINE, contract.OUTCOME_BUDGET)
FAILURE_CLASSES = (contract.FAILURE_FATAL, contract.FAILURE_TRANSIENT)
REASON_CHARS = 500  # a reason is a sentence; what is longer goes to `detail`
DETAIL_CHARS = 16_000


def describe_end(*, outcome: str, condition: dict, job: dict, result: dict | None, record: dict,
                 termination_message: str | None, agent_exit: str | None) -> dict[str, Any]:
    """The end's fields (see the module docstring); None for a field that does not apply."""
    result = _agents_words(result, record)
    status = job.get("status") if isinstance(job.get("status"), dict) else {}
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    deadline = _deadline_seconds(record, spec)
    started_at = _text(status.get("startTime"))
    attempts = max(_count(record.get("attempts")), _count(status.get("failed")) + _count(status.get("succeeded")))
    if condition.get("reason") == "BackoffLimitExceeded" and isinstance(spec.get("backoffLimit"), int):
        attempts = max(attempts, spec["backoffLimit"] + 1)  # the first try and every retry failed
    failure_class = _failure_class(outcome, condition, result)
    reason = _text(result.get("reason")) or _reason(outcome, condition, record, deadline, attempts, termination_message, agent_exit)
    detail = _text(result.get("detail")) or termination_message
    if reason and len(reason) > REASON_CHARS:
        detail, reason = detail or reason, reason[: REASON_CHARS - 3] + "..."
    return {
        "reason": reason,
        "failure_class": failure_class,
        "detail": detail[-DETAIL_CHARS:] if detail else None,
        "attempts": attempts,
        "deadline_seconds": deadline,
        "started_at": started_at,
        "queued_seconds": _seconds_between(record.get("created_at"), started_at),
        "finished_at": _condition_time(condition) or contract.iso_utc(),
    }


def _agents_words(result: dict | None, record: dict) -> dict:
    """result.json; where it lacks the agent's words for its end, those its terminal status event brought
    (the tracker put them on the record): a final set that could not be uploaded loses nothing."""
    words = dict(result or {})
    if record.get("state") == contract.STATE_FINISHED:
        for name in ("reason", "failure_class", "detail"):
            if not _text(words.get(name)) and _text(record.get(name)):
                words[name] = record[name]
    return words


def _failure_class(outcome: str, condition: dict, result: dict) -> str | None:
    if outcome not in CLASSED_OUTCOMES:
        return None
    said = result.get("failure_class")
    if said in FAILURE_CLASSES:
        return said
    if outcome == contract.OUTCOME_BUDGET:
        return contract.FAILURE_FATAL
    if condition.get("reason") == "PodFailurePolicy" and f"exit code {contract.EXIT_FATAL} " in str(condition.get("message") or ""):
        return contract.FAILURE_FATAL
    return contract.FAILURE_TRANSIENT


def _reason(outcome: str, condition: dict, record: dict, deadline: int | None, attempts: int,
            termination_message: str | None, agent_exit: str | None) -> str | None:
    """Words for an end the agent did not describe (it was killed, or never got to write its result)."""
    kind = condition.get("reason")
    if outcome == contract.OUTCOME_DEADLINE or kind == "DeadlineExceeded":
        limit = f"the deadline of {deadline} s" if deadline is not None else "the deadline"
        return f"{limit} passed, counted from the first start"
    if outcome == contract.OUTCOME_CANCELLED:
        return "cancelled by request"
    if outcome == contract.OUTCOME_DONE:
        return None
    error = _error_line(termination_message)
    if kind == "BackoffLimitExceeded":
        why = error or agent_exit or "it exited with an error"
        if attempts == 1:
            return f"the agent failed, with no retry left: {why}"
        times = f" {attempts} times" if attempts else ""
        return f"the agent failed{times}, retries used up; the last time: {why}"
    if agent_exit:
        said = error or _last_line(termination_message)
        return f"the agent ended with {agent_exit}" + (f": {said}" if said else "")
    # The termination message is the agent's summary when it left one, else its log's tail.
    return error or _last_line(termination_message) or _text(condition.get("message")) or kind


def _deadline_seconds(record: dict, spec: dict) -> int | None:
    limits = (record.get("task") or {}).get("limits") or {}
    for value in (limits.get("deadline_seconds"), spec.get("activeDeadlineSeconds")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# The line of a log tail that says what went wrong: a traceback's last line ("RuntimeError: ..."),
# or the agent's own "agent: fatal: ..." line.
_ERROR_LINE = re.compile(r"^(agent: fatal: |[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Refused|Exhausted)\b)")


def _last_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:REASON_CHARS] if lines else None


def _error_line(text: str | None) -> str | None:
    """The last line of a log tail that names an error; None when none does (a killed process says nothing)."""
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if _ERROR_LINE.match(line):
            return line[:REASON_CHARS]
    return None


def _condition_time(condition: dict) -> str | None:
    """When the Job ended (its condition's transition), in the format of every time here."""
    try:
        return contract.iso_utc(datetime.fromisoformat(str(condition.get("lastTransitionTime")).replace("Z", "+00:00")).timestamp())
    except (ValueError, TypeError):
        return None


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        first = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        then = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except (ValueError, TypeError):
        return None
    # A startTime has whole seconds, a record's created_at milliseconds: never below 0.
    return max(round((then - first).total_seconds(), 1), 0.0)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None
