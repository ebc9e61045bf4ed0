"""The NATS connection of a functions process: events out, commands to agents, the task registry.

Invariants: one connection per process and event loop, created on first use
and reused (nats-py reconnects it on its own); the stream `AGENT` and the task
bucket exist before anything is published. Every failure to reach NATS or an
agent on it is raised as `Unavailable` — transient, answered 503 so the
broker retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING

from agent import contract
from functions.errors import NoReply, Unavailable, describe

if TYPE_CHECKING:
    from functions.core.registry import TaskRegistry
    from functions.core.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 3.0
PUBLISH_TIMEOUT_SECONDS = 5.0


def being_cancelled() -> bool:
    """Whether someone asked the running task to stop. nats-py may turn a CancelledError into its own
    error; a retry loop that catches those asks this first, so a stop is never taken for NATS trouble."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def import_nats(url: str) -> None:
    """Import nats-py without aiohttp, unless `url` names a websocket server (ws://, wss://).

    nats-py imports aiohttp only for its websocket transport and takes an ImportError as
    "no websocket support" (aiohttp is its optional extra); over TCP it never uses it.
    Hidden, a function's first event saves aiohttp's import (~100 ms with bytecode: its
    connector builds TLS contexts at import). A process that imported either library
    already (tests, `dockyard dev`) is left alone; aiohttp stays importable afterwards.
    The same as the snapshotter's `agent.snapshotter.import_nats_lean`."""
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    if any(server.strip().startswith(("ws://", "wss://")) for server in url.split(",")):
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # `import aiohttp` raises ImportError meanwhile
    try:
        import nats  # noqa: F401
    finally:
        if "aiohttp" in sys.modules and sys.modules["aiohttp"] is None:
            del sys.modules["aiohttp"]


def _is_nats_error(exc: BaseException) -> bool:
    """nats-py's own errors (core and JetStream derive from `nats.errors.Error`): the bus is in trouble."""
    import nats.errors

    return isinstance(exc, nats.errors.Error)


