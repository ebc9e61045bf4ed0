"""Entry points of the four CloudEvent functions, and the wiring of their process (settings, runtime, bus).

In a container (one Knative Service per function):

    FUNCTION_TARGET=task_submitted functions-framework --source functions/main.py --target task_submitted

The targets are registered with `@functions_framework.aio.http`, so
functions-framework 3.10 serves them with its ASGI (Starlette + uvicorn)
server even without `--asgi`. They take the raw request (not functions-
framework's CloudEvent signature) because that signature answers every
uncaught error with 500, which the broker would retry; `functions.handlers.edge`
parses the CloudEvent and maps errors to 4xx/5xx instead.

Locally, `dockyard dev` builds its own `Context` and mounts
`starlette_endpoint(handler, get_context)` for each entry of `HANDLERS`.

Invariants: the settings are read, validated and printed when this module is
imported, i.e. when the process starts; a wrong `DOCKYARD_*` variable stops it
(exit 3) with a message naming the variable, instead of every event being
answered 4xx and dead-lettered. Importing is otherwise cheap (no NATS,
Kubernetes or boto3): NATS loads on the first event, which is what cold start pays
for, and the Kubernetes client on the first event that needs the runtime.

Start-up makes most of the objects the process will ever hold (modules, classes, the
settings' pydantic schemas); a collection during it walks them all again for nothing. The
collector is off while this module imports and while the first event makes the runtime and
connects, then what exists is frozen (never walked again; a forked gunicorn worker shares
it) and collection is on again, as in `agent.run.main`. bench/bench_coldstart.py measures it.
"""

from __future__ import annotations

import gc

_collecting = gc.isenabled()
gc.disable()  # until the end of this module (see the docstring)

import logging  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import functions_framework.aio  # noqa: E402

from agent import contract  # noqa: E402
from functions.core.settings import Settings  # noqa: E402
from functions.errors import SettingsError  # noqa: E402
from functions.handlers import HANDLERS, edge  # noqa: E402
from functions.handlers.context import Context  # noqa: E402
from functions.handlers.job_finished import handle as handle_job_finished  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

    from functions.core.runtime_api import Runtime

log = logging.getLogger(__name__)


async def _job_event_to_job_finished(event: dict) -> None:
    """Where a standalone process's local runtime sends finished Jobs: straight to job_finished."""
    from cloudevents.http import CloudEvent

    from functions.errors import Unavailable

    attrs = {k: v for k, v in event.items() if k != "data"}
    status, body = await edge.call(handle_job_finished, CloudEvent.create(attrs, event.get("data")), get_context)
    if status >= 500:
        raise Unavailable(f"job_finished answered {status}: {body.get('error')}")  # the runtime retries
    if status >= 400:
        log.error("job_finished refused the local runtime's job event %s: %s", event.get("id"), body)


def read_settings() -> Settings:
    """The settings from the environment, printed (secrets masked); a wrong variable exits the process."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"dockyard functions: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(contract.EXIT_FATAL) from None
    print(f"dockyard functions settings:\n{settings.describe()}", file=sys.stderr, flush=True)
    return settings


class RuntimeOnFirstUse:
    """The Kubernetes runtime, made by the first handler that calls it: the Kubernetes client's import
    (~0.2 s) is not paid by an event that needs no runtime, as a `snapshot_due` ping that finds no task
    (a cold start every few minutes when the function scales to zero). A configuration that cannot work
    then fails that first call, with the same answer the event would have had before."""

    def __init__(self, make: "Callable[[], Runtime]"):
        self._make = make
        self._runtime: "Runtime | None" = None

    def __getattr__(self, name: str):
        if self._runtime is None:
            self._runtime = self._make()
        return getattr(self._runtime, name)


# --- the process-wide context of a functions-framework process ------------
_settings: Settings = read_settings()
_runtime: "Runtime | None" = None
_context: Context | None = None
_starting = True  # until the first event has tried to make the runtime and connect (see the module docstring)


async def get_context() -> Context:
    """The settings read at start, the runtime made once, the bus connected per event loop (lazily)."""
    global _runtime, _context, _starting
    from functions.core import bus

    starting, _starting = _starting, False  # once per process: a later retry is no start-up
    collecting = starting and gc.isenabled()
    if starting:
        gc.disable()
    try:
        if _runtime is None:
            from functions.runtime import make_runtime

            if _settings.runtime == "local":  # outside `dockyard dev` its finished Jobs go straight to job_finished
                _runtime = make_runtime(_settings, emit_job_event=_job_event_to_job_finished)
            else:
                _runtime = RuntimeOnFirstUse(lambda: make_runtime(_settings))
        connected = await bus.connect(_settings)
    finally:
        if starting:
            gc.freeze()
        if collecting:
            gc.enable()
    if _context is None or _context.bus is not connected:
        _context = Context(_settings, connected, _runtime)
    return _context


def starlette_endpoint(handler: edge.Handler, get_context=get_context):
    """A Starlette endpoint for a handler: parse the CloudEvent, run, map errors (see functions.handlers.edge)."""
    return edge.endpoint(handler, get_context)


_endpoints = {name: starlette_endpoint(handler) for name, handler in HANDLERS.items()}


@functions_framework.aio.http
async def task_submitted(request):
    return await _endpoints["task_submitted"](request)


@functions_framework.aio.http
async def job_finished(request):
    return await _endpoints["job_finished"](request)


@functions_framework.aio.http
async def snapshot_due(request):
    return await _endpoints["snapshot_due"](request)


@functions_framework.aio.http
async def task_command(request):
    return await _endpoints["task_command"](request)


def create_app(target: str):
    """The ASGI app functions-framework would serve for `target` (used by tests and the cold-start bench)."""
    if target not in HANDLERS:
        raise ValueError(f"unknown target {target!r}; one of {', '.join(HANDLERS)}")
    return functions_framework.aio.create_asgi_app_from_module(target, __file__, "http", sys.modules[__name__], None)


__all__ = ["Context", "HANDLERS", "create_app", "get_context", "starlette_endpoint", *HANDLERS]

gc.freeze()  # start-up is over: what it made lives as long as the process (see the docstring)
if _collecting:
    gc.enable()
