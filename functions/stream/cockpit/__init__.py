"""The cockpit: a static web page (HTML, CSS, JavaScript; no build step, no CDN) served at `/`.

The page reads the stream app's own API (`/api/tasks`, `/api/stream/{id}`) and
submits tasks and commands as structured CloudEvents. Where it posts them comes
from `GET /cockpit-config.json`, which this module serves:

    DOCKYARD_BROKER_URL unset   {"ingress": "/", ...}            `dockyard dev`: the broker ingress is
                                                                 `POST /` of the same origin
    DOCKYARD_BROKER_URL set     {"ingress": "/api/events", ...}  the cluster: a relay in this app forwards
                                                                 each event to that URL (the Broker's
                                                                 in-cluster address, which no browser reaches)

The rest of the config is what the page checks and offers before it posts, all from
the contract and the settings, so the page never keeps a copy: `providers` (a model
is `provider:name`, with `scripted` first), `states` and `outcomes` (the list's
filters), and `limits` (the form's bounds: `deadline_seconds` and `retries`, each
`{default, max}`, as task_submitted enforces them). The server stays the judge: the
page's checks only save a round trip.

Every route but the page and its assets needs an API token (functions/stream/auth.py);
the relay needs a write token, and passes it on to the Broker URL.

The relay is not an open door into the Broker: it accepts one CloudEvent per
request, of the two types a person may send (task submitted, task command), no
larger than the functions accept, and only as `application/cloudevents+json` or
in binary mode (ce-* headers), so a cross-site form cannot post one. It answers
202 with the task id (given, or derived from source + id exactly as
`task_submitted` derives it, since the Knative Broker answers with no body), the
Broker's own 4xx as `{"error", "field"}`, and 503 (retry later) when the Broker
is unreachable or failing. Errors are raised and answered by the stream app's
exception handler (`functions.errors.answer_for`), like every other route's. In the cluster set DOCKYARD_BROKER_URL to
`http://broker-ingress.knative-eventing.svc.cluster.local/dockyard/default`.

The page: `static/app.js` (routing, polling, commands), `static/tasklist.js`
(the task list, kept by task id and updated in place), `static/submitform.js`
(the "New task" form and its field errors), `static/trace.js` (the live trace of
one task and its invariants) with `follow.js` (following the live end),
`tracetools.js` (filter, search, fold, first error), `outputs.js` (a call's
head, tail and full output), `outcome.js` (the banner), `controls.js` and
`lineage.js` (retry, fork, downloads), `static/api.js` (HTTP and CloudEvents),
`static/dom.js` (building elements from data, never from HTML); `style.css`
for the page, `task.css` for the task view.

The broker URL comes from `Settings.broker_url` (DOCKYARD_BROKER_URL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from agent import contract

if TYPE_CHECKING:
    from functions.core.settings import Settings
    from functions.stream.redaction import Redaction

STATIC_DIR = Path(__file__).parent / "static"
RELAY_PATH = "/api/events"
RELAYED_TYPES = (contract.EVENT_TASK_SUBMITTED, contract.EVENT_TASK_COMMAND)
RELAY_TIMEOUT_SECONDS = 15.0
# The list's filters, in the order a task goes through them.
STATES = (contract.STATE_QUEUED, contract.STATE_STARTED, contract.STATE_RESUMED, contract.STATE_RETRYING,
          contract.STATE_INTERRUPTED, contract.STATE_FINISHED)
OUTCOMES = (contract.OUTCOME_DONE, contract.OUTCOME_FAILED, contract.OUTCOME_CANCELLED, contract.OUTCOME_DEADLINE,
            contract.OUTCOME_BUDGET)


def routes(settings: Settings, redaction: Redaction | None = None) -> list:
    """Routes to append after the stream app's API routes; the static mount stays last.

    The relay's answers go through `redaction` (the stream's), like everything else served.
    """
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    broker_url = settings.broker_url
    config = {"ingress": RELAY_PATH if broker_url else "/", **form_config(settings)}

    async def cockpit_config(request):
        return JSONResponse(config, headers={"Cache-Control": "no-store"})

    extra = [Route("/cockpit-config.json", cockpit_config)]
    if broker_url:
        extra.append(Route(RELAY_PATH, relay_to(broker_url, redaction), methods=["POST"]))
    return [*extra, Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="cockpit")]


def form_config(settings: Settings) -> dict:
    """What the page's list and form need to know: model providers, states, outcomes, limits."""
    policy = settings.limits
    return {
        "providers": [contract.SCRIPTED_PROVIDER, *contract.MODEL_PROVIDERS],
        "states": list(STATES),
        "outcomes": list(OUTCOMES),
        "limits": {
            "deadline_seconds": {"default": policy.default_deadline_seconds, "max": policy.max_deadline_seconds},
            "retries": {"default": policy.default_retries, "max": policy.max_retries},
        },
    }


