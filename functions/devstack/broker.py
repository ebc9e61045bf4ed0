"""The local stand-in for the Knative Broker, wired from the manifests in `eventing/`.

Invariant: local routing comes only from the Trigger manifests (filter on
event attributes -> subscriber Service -> function `service.replace('-', '_')`)
and their delivery specs, so `dockyard dev` and the cluster cannot drift.

Delivery follows Knative's delivery spec: `retry` more attempts after the
first, waiting `backoffDelay` (ISO 8601) times 2**(n-1) (exponential) or
times n (linear) before retry n. 5xx answers and crashes are retried; 4xx
never are. An event that finally fails is appended to the dead-letter file
(JSON lines) and logged, as the cluster's dead-letter Service would log it.

The ingress differs from Knative's on purpose: it delivers synchronously
and answers with the outcome, which tells a client at once what went wrong.
    202  delivered, body {"accepted": true, "results": {function: answer body}}
    4xx  the function's answer (bad input: never retried, dead-lettered)
    400  not a CloudEvent, or no Trigger for its type
    503  retries exhausted; the event is in the dead-letter file
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from cloudevents.http import CloudEvent

from agent import contract
from functions.core.cloudevent import read_event
from functions.errors import Answer, answer_for
from functions.handlers import edge
from functions.errors import BadInput

log = logging.getLogger(__name__)

EVENTING_DIR = Path(__file__).resolve().parents[2] / "eventing"
DEAD_LETTER_FILE = "dead-letter.jsonl"
DEAD_LETTER_DROPPED_FILE = "dead-letter.dropped"  # how many dead letters were dropped to keep the file small
DEAD_LETTER_MAX_COUNT = 200
DEAD_LETTER_MAX_BYTES = 1024 * 1024
DEAD_LETTER_MAX_RECORD_BYTES = 8 * 1024  # a larger event keeps its attributes, not its data

Target = Callable[[CloudEvent], Awaitable[Answer]]


class ManifestError(ValueError):
    """The manifests in eventing/ describe something the local broker cannot do."""


# --- manifests -> routes ------------------------------------------------------
_DURATION = re.compile(r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def parse_duration(value: str) -> float:
    """Seconds in an ISO 8601 duration such as PT0.5S, PT1M, P1DT2H."""
    match = _DURATION.match(value or "")
    if not match or value in ("P", "PT"):
        raise ManifestError(f"{value!r} is not an ISO 8601 duration like PT0.5S")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


@dataclass(frozen=True)
class Delivery:
    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay: float = 0.0
    dead_letter_sink: str | None = None

    @classmethod
    def from_spec(cls, spec: dict | None, fallback: "Delivery | None" = None) -> "Delivery":
        if not spec:
            return fallback or cls()
        policy = spec.get("backoffPolicy", "exponential")
        if policy not in ("exponential", "linear"):
            raise ManifestError(f"backoffPolicy {policy!r}: use exponential or linear")
        sink = ((spec.get("deadLetterSink") or {}).get("ref") or {}).get("name")
        return cls(
            retry=int(spec.get("retry", 0)),
            backoff_policy=policy,
            backoff_delay=parse_duration(spec["backoffDelay"]) if spec.get("backoffDelay") else 0.0,
            dead_letter_sink=sink,
        )

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number` (1-based)."""
        if self.backoff_policy == "linear":
            return self.backoff_delay * retry_number
        return self.backoff_delay * 2 ** (retry_number - 1)


@dataclass(frozen=True)
class Route:
    trigger: str
    attributes: dict = field(hash=False)  # the Trigger's filter: every attribute must match exactly
    service: str  # the subscriber Knative Service
    delivery: Delivery

    @property
    def function(self) -> str:
        return self.service.replace("-", "_")

    @property
    def event_type(self) -> str | None:
        return self.attributes.get("type")

    def matches(self, event: CloudEvent) -> bool:
        attrs = event.get_attributes()
        return all(attrs.get(name) == value for name, value in self.attributes.items())


