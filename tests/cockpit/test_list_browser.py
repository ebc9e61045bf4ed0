"""The cockpit's task list and form at scale, in Chromium against a real `dockyard dev`.

One dev stack holds sixteen finished tasks, one failed task and one task held
running by a gate (a file the test creates), so the list has every kind of row.
The tests read the DOM the way a person reads the page: where the rows are,
which of them show, where the keyboard focus is, what the times say.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from agent import contract
from tests.cockpit.test_cockpit_browser import ARTIFACTS, END_TIMEOUT_MS, cockpit, open_form, scripted_model, submit_over_http
from tests.conftest import eventually

pytestmark = pytest.mark.xdist_group("cockpit")

SIXTEEN = 16
QUICK = [{"tool_calls": [{"name": "finish", "args": {"summary": "nothing to do"}}]}]
HELD = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["wait"], "objective": "wait for the test"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": "while [ ! -e ~/release ]; do sleep 0.1; done", "timeout_seconds": 300}}]},
    {"content": "Released."},
    {"tool_calls": [{"name": "finish", "args": {"summary": "released"}}]},
]
FINISH_SECONDS = 120.0


def record(server, task_id: str) -> dict:
    return httpx.get(f"{server.url}/api/tasks/{task_id}", headers=server.headers, timeout=10).json()


def finished(server, task_id: str) -> dict | None:
    current = record(server, task_id)
    return current if current.get("state") == contract.STATE_FINISHED else None


@pytest.fixture(scope="module")
def stack(make_module_dev, scripts_dir):
    """A dev stack with 16 finished tasks, a failed one and one running until `release()`."""
    server = make_module_dev()
    quick = scripted_model(scripts_dir / "quick.json", QUICK)
    done = [submit_over_http(server, {"prompt": f"Quick task number {i}", "model": quick}) for i in range(SIXTEEN)]
    failed = submit_over_http(server, {"prompt": "A model that is not there", "model": "scripted:no-such-script"})
    held = submit_over_http(server, {"prompt": "Hold on until released", "model": scripted_model(scripts_dir / "held.json", HELD)})
    for task_id in [*done, failed]:
        eventually(lambda t=task_id: finished(server, t), f"task {task_id} to finish", FINISH_SECONDS, interval=0.5)
    eventually(lambda: record(server, held).get("state") in (contract.STATE_STARTED, contract.STATE_RESUMED), "the held task to start", FINISH_SECONDS)
    gate = server.data_dir / "tasks" / held / "home" / "release"
    yield {"server": server, "done": done, "failed": failed, "held": held, "release": gate.touch}
    gate.touch()  # whatever happened, let the agent go


@pytest.fixture(scope="module")
def make_module_dev(tmp_path_factory, scripts_dir):
    from tests.dev_process import DevServer

    servers = []

    def make():
        servers.append(DevServer(tmp_path_factory.mktemp("list-dev"), env={"DOCKYARD_SCRIPTS_DIR": str(scripts_dir)}).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def open_list(page, server, size=(1440, 900)) -> None:
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.goto(cockpit(server))
    page.wait_for_function(f"document.querySelectorAll('#task-list li').length >= {SIXTEEN + 2}")


def box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def test_at_laptop_size_the_list_sits_beside_the_task_and_every_task_is_reachable_above_the_form(page, stack):
    server = stack["server"]
    open_list(page, server)
    page.click(f"#task-list a[data-task-id='{stack['done'][0]}']")
    page.wait_for_selector("#task-view:not([hidden])")
    sidebar, view = box(page, ".sidebar"), box(page, "#task-view")
    assert sidebar["x"] + sidebar["width"] <= view["x"], (sidebar, view)  # beside, not above
    assert view["y"] < 200  # the task starts at the top, not under the list

    # Every row can be brought into view inside the list, above the folded form, without the page scrolling.
    form = box(page, "#new-task")
    assert form["y"] + form["height"] <= 900 and form["height"] < 80  # folded: one line
    rows = page.locator("#task-list a.task-row")
    assert rows.count() == SIXTEEN + 2
    for i in range(rows.count()):
        rows.nth(i).scroll_into_view_if_needed()
        row = rows.nth(i).bounding_box()
        assert row["y"] >= 0 and row["y"] + row["height"] <= form["y"], (i, row, form)
    assert page.evaluate("window.scrollY") == 0
    page.evaluate("document.querySelector('#task-scroll').scrollTop = 0; window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "cockpit-list-1440x900.png"))


def test_on_a_phone_one_column_with_the_list_before_the_form(page, stack):
    server = stack["server"]
    open_list(page, server, (390, 844))
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out
    last_row = page.locator("#task-list a.task-row").last.bounding_box()
    form = box(page, "#new-task")
    assert last_row["y"] + last_row["height"] <= form["y"]  # every task comes before the form
    assert box(page, ".sidebar")["width"] <= 390
    page.screenshot(path=str(ARTIFACTS / "cockpit-list-390x844.png"))
    page.screenshot(path=str(ARTIFACTS / "cockpit-list-390x844-full.png"), full_page=True)
    # An open task replaces the list, with a way back.
    page.click(f"#task-list a[data-task-id='{stack['done'][0]}']")
    page.wait_for_selector(".sidebar", state="hidden")
    page.click("#task-view a.back")
    page.wait_for_selector("#task-list a.task-row")


def test_rows_show_durations_elapsed_times_and_the_reason_of_a_failure(page, stack):
    server = stack["server"]
    open_list(page, server)
    done = record(server, stack["done"][0])
    took = page.locator(f"#task-list a[data-task-id='{done['task_id']}'] .task-took")
    first = took.inner_text()
    assert first and "ran" in took.get_attribute("title")
    # Two more polls of the list: a finished task's time does not grow.
    for _ in range(2):
        with page.expect_response(lambda r: r.url.endswith("/api/tasks")):
            pass
    assert took.inner_text() == first

    failed = record(server, stack["failed"])
    assert failed["outcome"] == contract.OUTCOME_FAILED and failed["reason"]
    failed_row = page.locator(f"#task-list a[data-task-id='{stack['failed']}']")
    assert failed_row.locator(".badge.outcome-failed").inner_text() == contract.OUTCOME_FAILED
    # The row says why in one line (at most 160 characters); its title holds all of it.
    shown = " ".join(failed["reason"].split())
    shown = shown if len(shown) <= 160 else shown[:159] + "…"
    assert failed_row.locator(".task-reason").inner_text() == shown
    assert failed_row.locator(".task-reason").get_attribute("title") == failed["reason"]
    assert page.locator(f"#task-list a[data-task-id='{done['task_id']}'] .task-reason").is_hidden()  # no reason for success

    held = page.locator(f"#task-list a[data-task-id='{stack['held']}'] .task-elapsed")
    before = held.inner_text()
    page.wait_for_function("([el, before]) => el.textContent !== before", arg=[held.element_handle(), before])  # it runs: it grows


def test_search_and_filters_hide_rows_and_say_how_many_show(page, stack):
    server = stack["server"]
    open_list(page, server)
    visible = "() => [...document.querySelectorAll('#task-list li')].filter(li => !li.hidden).map(li => li.querySelector('a').dataset.taskId)"

    page.fill("#filter-text", "number 7")  # the prompt
    assert page.evaluate(visible) == [stack["done"][7]]
    assert page.inner_text("#tasks-count") == f"1 of {SIXTEEN + 2} shown"
    page.fill("#filter-text", stack["failed"][-6:])  # a part of the id
    assert page.evaluate(visible) == [stack["failed"]]
    page.fill("#filter-text", "no task has this")
    page.wait_for_selector("#tasks-empty:text('No task matches the filters.')")

    page.fill("#filter-text", "")
    page.select_option("#filter-outcome", contract.OUTCOME_FAILED)
    assert page.evaluate(visible) == [stack["failed"]]
    page.select_option("#filter-outcome", "")
    page.select_option("#filter-state", contract.STATE_FINISHED)
    assert set(page.evaluate(visible)) == {*stack["done"], stack["failed"]}
    page.select_option("#filter-state", "")
    assert len(page.evaluate(visible)) == SIXTEEN + 2


def test_the_list_updates_in_place_keeping_focus_and_scroll_when_another_task_changes_state(page, stack):
    server = stack["server"]
    open_list(page, server)
    held = stack["held"]
    focused_id = stack["done"][3]  # a row low in the list: the list has to be scrolled to it
    page.evaluate("() => { window.__rows = new Map([...document.querySelectorAll('#task-list li')].map(li => [li.querySelector('a').dataset.taskId, li])); }")
    page.focus(f"#task-list a[data-task-id='{focused_id}']")
    assert page.evaluate("document.querySelector('#task-scroll').scrollTop") > 0  # the list was scrolled to reach it
    row_on_screen = box(page, f"#task-list a[data-task-id='{focused_id}']")["y"]
    assert page.locator(f"#task-list a[data-task-id='{held}'] .badge.outcome-done").count() == 0

    stack["release"]()
    eventually(lambda: finished(server, held), "the held task to finish once released", FINISH_SECONDS,
               interval=0.5, detail=lambda: json.dumps(record(server, held)))
    page.locator(f"#task-list a[data-task-id='{held}'] .badge.outcome-done").wait_for(timeout=END_TIMEOUT_MS)

    assert page.evaluate("document.activeElement.dataset.taskId") == focused_id
    # The view did not move: the focused row is where it was on the screen (rows above it may have changed height;
    # the list keeps its scroll anchored on what is shown).
    assert abs(box(page, f"#task-list a[data-task-id='{focused_id}']")["y"] - row_on_screen) < 1  # sub-pixel anchoring
    same = """() => [...document.querySelectorAll('#task-list li')].every(li => window.__rows.get(li.querySelector('a').dataset.taskId) === li)"""
    assert page.evaluate(same), "a row was rebuilt instead of updated"
    assert page.locator(f"#task-list a[data-task-id='{held}'] .task-took").count() == 1  # now a duration


def invalid_field(page) -> dict:
    """The field the form marked faulty: the focused element, its aria-invalid and the message tied to it."""
    return page.evaluate("""() => {
        const el = document.activeElement;
        const said = (el.getAttribute('aria-describedby') || '').split(/\\s+/).map(id => document.getElementById(id))
            .filter(note => note && note.classList.contains('field-error') && !note.hidden).map(note => note.textContent);
        return {name: el.name, invalid: el.getAttribute('aria-invalid'), said};
    }""")


def test_the_form_checks_the_model_provider_before_posting_and_marks_the_field(page, stack):
    page.goto(cockpit(stack["server"]))
    open_form(page)
    page.fill("#f-prompt", "Do it")
    page.fill("#f-model", "nosuch:model")
    posted = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    page.click("#submit-form button[type=submit]")
    page.wait_for_selector("#f-model[aria-invalid=true]")
    field = invalid_field(page)
    assert field["name"] == "model" and field["invalid"] == "true"
    providers = httpx.get(f"{stack['server'].url}/cockpit-config.json").json()["providers"]
    assert field["said"] == [f'Unknown model provider "nosuch": use one of {", ".join(providers)}.']
    assert posted == []  # checked in the page: nothing was sent
    page.fill("#f-model", "scripted:example")  # editing the field clears its mark
    assert page.get_attribute("#f-model", "aria-invalid") is None

    page.fill("#f-deadline", "0")
    page.click("#submit-form button[type=submit]")
    page.wait_for_selector("#f-deadline[aria-invalid=true]")
    assert invalid_field(page)["name"] == "deadline"
    assert posted == []


@pytest.mark.parametrize(
    ("fill", "field", "status"),
    [({"#f-repo": "ftp://example.org/project.git"}, "repo", 400), ({"#f-task-id": "taken"}, "task_id", 409)],
    ids=["repo-url", "task-id-taken"],
)
def test_a_refusal_by_the_server_marks_the_field_it_names(page, stack, fill, field, status):
    server = stack["server"]
    if field == "task_id":  # a task of that id exists already, with another spec
        event = {"specversion": "1.0", "type": contract.EVENT_TASK_SUBMITTED, "source": "tests", "id": str(uuid.uuid4()),
                 "data": {"prompt": "first", "task_id": "taken", "model": "scripted:quick.json"}}  # fmt: skip
        answer = httpx.post(f"{server.url}/", content=json.dumps(event), headers={"Content-Type": "application/cloudevents+json", **server.headers})
        assert answer.status_code == 202, answer.text
    page.goto(cockpit(server))
    open_form(page)
    page.fill("#f-prompt", "Something else")
    page.fill("#f-model", "scripted:example")
    for selector, value in fill.items():
        page.fill(selector, value)
    with page.expect_response(lambda r: r.request.method == "POST") as answered:
        page.click("#submit-form button[type=submit]")
    assert answered.value.status == status
    page.wait_for_selector(f"#submit-form [name={field}][aria-invalid=true]")
    marked = invalid_field(page)
    assert marked["name"] == field and marked["said"] == [answered.value.json()["error"]]
    assert page.inner_text("#submit-error").endswith(f"(field: {answered.value.json()['field']})")
    assert "#/tasks/" not in page.url


def test_ref_deadline_retries_and_task_id_reach_the_task(page, stack, scripts_dir):
    server = stack["server"]
    page.goto(cockpit(server))
    open_form(page)
    page.fill("#f-prompt", "With every field")
    page.fill("#f-model", "scripted:quick.json")
    page.fill("#f-deadline", "600")
    page.fill("#f-retries", "2")
    page.fill("#f-task-id", "every-field")
    page.click("#submit-form button[type=submit]")
    page.wait_for_url("**/#/tasks/every-field")
    task = record(server, "every-field")["task"]
    assert task["limits"]["deadline_seconds"] == 600 and task["limits"]["retries"] == 2
    assert task["model"] == "scripted:quick.json" and task["prompt"] == "With every field"
    # A ref goes with a repository; alone it is refused in the page.
    open_form(page)
    page.fill("#f-prompt", "A ref alone")
    page.fill("#f-ref", "main")
    page.click("#submit-form button[type=submit]")
    page.wait_for_selector("#f-ref[aria-invalid=true]")
