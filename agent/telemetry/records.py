"""A trace record: what the agent's threads enqueue, and the JSON the telemetry thread makes of it.

Invariants:
* The caller pays for one small tuple. `LogHandler.emit` formats the message
  (logging's contract: arguments are read at call time) and the traceback, if
  any; an event's fields are redacted and copied by `Telemetry.event` (so later
  mutation cannot leak). Everything else (JSON encoding, redaction of log text,
  truncation) is `Encoder.encode`, on the telemetry thread.
* Encoding never fails and never leaks: log text is redacted before it is
  encoded; a string longer than `MAX_STRING` is cut; an event that cannot be
  encoded becomes a stub naming the error, one larger than the server's
  `max_payload` a stub with its size.
* Layout: a log record is `{"ts","level","logger","msg","task_id"[,"exc"]}` on
  `logs.agent.<id>`; an event is `{"type","task_id","ts",...fields}` on
  `events.agent.<id>`; `ts` is `contract.iso_utc`'s format.
"""

from __future__ import annotations

import json
import logging
import time
from json.encoder import encode_basestring_ascii as _jstr
from typing import TYPE_CHECKING

from agent import contract
from agent.redact import Redactor

if TYPE_CHECKING:
    from collections.abc import Callable

LOG = 0  # (LOG, created, levelname, logger name, message, exception text or None)
EVENT = 1  # (EVENT, body dict, already redacted)

MAX_STRING = 64 * 1024  # longer strings in a record are cut (tools cap their output anyway)
PAYLOAD_MARGIN = 1024  # room left under the server's max_payload for the headers


def cut(value: str) -> str:
    if len(value) > MAX_STRING:
        return value[:MAX_STRING] + f"...[truncated {len(value) - MAX_STRING} chars]"
    return value


class _TsCache:
    """`contract.iso_utc` with the per-second prefix cached (records come in bursts within a second)."""

    __slots__ = ("prefix", "sec")

    def __init__(self) -> None:
        self.sec = -1
        self.prefix = ""

    def __call__(self, ts: float) -> str:
        sec = int(ts)
        if sec != self.sec:
            self.sec = sec
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self.prefix}.{int((ts - sec) * 1000):03d}Z"


_EXC_FORMATTER = logging.Formatter()


class LogHandler(logging.Handler):
    """Enqueues (LOG, created, level, logger, message, exception text); encoding happens later."""

    def __init__(self, put: Callable[[tuple], None], level: int):
        super().__init__(level)
        self._put = put

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            exc = None
            if record.exc_info:
                exc = record.exc_text or (self.formatter or _EXC_FORMATTER).formatException(record.exc_info)
            if record.stack_info:
                exc = f"{exc}\n{record.stack_info}" if exc else record.stack_info
            self._put((LOG, record.created, record.levelname, record.name, msg, exc))
        except Exception:
            self.handleError(record)


class Encoder:
    """Turns queued records into (subject, JSON bytes) for one task, on the telemetry thread."""

    def __init__(self, task_id: str, redactor: Redactor):
        self.redactor = redactor
        self.subject_logs = contract.subject_logs(task_id)
        self.subject_events = contract.subject_events(task_id)
        self._task_json = _jstr(task_id)
        self._json = json.JSONEncoder(default=str, separators=(",", ":"))
        self._ts = _TsCache()

    def encode(self, item: tuple, max_payload: int = 1024 * 1024) -> tuple[str, bytes]:
        if item[0] == LOG:
            _, created, level, name, msg, exc = item
            redact = self.redactor.redact
            tail = ',"exc":%s}' % _jstr(cut(redact(exc))) if exc else "}"
            data = '{"ts":"%s","level":%s,"logger":%s,"msg":%s,"task_id":%s%s' % (
                self._ts(created), _jstr(level), _jstr(name), _jstr(cut(redact(msg))), self._task_json, tail)
            return self.subject_logs, data.encode()
        body = item[1]
        for key, value in body.items():
            if isinstance(value, str) and len(value) > MAX_STRING:
                body[key] = cut(value)
        try:
            data = self._json.encode(body)
        except (TypeError, ValueError) as exc:  # e.g. a circular structure
            data = self._json.encode(self._stub(body) | {"error": f"unencodable event: {exc}"})
        if len(data) > max_payload - PAYLOAD_MARGIN:
            data = self._json.encode(self._stub(body) | {"truncated": True, "bytes": len(data)})
        return self.subject_events, data.encode()

    def encode_reply(self, response: dict) -> bytes:
        """A command reply, redacted like everything else that leaves the agent."""
        try:
            return self._json.encode(self.redactor.redact_obj(response)).encode()
        except (TypeError, ValueError) as exc:
            return json.dumps({"ok": False, "error": f"unencodable reply: {exc}"}).encode()

    @staticmethod
    def _stub(body: dict) -> dict:
        return {k: body.get(k) for k in ("type", "task_id", "ts")}