def _documents(path: Path, kind: str) -> list[dict]:
    import yaml

    docs = []
    for file in sorted(Path(path).glob("*.yaml")):
        for doc in yaml.safe_load_all(file.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == kind:
                docs.append(doc)
    return docs


def routes_from_manifests(path: str | Path = EVENTING_DIR) -> list[Route]:
    """One Route per Trigger in `path`, with the Broker's delivery spec as the default."""
    brokers = _documents(Path(path), "Broker")
    broker_delivery = Delivery.from_spec(brokers[0].get("spec", {}).get("delivery")) if brokers else Delivery()
    routes = []
    for trigger in _documents(Path(path), "Trigger"):
        name = trigger["metadata"]["name"]
        spec = trigger.get("spec") or {}
        if spec.get("filters"):
            raise ManifestError(f"Trigger {name}: spec.filters is not supported locally; use spec.filter.attributes")
        ref = (spec.get("subscriber") or {}).get("ref") or {}
        if ref.get("kind") != "Service" or not ref.get("name"):
            raise ManifestError(f"Trigger {name}: the subscriber must be a ref to a Service")
        routes.append(
            Route(
                trigger=name,
                attributes=dict((spec.get("filter") or {}).get("attributes") or {}),
                service=ref["name"],
                delivery=Delivery.from_spec(spec.get("delivery"), broker_delivery),
            )
        )
    if not routes:
        raise ManifestError(f"no Trigger manifests in {path}")
    return routes


@dataclass(frozen=True)
class PingSchedule:
    name: str
    every_minutes: int
    data: object = None  # decoded JSON, or None

    def next_fire(self, now: float) -> float:
        """The first whole minute after `now` (epoch seconds) whose minute-of-hour is a multiple of the step."""
        minute = int(now // 60) + 1
        while (minute % 60) % self.every_minutes:
            minute += 1
        return minute * 60.0

    def event(self) -> CloudEvent:
        source = f"/apis/v1/namespaces/{contract.FUNCTIONS_NAMESPACE}/pingsources/{self.name}"
        return CloudEvent({"type": contract.EVENT_PING, "source": source, "datacontenttype": "application/json"}, self.data)


def parse_schedule(expr: str) -> int:
    """Minutes between ticks for `* * * * *` and `*/N * * * *`; anything else is refused."""
    fields = (expr or "").split()
    if len(fields) == 5 and fields[1:] == ["*"] * 4:
        if fields[0] == "*":
            return 1
        match = re.fullmatch(r"\*/(\d+)", fields[0])
        if match and 1 <= int(match.group(1)) <= 59:
            return int(match.group(1))
    raise ManifestError(f"schedule {expr!r}: the local broker understands only '* * * * *' and '*/N * * * *' (N in 1..59)")


def ping_from_manifests(path: str | Path = EVENTING_DIR) -> PingSchedule:
    sources = _documents(Path(path), "PingSource")
    if len(sources) != 1:
        raise ManifestError(f"expected one PingSource in {path}, found {len(sources)}")
    spec = sources[0].get("spec") or {}
    data = spec.get("data")
    if data is not None and "json" in spec.get("contentType", "application/json"):
        data = json.loads(data)
    return PingSchedule(name=sources[0]["metadata"]["name"], every_minutes=parse_schedule(spec.get("schedule")), data=data)


# --- delivery ------------------------------------------------------------------
PLATFORM_TYPE_PREFIX = "dev.knative."


def is_platform_type(event_type: object) -> bool:
    """Types only Knative's own sources send (ApiServerSource, PingSource): refused at the ingress."""
    return isinstance(event_type, str) and event_type.lower().startswith(PLATFORM_TYPE_PREFIX)


def local_targets(handlers: Mapping[str, edge.Handler], get_context) -> dict[str, Target]:
    """In-process targets: each handler run through the same error mapping as its HTTP endpoint."""

    def bind(handler: edge.Handler) -> Target:
        async def target(event: CloudEvent) -> Answer:
            return await edge.call(handler, event, get_context)

        return target

    return {name: bind(handler) for name, handler in handlers.items()}


@dataclass
class DeliveryResult:
    route: Route
    status: int
    body: dict
    attempts: int


Sleep = Callable[[float], Awaitable[None]]


class DeadLetterFile:
    """The dead-letter file: JSON lines, at most `max_count` records and `max_bytes` bytes; the oldest
    are dropped first and counted in `<name>.dropped`. A record over `max_record_bytes` keeps the
    event's attributes and the size of its data, not the data (a flood of large bad requests costs
    a bounded amount of disk)."""

    def __init__(self, path: Path, *, max_count: int = DEAD_LETTER_MAX_COUNT, max_bytes: int = DEAD_LETTER_MAX_BYTES,
                 max_record_bytes: int = DEAD_LETTER_MAX_RECORD_BYTES):
        self.path = path
        self.dropped_path = path.with_name(DEAD_LETTER_DROPPED_FILE)
        self.max_count, self.max_bytes, self.max_record_bytes = max_count, max_bytes, max_record_bytes

    @property
    def dropped(self) -> int:
        """How many records were dropped since the file was started."""
        try:
            return int(self.dropped_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def append(self, record: dict) -> None:
        line = self._line(record)
        lines = self._lines() + [line]
        size, dropped = sum(len(x) for x in lines), 0
        while len(lines) > self.max_count or (size > self.max_bytes and len(lines) > 1):
            size -= len(lines.pop(0))
            dropped += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, self.path)
        if dropped:
            total = self.dropped + dropped
            self.dropped_path.write_text(f"{total}\n")
            log.warning("dead letters: dropped the %d oldest (%d in all) to keep %s under %d records and %d bytes",
                        dropped, total, self.path, self.max_count, self.max_bytes)

    def _line(self, record: dict) -> bytes:
        line = (json.dumps(record, default=str) + "\n").encode()
        if len(line) <= self.max_record_bytes:
            return line
        event = {k: v for k, v in record["event"].items() if k != "data"}
        event = {k: (v[:200] if isinstance(v, str) else v) for k, v in event.items()}
        slim = {**record, "error": str(record.get("error"))[:1000], "event": {**event, "data_omitted_bytes": len(line)}}
        return (json.dumps(slim, default=str) + "\n").encode()

    def _lines(self) -> list[bytes]:
        try:
            return self.path.read_bytes().splitlines(keepends=True)
        except FileNotFoundError:
            return []


class Broker:
    """Delivers events to the targets their Triggers name. `sleep` waits out the backoff
    (tests pass one that records the delays instead of waiting)."""

    def __init__(self, routes: list[Route], targets: Mapping[str, Target], dead_letter_path: str | Path, *, sleep: Sleep = asyncio.sleep):
        missing = sorted({r.function for r in routes} - set(targets))
        if missing:
            raise ManifestError(f"Triggers name functions that do not exist: {', '.join(missing)}")
        self.routes = routes
        self.targets = dict(targets)
        self.dead_letter_path = Path(dead_letter_path)
        self.dead_letters = DeadLetterFile(self.dead_letter_path)
        self._sleep = sleep

    @classmethod
    def from_manifests(
        cls, targets: Mapping[str, Target], data_dir: str | Path, eventing_dir: str | Path = EVENTING_DIR, *, sleep: Sleep = asyncio.sleep
    ) -> "Broker":
        return cls(routes_from_manifests(eventing_dir), targets, Path(data_dir) / DEAD_LETTER_FILE, sleep=sleep)

    def routes_for(self, event: CloudEvent) -> list[Route]:
        return [r for r in self.routes if r.matches(event)]

    async def deliver(self, event: CloudEvent) -> list[DeliveryResult]:
        """Deliver to every matching Trigger (concurrently); [] when none matches."""
        return list(await asyncio.gather(*(self._deliver(route, event) for route in self.routes_for(event))))

    async def emit(self, event: dict) -> None:
        """Deliver a structured-mode CloudEvent given as a dict (the local runtime's job events).

        Raises `Unavailable` when a function failed after its retries, so the sender retries later."""
        from functions.errors import Unavailable

        ce = CloudEvent.create({k: v for k, v in event.items() if k != "data"}, event.get("data"))
        failed = [r for r in await self.deliver(ce) if r.status >= 500]
        if failed:
            raise Unavailable(f"{failed[0].route.service} answered {failed[0].status}: {failed[0].body.get('error')}")

    async def _deliver(self, route: Route, event: CloudEvent) -> DeliveryResult:
        target = self.targets[route.function]
        attempts = 0
        while True:
            attempts += 1
            try:
                status, body = await target(event)
            except Exception as exc:  # a target that raises is a crash: like a 500
                log.exception("function %s crashed on event %s", route.function, event["id"])
                status, body = 500, {"error": f"{type(exc).__name__}: {exc}", "field": None}
            if status < 500:
                break
            if attempts > route.delivery.retry:
                break
            delay = route.delivery.delay(attempts)
            log.info("%s answered %d to event %s; retry %d in %.2fs", route.function, status, event["id"], attempts, delay)
            await self._sleep(delay)
        if status >= 400:
            self._dead_letter(route, event, status, body, attempts)
        return DeliveryResult(route, status, body, attempts)

    def _dead_letter(self, route: Route, event: CloudEvent, status: int, body: dict, attempts: int) -> None:
        record = {
            "time": datetime.now(timezone.utc).isoformat(),
            "trigger": route.trigger,
            "subscriber": route.service,
            "dead_letter_sink": route.delivery.dead_letter_sink,
            "attempts": attempts,
            "status": status,
            "error": body.get("error") if isinstance(body, dict) else body,
            "event": {**event.get_attributes(), "data": event.get_data()},
        }
        self.dead_letters.append(record)
        log.error(
            "dead letter: event %s (%s) to %s failed with %d after %d attempt(s): %s; see %s",
            event["id"], event["type"], route.service, status, attempts, record["error"], self.dead_letter_path,
        )

    # --- ingress ---------------------------------------------------------------
    async def ingress(self, request):
        from starlette.responses import JSONResponse

        try:
            event = await read_event(request)
            if is_platform_type(event["type"]):
                raise BadInput(
                    f"CloudEvent type {event['type']!r} is the platform's own (dev.knative.*): "
                    "its sources deliver it inside this process, never through the ingress",
                    "ce-type",
                    403,
                )
            if not self.routes_for(event):
                known = sorted({r.event_type for r in self.routes if r.event_type})
                raise BadInput(f"no Trigger for CloudEvent type {event['type']!r}; known types: {', '.join(known)}", "ce-type")
        except BadInput as exc:
            return edge.json_answer(answer_for(exc))
        results = await self.deliver(event)
        failed = [r for r in results if r.status >= 500]
        if failed:
            r = failed[0]
            return JSONResponse(
                {"error": f"{r.route.service} failed after {r.attempts} attempts ({r.body.get('error')}); "
                 f"the event is in {self.dead_letter_path}", "field": None},
                status_code=503,
            )
        rejected = [r for r in results if r.status >= 400]
        if rejected:
            return JSONResponse(rejected[0].body, status_code=rejected[0].status)
        return JSONResponse({"accepted": True, "results": {r.route.function: r.body for r in results}}, status_code=202)


class PingTimer:
    """Emits the PingSource's event to the broker on its schedule, until stopped."""

    def __init__(self, broker: Broker, schedule: PingSchedule, *, clock: Callable[[], float] = time.time, sleep: Sleep = asyncio.sleep):
        self.broker = broker
        self.schedule = schedule
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task | None = None

    async def tick(self) -> list[DeliveryResult]:
        return await self.broker.deliver(self.schedule.event())

    async def run(self) -> None:
        while True:
            now = self._clock()
            await self._sleep(max(0.0, self.schedule.next_fire(now) - now))
            try:
                await self.tick()
            except Exception:  # a failed tick must not stop the timer
                log.exception("ping %s failed", self.schedule.name)

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self.run(), name=f"ping-{self.schedule.name}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
