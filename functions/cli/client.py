"""Talking to a running stack (`dockyard dev`, or a cluster's ingress and stream Service) over HTTP.

Errors a user can act on are `CommandError`s with the exit code to use.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent import contract

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATA_DIR = Path(".dockyard")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CommandError(Exception):
    """Something the user can act on; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# --- talking to a running stack -------------------------------------------------


def resolve_token(given: str | None, data_dir: Path | None) -> str | None:
    """The API token to send: `--token`, else DOCKYARD_TOKEN (Settings.token), else `<data dir>/api-token` (dockyard dev's)."""
    if given:
        return given.strip()
    from functions.core.settings import Settings

    from_env = Settings.from_env().token
    if from_env:
        return from_env.strip()
    path = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR) / "api-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error_text(response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        field = f" (field: {body['field']})" if body.get("field") else ""
        return f"{body['error']}{field}"
    return f"HTTP {response.status_code}: {response.text.strip()[:300] or response.reason_phrase}"


def post_event(url: str, type: str, data: dict, token: str | None = None) -> tuple[dict, dict]:
    """POST a structured-mode CloudEvent to the broker ingress. Returns (event attributes, JSON answer)."""
    import httpx
    from cloudevents.conversion import to_structured
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": type, "source": contract.EVENT_SOURCE_CLI}, data)
    headers, body = to_structured(event)
    try:
        response = httpx.post(url.rstrip("/") + "/", headers={**headers, **auth_headers(token)}, content=body, timeout=30)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach {url}: {exc}; is `dockyard dev` running?") from None
    if response.status_code >= 300:
        raise CommandError(_error_text(response), EXIT_BAD_INPUT)
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    return {"id": event["id"], "source": event["source"]}, answer if isinstance(answer, dict) else {}


def get_json(url: str, path: str, token: str | None = None):
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + path, headers=auth_headers(token), timeout=10)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach {url}: {exc}; is `dockyard dev` running?") from None
    if response.status_code >= 300:
        raise CommandError(_error_text(response), EXIT_BAD_INPUT if response.status_code < 500 else EXIT_FAILED)
    return response.json()


def submit_task(url: str, data: dict, token: str | None = None) -> str:
    """Submit and return the task id: as answered, else as given, else derived like the function derives it."""
    attrs, answer = post_event(url, contract.EVENT_TASK_SUBMITTED, data, token)
    # The local broker answers {"results": {function: answer}}; Knative's answers 202 with no body.
    answers = [answer, *(r for r in (answer.get("results") or {}).values() if isinstance(r, dict))]
    answered = next((a["task_id"] for a in answers if isinstance(a.get("task_id"), str)), None)
    return answered or data.get("task_id") or contract.derive_task_id(attrs["source"], attrs["id"])


async def print_trace(url: str, task_id: str, *, after: int | None, follow: bool, idle: float, raw: bool = False, out=None, token: str | None = None):
    """Print the trace; returns the last status event seen (None if none).

    With `follow` it runs until the `end` event, reconnecting with Last-Event-ID
    whenever the connection drops. Without it, it stops at `end` or once nothing
    new has arrived for `idle` seconds: "what exists so far"."""
    from functions.cli import redaction, render
    from functions.cli.sse_client import SSEError, follow as sse_follow

    out = out or sys.stdout
    stream_url = f"{url.rstrip('/')}/api/stream/{task_id}"
    messages = sse_follow(stream_url, after, max_retries=None if follow else 3, headers=auth_headers(token))
    last_status = None
    renderer = render.Renderer()  # the lines, and the trace's totals before its end
    wait = max(idle, 5.0)  # the first message may wait for the connection
    try:
        while True:
            try:
                message = await (anext(messages) if follow else asyncio.wait_for(anext(messages), wait))
                wait = idle
            except (StopAsyncIteration, asyncio.TimeoutError):
                break
            if message.event == contract.EV_STATUS:
                last_status = message.data
            if raw:
                line = json.dumps({"id": message.id, "event": message.event, "data": message.data})
            else:
                line = renderer.render_message(message)
            if line is not None:
                print(redaction.clean(line), file=out, flush=True)
            if message.event == "end":
                break
    except SSEError as exc:
        raise CommandError(f"{exc}", EXIT_BAD_INPUT) from None
    except BrokenPipeError:
        raise
    except ConnectionError as exc:  # the stream could not be reached again after retries
        raise CommandError(str(exc)) from None
    finally:
        await messages.aclose()
    return last_status