def task_id_of(event) -> str | None:
    """The task an accepted event is about: the one given, or the one task_submitted derives."""
    data = event.get_data()
    given = data.get("task_id") if isinstance(data, dict) else None
    if contract.is_valid_task_id(given):
        return given
    if event["type"] == contract.EVENT_TASK_SUBMITTED:
        return contract.derive_task_id(event["source"], event["id"])
    return None


def forwarded_headers(request) -> dict[str, str]:
    """What the relay sends on: the structured content type, and the caller's token as a Bearer header.

    The Broker in the cluster ignores the header (it is cluster-local); a `dockyard dev` standing in
    for the Broker checks it like any request."""
    from functions.core import cloudevent
    from functions.stream.auth import presented_token

    token = presented_token({k.lower(): v for k, v in request.headers.items()})
    return {"Content-Type": cloudevent.STRUCTURED, **({"Authorization": f"Bearer {token}"} if token else {})}


def relay_to(broker_url: str, redaction: Redaction | None = None):
    """The endpoint that checks one CloudEvent and forwards it, structured, to the Broker.

    It raises; the stream app's exception handler answers by `functions.errors.answer_for`.
    What the Broker answered is redacted before it is cut and passed on.
    """
    from agent.redact import Redactor

    formats_only = Redactor()

    from starlette.responses import JSONResponse

    def redact(text: str) -> str:
        return (redaction.current() if redaction is not None else formats_only).redact(text)

    async def relay(request):
        import httpx

        from functions.core import cloudevent
        from functions.core.settings import mask_url
        from functions.errors import BadInput, TransientError

        event = await cloudevent.read_event(request)
        if event["type"] not in RELAYED_TYPES:
            raise BadInput(f"the cockpit relays only {' and '.join(RELAYED_TYPES)}, not {event['type']!r}", "type")
        body = json.dumps({**event.get_attributes(), "data": event.get_data()}).encode()
        try:
            async with httpx.AsyncClient(timeout=RELAY_TIMEOUT_SECONDS) as client:
                answer = await client.post(broker_url, content=body, headers=forwarded_headers(request))
        except httpx.HTTPError as exc:
            raise TransientError(f"the broker at {mask_url(broker_url)} is unreachable ({exc or type(exc).__name__})") from exc
        if answer.is_success:
            return JSONResponse({"accepted": True, "task_id": task_id_of(event)}, 202)
        try:
            reply = answer.json()
        except ValueError:
            reply = None
        if 400 <= answer.status_code < 500 and isinstance(reply, dict) and "error" in reply:
            raise BadInput(redact(str(reply["error"])), reply.get("field"), answer.status_code)  # the Broker's refusal
        text = redact(" ".join(answer.text.split()))[:300] or answer.reason_phrase
        if 400 <= answer.status_code < 500:
            raise BadInput(f"the broker answered {answer.status_code}: {text}", None, answer.status_code)
        raise TransientError(f"the broker answered {answer.status_code}: {text}")

    return relay
