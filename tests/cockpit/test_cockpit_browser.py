"""The cockpit in Chromium against a real `dockyard dev`: submit, follow, survive a crash, redact, deep-link.

Everything goes through the page as a person uses it; the tests read the DOM
(`data-id` is the SSE id of the message an element shows) and compare it with
what the server streams.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from agent import contract
from functions.cli.sse_client import SSEParser
from tests.conftest import REPO_ROOT

EXAMPLE_PROMPT = json.loads((REPO_ROOT / "agent/examples/example_task.json").read_text())["prompt"]
ARTIFACTS = REPO_ROOT / "artifacts"
TOKEN = "ghp_" + "Zq8rT2mW5xK9" * 3  # the shape of a GitHub token (ghp_ + 36), built so no token sits in the source
END_TIMEOUT_MS = 45_000

# One Chromium and one dev stack per module and worker: under xdist (--dist loadgroup) these
# tests stay together on one worker instead of starting a browser on every worker.
pytestmark = pytest.mark.xdist_group("cockpit")

# Every element the trace renders for one SSE message, in document order, with a short label.
TRACE_JS = """() => [...document.querySelectorAll('#tv-trace [data-id]')].map(el => ({
    id: Number(el.dataset.id),
    type: el.dataset.type,
    nested: el.classList.contains('tool-result'),
    label: (el.matches('section.phase') ? el.querySelector('.phase-name').textContent
            : el.matches('details') ? el.querySelector('.tool-name').textContent
            : el.textContent).trim(),
}))"""


def trace(page) -> list[dict]:
    return page.evaluate(TRACE_JS)


def cockpit(server, fragment: str = "") -> str:
    """The cockpit's URL with the dev token, as `dockyard dev` prints it (the page trades it for a cookie)."""
    return f"{server.url}/?token={server.token}{fragment}"


def stream_ids(server, task_id: str) -> list[int]:
    """The ids of every message of the task, as the server streams them from the start."""
    parser = SSEParser()
    ids: list[int] = []
    url = server.url
    with httpx.stream("GET", f"{url}/api/stream/{task_id}?after=0", headers=server.headers, timeout=httpx.Timeout(10, read=30)) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            for message in parser.feed(chunk):
                if message.event == "end":
                    return ids
                if message.id is not None:
                    ids.append(message.id)
    raise AssertionError(f"the stream of {task_id} closed without an end event")


def scripted_model(path: Path, turns: list[dict]) -> str:
    """`scripted:NAME` for a script written to `path`, a file in the dev stack's scripts dir."""
    path.write_text(json.dumps(turns))  # JSON is YAML: the scripted model reads either
    return f"scripted:{path.name}"


def open_form(page) -> None:
    """Unfold "New task" (folded below the list once there are tasks)."""
    page.wait_for_selector("#new-task-open[aria-expanded]")
    if not page.evaluate("document.querySelector('#new-task').open"):
        page.click("#new-task-open")
    page.wait_for_selector("#submit-form textarea[name=prompt]", state="visible")


def submit_from_page(page, prompt: str, model: str) -> str:
    """Fill in the form, submit, and return the task id the page navigated to."""
    open_form(page)
    page.fill("#submit-form textarea[name=prompt]", prompt)
    page.fill("#submit-form input[name=model]", model)
    page.click("#submit-form button[type=submit]")
    page.wait_for_url("**/#/tasks/*")
    task_id = page.url.rsplit("/", 1)[-1]
    assert contract.is_valid_task_id(task_id), page.url
    return task_id


