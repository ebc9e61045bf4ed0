"""Every error the orchestrator raises on purpose, and the one rule that turns them into HTTP answers.

    DockyardError
    ├── PermanentError(message, field, status)    4xx: will never succeed; the broker does not retry
    │   ├── BadInput                              400 (or 404, 409, 413, 415, 422 as given): malformed input, names the field
    │   ├── TaskNotFound                          404, field task_id
    │   ├── LaunchConflict                        409, field task_id: the id is taken by another spec
    │   ├── Rejected                              422: the runtime refused the task and will refuse it again
    │   │   └── ApiRejected(status)               the Kubernetes API said 400/401/403/404/422 (fix the deployment)
    │   └── SettingsError                         a DOCKYARD_* variable is wrong (raised at start, also a ValueError)
    └── TransientError(message)                   503: retry later; the broker retries
        ├── Unavailable                           NATS did not answer (nats-py's errors are translated at the bus)
        │   └── NoReply                           nobody answered a request on a subject in time
        ├── RegistryConflict                      the compare-and-set on a task record kept losing
        ├── StoreUnavailable                      the object store did not answer
        └── ApiUnavailable(status)                the Kubernetes API timed out, throttled (429) or failed (5xx)

Foreign errors are translated once, where they enter: nats-py's at
`functions.core.bus`, the Kubernetes client's at `functions.runtime.kubernetes`,
boto3's and the file store's at `agent.storage`. `answer_for` maps the tree
above (plus asyncio timeouts and connection errors, which are transient by
nature) to `(status, {"error", "field"})`; anything else is a 500, logged with
its traceback, because it is a bug.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

Answer = tuple[int, dict]  # (HTTP status, JSON body {"error", "field"})


class DockyardError(Exception):
    """Base of every error dockyard raises on purpose."""

    status = 500

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}


class PermanentError(DockyardError):
    """Will never succeed as sent: answered with `status` (4xx) and the field at fault."""

    status = 422

    def __init__(self, message: str, field: str | None = None, status: int | None = None):
        super().__init__(message, field)
        if status is not None:
            self.status = status


class BadInput(PermanentError):
    """Malformed or refused input; names the field and what to do."""

    status = 400


class TaskNotFound(PermanentError):
    status = 404

    def __init__(self, message: str):
        super().__init__(message, "task_id")


class LaunchConflict(PermanentError):
    """The task id is taken by a task with a different spec."""

    status = 409

    def __init__(self, message: str):
        super().__init__(message, "task_id")


class Rejected(PermanentError):
    """The runtime refused the task and will refuse it again."""

    status = 422


class ApiRejected(Rejected):
    """The Kubernetes API refused a request; `api_status` is its HTTP status."""

    def __init__(self, message: str, api_status: int | None = None):
        super().__init__(message)
        self.api_status = api_status


class SettingsError(PermanentError, ValueError):
    """A setting (a DOCKYARD_* variable or a settings file entry) is wrong; `field` names it."""


class TransientError(DockyardError):
    """Something did not answer in time; the same request may succeed later (503)."""

    status = 503


class Unavailable(TransientError):
    """NATS, or the agent behind a subject, did not answer in time."""


class NoReply(Unavailable):
    """A request on a subject got no answer (nobody listens, or not in time)."""


class RegistryConflict(TransientError):
    """An update of a task record kept losing the compare-and-set race."""


class StoreUnavailable(TransientError):
    """The object store did not answer."""


class ApiUnavailable(TransientError):
    """The Kubernetes API could not be reached, throttled or failed; `api_status` is its HTTP status."""

    def __init__(self, message: str, api_status: int | None = None):
        super().__init__(message)
        self.api_status = api_status


def answer_for(exc: BaseException) -> Answer:
    """The (status, body) for an exception raised while serving a request."""
    if isinstance(exc, PermanentError):
        return exc.status, exc.body()
    if isinstance(exc, (TransientError, asyncio.TimeoutError, ConnectionError)):
        reason = str(exc) or type(exc).__name__
        log.warning("transient failure, the caller may retry: %s", reason)
        return 503, {"error": f"temporarily unavailable: {reason}; retry later", "field": None}
    log.error("unexpected error (a bug)", exc_info=exc)
    return 500, {"error": f"internal error: {type(exc).__name__}", "field": None}


def describe(exc: BaseException) -> str:
    """An exception as text, also when its message is empty (timeouts)."""
    return str(exc) or type(exc).__name__