class Bus:
    """A connected client: `nc` (core NATS), `js` (JetStream), `registry` (the task bucket)."""

    def __init__(self, nc, js, registry: "TaskRegistry", url: str, creds: str = ""):
        self.nc = nc
        self.js = js
        self.registry = registry
        self.url = url
        self.creds = creds

    @classmethod
    async def open(cls, url: str, *, creds: str = "", name: str = "dockyard-functions",
                   stream_max_age_seconds: float = contract.STREAM_MAX_AGE_SECONDS) -> "Bus":
        """Connect (as the user of the `.creds` file `creds`, if any) and make sure the stream and the
        bucket exist. Raises Unavailable."""
        import_nats(url)
        import nats

        from functions.core.registry import TaskRegistry
        from functions.core.settings import mask_url

        where = mask_url(url)

        last_error: list[Exception] = []

        async def quiet(exc: Exception) -> None:
            last_error[:] = [exc]  # e.g. 'Authorization Violation': said when the connect gives up
            log.debug("nats %s: %s", where, exc)

        try:
            # Reconnect forever once connected; the first connection is bounded so a
            # request during an outage gets a quick 503 instead of hanging.
            nc = await asyncio.wait_for(
                nats.connect(
                    url,
                    name=name,
                    **({"user_credentials": creds} if creds else {}),
                    connect_timeout=2,
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1,
                    error_cb=quiet,
                ),
                timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except Exception as exc:
            if isinstance(exc, (asyncio.TimeoutError, OSError)) or _is_nats_error(exc):
                why = describe(exc) + (f" (last error: {describe(last_error[0])})" if last_error else "")
                raise Unavailable(f"NATS at {where} is not reachable{' as ' + creds if creds else ''}: {why}") from exc
            raise
        try:
            js = nc.jetstream(timeout=PUBLISH_TIMEOUT_SECONDS)
            # Two independent lookups, one round trip: a busy machine pays scheduling delay per round trip.
            found = await asyncio.gather(ensure_stream(js, stream_max_age_seconds), TaskRegistry.open(js), return_exceptions=True)
            for result in found:
                if isinstance(result, BaseException):
                    raise result
            registry = found[1]
        except BaseException as exc:
            await nc.close()
            if isinstance(exc, Exception) and (_is_nats_error(exc) or isinstance(exc, asyncio.TimeoutError)):
                raise Unavailable(f"JetStream at {where} is not usable: {describe(exc)}") from exc
            raise
        return cls(nc, js, registry, url, creds)

    async def publish_event(self, task_id: str, type: str, *, msg_id: str | None = None, **fields) -> int:
        """Publish `{"type","task_id","ts",...}` on events.agent.<id>; returns the stream sequence.

        `msg_id` lets JetStream drop a duplicate published within its dedup window
        (a redelivered CloudEvent publishing the same fact again)."""
        body = {"type": type, "task_id": task_id, "ts": contract.iso_utc(), **fields}
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            ack = await self.js.publish(contract.subject_events(task_id), json.dumps(body).encode(), headers=headers)
        except Exception as exc:
            if _is_nats_error(exc) or isinstance(exc, asyncio.TimeoutError):
                raise Unavailable(f"cannot publish {type} event for task {task_id}: {describe(exc)}") from exc
            raise
        return ack.seq

    async def request(self, subject: str, body: dict, timeout: float, *, reply_prefix: str | None = None) -> dict:
        """Request/reply with JSON bodies. Raises NoReply when nobody answers in time.

        `reply_prefix`: the answer comes on `<reply_prefix>.<random>` instead of this connection's inbox
        (a task's commands: `contract.command_reply_prefix`, where its agent user may answer)."""
        import nats.errors

        try:
            if reply_prefix:
                msg = await self._request_via(reply_prefix, subject, json.dumps(body).encode(), timeout)
            else:
                msg = await self.nc.request(subject, json.dumps(body).encode(), timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise NoReply(f"nobody listens on {subject}") from exc
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
            raise NoReply(f"no reply on {subject} within {timeout:g}s") from exc
        except Exception as exc:
            if _is_nats_error(exc):
                raise Unavailable(f"request on {subject} failed: {describe(exc)}") from exc
            raise
        try:
            reply = json.loads(msg.data or b"{}")
        except ValueError:
            reply = {"ok": False, "error": f"reply on {subject} is not JSON"}
        return reply if isinstance(reply, dict) else {"ok": False, "error": f"reply on {subject} is not a JSON object"}

    async def _request_via(self, reply_prefix: str, subject: str, payload: bytes, timeout: float):
        """One request whose reply subject is `<reply_prefix>.<random>`; raises as nats-py's request does."""
        import secrets

        import nats.errors

        inbox = f"{reply_prefix}.{secrets.token_hex(12)}"
        sub = await self.nc.subscribe(inbox, max_msgs=1)
        try:
            await self.nc.publish(subject, payload, reply=inbox)
            msg = await sub.next_msg(timeout=timeout)
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # already gone (max_msgs reached, or the connection closed)
        if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
            raise nats.errors.NoRespondersError
        return msg

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


async def ensure_stream(js, max_age_seconds: float = contract.STREAM_MAX_AGE_SECONDS) -> None:
    """Create the AGENT stream unless it exists (whoever created it first owns its config).

    The configuration is `contract.AGENT_STREAM`, the one the agent's telemetry creates too."""
    from nats.js.api import StreamConfig
    from nats.js.errors import BadRequestError, NotFoundError

    try:
        await js.stream_info(contract.STREAM_NAME)
        return
    except NotFoundError:
        pass
    try:
        await js.add_stream(StreamConfig(**contract.AGENT_STREAM.config(max_age_seconds)))
    except BadRequestError:
        # Created concurrently by another process (with another max age): fine if it exists now.
        await js.stream_info(contract.STREAM_NAME)


# --- the process-wide connections: one per event loop and NATS user ---------------
_buses: dict[tuple[str, str], Bus] = {}
_bus_loop: asyncio.AbstractEventLoop | None = None
_lock: asyncio.Lock | None = None


async def connect(settings: "Settings", *, creds: str | None = None, name: str = "dockyard-functions") -> Bus:
    """The process-wide Bus for this event loop and user (`creds`, by default `DOCKYARD_NATS_CREDS`),
    connected on first use. In `dockyard dev` the functions, the stream and the tracker share one
    process but each connects as its own user."""
    from functions.core.settings import mask_url

    global _buses, _bus_loop, _lock
    creds = settings.nats_creds if creds is None else creds
    key = (settings.nats_url, creds)
    loop = asyncio.get_running_loop()
    if _bus_loop is not loop:
        _buses, _bus_loop, _lock = {}, loop, asyncio.Lock()
    found = _buses.get(key)
    if found is not None and not found.nc.is_closed:
        return found
    async with _lock:
        found = _buses.get(key)
        if found is None or found.nc.is_closed:
            found = _buses[key] = await Bus.open(settings.nats_url, creds=creds, name=name,
                                                 stream_max_age_seconds=settings.stream_max_age_seconds)
            log.info("connected to NATS at %s%s", mask_url(settings.nats_url), f" as {creds}" if creds else "")
    return found


async def disconnect() -> None:
    """Close every process-wide connection of this event loop."""
    buses = list(_buses.values())
    _buses.clear()
    for connected in buses:
        await connected.close()