def submit_over_http(server, data: dict) -> str:
    event = {"specversion": "1.0", "type": contract.EVENT_TASK_SUBMITTED, "source": "tests/cockpit", "id": str(uuid.uuid4()), "data": data}
    headers = {"Content-Type": "application/cloudevents+json", **server.headers}
    answer = httpx.post(f"{server.url}/", content=json.dumps(event), headers=headers, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()["results"]["task_submitted"]["task_id"]


def wait_until_ended(page) -> None:
    page.wait_for_selector("#tv-conn[data-state=ended]", timeout=END_TIMEOUT_MS)


def first(entries: list[dict], type_: str, label: str) -> int:
    for i, entry in enumerate(entries):
        if entry["type"] == type_ and label in entry["label"]:
            return i
    raise AssertionError(f"no {type_} {label!r} in the trace: {[(e['type'], e['label'][:40]) for e in entries]}")


def test_submit_the_example_and_watch_it_to_the_end(page, dev):
    page.goto(cockpit(dev))
    task_id = submit_from_page(page, EXAMPLE_PROMPT, "scripted:example")
    wait_until_ended(page)
    page.wait_for_selector("#tv-outcome[data-outcome=done]")

    entries = trace(page)
    order = [
        first(entries, "phase", contract.PHASE_STRATEGIC),
        first(entries, "phase", contract.PHASE_TACTICAL),
        first(entries, "tool", "write_file"),
        first(entries, "tool", "execute"),
        first(entries, "result", contract.OUTCOME_DONE),
    ]
    assert order == sorted(order), entries
    ids = [e["id"] for e in entries]
    assert ids == sorted(set(ids)) == stream_ids(dev, task_id)
    assert page.text_content("#tv-title") == task_id
    assert "write test_fizzbuzz.py" in page.text_content("#tv-todo")

    # A tool call is collapsed to one line; opening it shows the arguments and the result.
    execute = page.locator("#tv-trace details.tool", has=page.locator(".tool-name", has_text="execute")).first
    assert not execute.evaluate("el => el.open")
    execute.locator("summary").click()
    assert "python3 -m unittest" in execute.locator("dl.args").inner_text()
    assert "OK" in execute.locator(".tool-result pre").inner_text()
    assert execute.locator(".tool-state").inner_text().startswith("ok")

    # After the end the task record tells where the final snapshot is.
    page.wait_for_selector(f"#tv-stored code:text-is('{contract.final_archive_key(task_id)}')")
    # The list shows the task with its outcome.
    row = page.locator(f"#task-list a[data-task-id='{task_id}']")
    row.locator(".badge.outcome-done").wait_for()
    assert row.get_attribute("aria-current") == "page"

    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "cockpit-task.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out on a phone
    page.screenshot(path=str(ARTIFACTS / "cockpit-task-phone.png"), full_page=True)


def test_the_page_survives_a_crash_of_the_server_without_gap_or_duplicate(page, make_dev, tmp_path, scripts_dir):
    # The second call waits for `~/gate` (the task's home, which its sandbox shows): the crash comes mid-task, however slow the machine.
    turns = [
        {"content": "Plan.", "tool_calls": [{"name": "plan", "args": {"todos": ["one", "two"], "objective": "Step one"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": "echo one > one.txt", "timeout_seconds": 30}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": "until [ -e ~/gate ]; do sleep 0.02; done; cat one.txt", "timeout_seconds": 120}}]},
        {"content": "Step one done."},
        {"tool_calls": [{"name": "plan", "args": {"todos": ["two"], "objective": "Step two"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": "echo two", "timeout_seconds": 30}}]},
        {"content": "Step two done."},
        {"tool_calls": [{"name": "finish", "args": {"summary": "both steps done"}}]},
    ]
    model = scripted_model(scripts_dir / "gated.json", turns)
    server = make_dev().start()
    task_id = None
    try:
        page.goto(cockpit(server))
        task_id = submit_from_page(page, "Two steps", model)
        page.wait_for_selector("#tv-trace details.tool .tool-result", state="attached")  # mid-task: the first tool call has finished
        page.wait_for_selector("#tv-conn[data-state=live]")
        before = [e["id"] for e in trace(page)]

        server.crash()
        page.wait_for_selector("#tv-conn[data-state=reconnecting]", timeout=10_000)
    finally:
        if task_id is not None:  # the agent, told to stop by the crash, finishes the waiting call and exits
            (server.data_dir / "tasks" / task_id / "home" / "gate").touch()
    server.start()  # same port, same data dir: the runtime resumes the task
    wait_until_ended(page)
    page.wait_for_selector("#tv-outcome[data-outcome=done]")

    entries = trace(page)
    ids = [e["id"] for e in entries]
    expected = stream_ids(server, task_id)
    assert expected == sorted(set(expected))  # the stream: strictly increasing
    assert len(ids) == len(set(ids)), f"a message is shown twice: {ids}"
    assert sorted(ids) == expected, f"page {ids} != stream {expected}"
    top_level = [e["id"] for e in entries if not e["nested"]]  # a tool's end sits inside its start
    assert top_level == sorted(top_level)
    assert ids[: len(before)] == before and len(ids) > len(before)
    labels = " | ".join(e["label"] for e in entries if e["type"] == "status")
    assert "resumed" in labels, labels  # the agent went on from its checkpoint after the crash


def test_a_secret_printed_by_the_agent_is_redacted_in_the_page(page, dev, tmp_path, scripts_dir):
    turns = [
        {"content": "Plan.", "tool_calls": [{"name": "plan", "args": {"todos": ["print it"], "objective": "Print the token"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": f"echo {TOKEN}", "timeout_seconds": 30}}]},
        {"content": "Printed."},
        {"tool_calls": [{"name": "finish", "args": {"summary": "printed the token"}}]},
    ]
    page.goto(cockpit(dev))
    submit_from_page(page, "Print a token", scripted_model(scripts_dir / "secret.json", turns))
    wait_until_ended(page)
    execute = page.locator("#tv-trace details.tool", has=page.locator(".tool-name", has_text="execute")).first
    execute.locator("summary").click()
    assert "[REDACTED]" in execute.locator(".tool-result pre").inner_text()
    assert TOKEN not in page.content()
    assert TOKEN[4:] not in page.evaluate("document.body.innerText + document.body.textContent")


async def _publish_raw(nats_url: str, task_id: str, options: dict) -> None:
    import nats

    nc = await nats.connect(nats_url, **options)
    try:
        js = nc.jetstream()
        record = {"ts": "2030-01-01T00:00:00.000Z", "level": "WARNING", "logger": "intruder", "msg": f"token {TOKEN}", "task_id": task_id}
        await js.publish(contract.subject_logs(task_id), json.dumps(record).encode())
    finally:
        await nc.close()


def test_a_secret_that_reaches_nats_unredacted_is_redacted_before_the_page(page, dev, tmp_path, scripts_dir):
    """The agent redacts what it publishes; the stream must redact again (anything can publish on NATS)."""
    turns = [
        {"content": "Plan.", "delay_seconds": 1.5, "tool_calls": [{"name": "plan", "args": {"todos": ["wait"], "objective": "Wait"}}]},
        {"content": "Waited.", "delay_seconds": 0.5},
        {"tool_calls": [{"name": "finish", "args": {"summary": "waited"}}]},
    ]
    task_id = submit_over_http(dev, {"prompt": "Wait a little", "model": scripted_model(scripts_dir / "wait.json", turns)})
    assert dev.nats_url, "dev printed no NATS URL"
    # nats-py needs an event loop of its own: Playwright's sync API holds this thread's.
    publisher = threading.Thread(target=asyncio.run, args=(_publish_raw(dev.nats_url, task_id, dev.nats_connect_options),))
    publisher.start()
    publisher.join(15)
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    page.select_option("#tv-level", "0")
    wait_until_ended(page)
    assert page.locator("#tv-trace .ev-log .logger", has_text="intruder").count() == 1
    assert TOKEN not in page.content()
    assert "[REDACTED]" in page.locator("#tv-trace .ev-log", has_text="intruder").inner_text()


def test_a_deep_link_opens_the_task_view_and_a_finished_task_has_no_controls(page, dev):
    task_id = submit_over_http(dev, {"prompt": EXAMPLE_PROMPT, "model": "scripted:example"})
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    page.wait_for_selector("#task-view")  # once the page has traded its token for the cookie
    assert page.text_content("#tv-title") == task_id
    wait_until_ended(page)
    page.wait_for_selector("#tv-outcome[data-outcome=done]")
    assert [e["id"] for e in trace(page)] == stream_ids(dev, task_id)

    # A finished task offers no cancel or message (they could only answer 409), and says how long it took.
    for control in ("#tv-cancel", "#tv-message-form input[name=text]", "#tv-message-form button"):
        page.wait_for_selector(f"{control}:disabled")
    page.locator("#tv-facts dt", has_text="took").wait_for()
    page.locator(f"#task-list a[data-task-id='{task_id}'] .task-took").wait_for()

    # Another task's link, then back to the list.
    page.goto(f"{dev.url}/#/tasks/no-such-task")  # the session cookie is set: no token needed any more
    page.wait_for_selector("#tv-conn[data-state=error]")
    assert "no task 'no-such-task'" in page.text_content("#tv-error")
    page.click("a.brand")
    page.wait_for_selector("#task-view", state="hidden")
    page.wait_for_selector(f"#task-list a[data-task-id='{task_id}']")


def test_the_token_in_the_url_becomes_an_httponly_cookie_and_leaves_the_address_bar(page, dev):
    task_id = submit_over_http(dev, {"prompt": EXAMPLE_PROMPT, "model": "scripted:example"})
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    page.wait_for_selector("#tv-conn[data-state=ended]", timeout=END_TIMEOUT_MS)
    assert page.url == f"{dev.url}/#/tasks/{task_id}"  # no token in the address bar (nor in history: replaceState)
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page reads it
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "dockyard_token"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == dev.token
    page.reload()  # the cookie alone authenticates the page, its EventSource included
    page.wait_for_selector("#tv-conn[data-state=ended]", timeout=END_TIMEOUT_MS)


def test_without_a_token_the_page_shows_the_401_and_nothing_else(page, dev):
    page.goto(f"{dev.url}/")
    page.wait_for_selector("text=no API token: open the cockpit URL")
    assert page.context.cookies() == []


def test_a_refused_submission_shows_the_error_and_the_field(page, dev):
    page.goto(cockpit(dev))
    open_form(page)
    page.fill("#submit-form textarea[name=prompt]", "Do it")
    page.fill("#submit-form input[name=model]", "scripted:../elsewhere")  # a known provider: the page lets it through
    page.click("#submit-form button[type=submit]")
    error = page.locator("#submit-error")
    error.wait_for()
    assert error.inner_text().startswith("400: model: a scripted model is named by a file")
    assert error.inner_text().endswith("(field: model)")
    assert page.get_attribute("#submit-form input[name=model]", "aria-invalid") == "true"
    assert "#/tasks/" not in page.url


def test_through_the_relay_when_the_broker_is_elsewhere(page, make_dev):
    """In the cluster the page posts to /api/events, which forwards to DOCKYARD_BROKER_URL."""
    server = make_dev()
    server.env["DOCKYARD_BROKER_URL"] = f"http://127.0.0.1:{server.port}/"  # dev's own ingress stands in for the Broker
    server.start()
    assert httpx.get(f"{server.url}/cockpit-config.json").json()["ingress"] == "/api/events"
    page.goto(cockpit(server))
    with page.expect_request("**/api/events") as posted:
        task_id = submit_from_page(page, EXAMPLE_PROMPT, "scripted:example")
    assert posted.value.method == "POST"
    wait_until_ended(page)
    page.wait_for_selector("#tv-outcome[data-outcome=done]")
    assert httpx.get(f"{server.url}/api/tasks/{task_id}", headers=server.headers).json()["task_id"] == task_id

    # Only what a person may send passes: not, say, a forged "Job finished" event.
    forged = {"specversion": "1.0", "type": contract.EVENT_JOB_UPDATE, "source": "tests/cockpit", "id": "1", "data": {}}
    answer = httpx.post(f"{server.url}/api/events", json=forged, headers={"Content-Type": "application/cloudevents+json", **server.headers})
    assert (answer.status_code, answer.json()["field"]) == (400, "type")
    # The Broker's own refusals come back as they are.
    empty = {**forged, "type": contract.EVENT_TASK_SUBMITTED, "data": {"prompt": ""}}
    answer = httpx.post(f"{server.url}/api/events", json=empty, headers={"Content-Type": "application/cloudevents+json", **server.headers})
    assert (answer.status_code, answer.json()["field"]) == (400, "prompt")


GATED = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["wait"], "objective": "wait for the test"}}]},
    {"tool_calls": [{"name": "execute", "args": {
        "command": "echo started > started.flag; while [ ! -e ~/release ]; do sleep 0.1; done"}}]},
    {"tool_calls": [{"name": "finish", "args": {"summary": "released"}}]},
]


def test_commands_answer_next_to_the_buttons_while_the_task_runs(page, dev, scripts_dir):
    import yaml

    (scripts_dir / "gated.yaml").write_text(yaml.safe_dump(GATED))
    task_id = submit_over_http(dev, {"prompt": "wait", "model": "scripted:gated"})
    folder = dev.data_dir / "tasks" / task_id
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    page.wait_for_selector("#task-view")
    page.wait_for_function("() => document.querySelector('#tv-todo')?.textContent.includes('wait')", timeout=END_TIMEOUT_MS)
    try:
        assert page.is_enabled("#tv-cancel") and page.is_enabled("#tv-message-form button")
        # Commands go to the broker ingress; its answers show next to the buttons.
        page.fill("#tv-message-form input[name=text]", "one more thing")
        page.click("#tv-message-form button")
        page.wait_for_selector("#tv-command-result:text-matches('^message: ')")
        assert "error" not in page.get_attribute("#tv-command-result", "class")
        page.click("#tv-cancel")
        page.wait_for_selector("#tv-command-result:text-matches('^cancel: ')")
        (folder / "home" / "release").touch()  # the agent stops after its current step: let that step end
        page.wait_for_selector("#tv-outcome[data-outcome=cancelled]", timeout=END_TIMEOUT_MS)
        page.wait_for_selector("#tv-cancel:disabled")
    finally:
        (folder / "home" / "release").touch()  # whatever happened, let the agent go
