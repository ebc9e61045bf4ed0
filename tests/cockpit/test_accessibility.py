"""axe-core on the cockpit, in Chromium against a real `dockyard dev`: 0 violations, light and dark.

axe-core is the npm package pinned in tests/cockpit/package-lock.json (`npm ci --prefix tests/cockpit`,
run by ./scripts/install-test-packages), injected into the page as it is. It checks the page as it
stands: the list alone, a task still running (its trace live), a finished one and a failed one, each
with the colour scheme a person's system asks for (`prefers-color-scheme`), since contrast differs.
Every rule axe runs by default is checked (WCAG 2 A/AA and its best practices).
"""

from __future__ import annotations

import pytest

from agent import contract
from tests.cockpit.test_cockpit_browser import END_TIMEOUT_MS, cockpit, scripted_model, submit_over_http
from tests.cockpit.test_list_browser import HELD, finished, record
from tests.conftest import eventually

pytestmark = pytest.mark.xdist_group("cockpit")

SCHEMES = ("light", "dark")
FINISH_SECONDS = 120.0

# What axe found, one line a node: enough to find and fix it from the test's output.
VIOLATIONS_JS = """async () => {
    const results = await axe.run(document, {resultTypes: ['violations']});
    if (!results.passes.length) throw new Error('axe-core checked nothing');
    return results.violations.map(v => ({
        id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.map(n => `${n.target.join(' ')}: ${(n.failureSummary || '').replace(/\\s+/g, ' ')}`),
    }));
}"""


@pytest.fixture(scope="module")
def tasks(dev, scripts_dir):
    """A finished task, a failed one and one running until the module ends."""
    done = submit_over_http(dev, {"prompt": "Write fizzbuzz", "model": "scripted:example"})  # tool calls with output
    failed = submit_over_http(dev, {"prompt": "A model that is not there", "model": "scripted:no-such-script"})
    running = submit_over_http(dev, {"prompt": "Hold on", "model": scripted_model(scripts_dir / "a11y-held.json", HELD)})
    for task_id in (done, failed):
        eventually(lambda t=task_id: finished(dev, t), f"task {task_id} to finish", FINISH_SECONDS, interval=0.5)
    assert record(dev, failed)["outcome"] == contract.OUTCOME_FAILED
    yield {"done": done, "failed": failed, "running": running}
    (dev.data_dir / "tasks" / running / "home" / "release").touch()


def violations(page, axe_js) -> list[dict]:
    page.add_script_tag(path=str(axe_js))
    return page.evaluate(VIOLATIONS_JS)


def report(found: list[dict]) -> str:
    return "\n".join(f"{v['id']} ({v['impact']}): {v['help']}\n    " + "\n    ".join(v["nodes"]) for v in found)


def check(page, axe_js) -> None:
    found = violations(page, axe_js)
    print(report(found))  # shown with -s, and by pytest when the test fails
    assert not found, f"axe-core found {len(found)} violation(s):\n{report(found)}"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("size", [(1440, 900), (390, 844)], ids=["laptop", "phone"])
def test_the_task_list(page, dev, tasks, axe_js, scheme, size):
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.emulate_media(color_scheme=scheme)
    page.goto(cockpit(dev))
    page.locator(f"#task-list a[data-task-id='{tasks['failed']}'] .task-reason").wait_for()
    check(page, axe_js)
    page.click("#new-task-open")  # the form, unfolded, too
    page.wait_for_selector("#submit-form textarea[name=prompt]", state="visible")
    check(page, axe_js)
    # The form with a field marked faulty (aria-invalid, its message tied by aria-describedby).
    page.fill("#f-prompt", "Do it")
    page.fill("#f-model", "nosuch:model")
    page.click("#submit-form button[type=submit]")
    page.wait_for_selector("#f-model[aria-invalid=true]")
    check(page, axe_js)

    # The check can fail: an image without a text alternative is found.
    page.evaluate("document.querySelector('#main').append(Object.assign(document.createElement('img'), {src: 'data:,'}))")
    assert "image-alt" in [v["id"] for v in violations(page, axe_js)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("which", ["running", "done", "failed"])
def test_a_task(page, dev, tasks, axe_js, scheme, which):
    page.emulate_media(color_scheme=scheme)
    task_id = tasks[which]
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    if which == "running":
        page.wait_for_selector("#tv-conn[data-state=live]")
        page.wait_for_function("() => document.querySelector('#tv-todo')?.textContent.includes('wait')", timeout=END_TIMEOUT_MS)
    else:
        page.wait_for_selector("#tv-conn[data-state=ended]", timeout=END_TIMEOUT_MS)
        page.wait_for_selector(f"#tv-outcome[data-outcome={contract.OUTCOME_DONE if which == 'done' else contract.OUTCOME_FAILED}]")
    page.locator(f"#task-list a[data-task-id='{task_id}'][aria-current=page]").wait_for()
    page.evaluate("document.querySelectorAll('#tv-trace details').forEach(d => { d.open = true; })")  # every tool call, unfolded
    check(page, axe_js)


def focused(page) -> str:
    """The focused element, as a selector-like name: #id, or the task row's id."""
    return page.evaluate("""() => {
        const el = document.activeElement;
        if (el.dataset.taskId) return `row:${el.dataset.taskId}`;
        return el.id ? `#${el.id}` : el.tagName.toLowerCase() + (el.className ? `.${el.className}` : '');
    }""")


def test_the_keyboard_reaches_and_works_every_control_of_the_list(page, dev, tasks):
    page.goto(cockpit(dev))
    page.locator(f"#task-list a[data-task-id='{tasks['done']}']").wait_for()
    page.keyboard.press("Tab")
    assert focused(page) == "a.skip-link"
    assert page.locator(".skip-link").bounding_box()["y"] >= 0  # shown once focused
    page.keyboard.press("Enter")
    assert focused(page) == "#main" and page.url.endswith("/")  # the main content, and no route change

    page.reload()
    page.locator(f"#task-list a[data-task-id='{tasks['done']}']").wait_for()
    seen = []
    for _ in range(200):  # Tab through the whole page once, from its start until the focus leaves it
        page.keyboard.press("Tab")
        seen.append(focused(page))
        if seen[-1] == "body":
            break
    wanted = ["#new-task-open", "#filter-text", "#filter-state", "#filter-outcome", "#task-scroll", f"row:{tasks['done']}", "summary"]
    assert all(w in seen for w in wanted), (wanted, seen)
    assert [seen.index(w) for w in wanted] == sorted(seen.index(w) for w in wanted)  # in reading order

    # A focused row shows it; Enter opens it.
    page.focus(f"#task-list a[data-task-id='{tasks['done']}']")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/#/tasks/{tasks['done']}")
    # "New task" unfolds the form and puts the cursor in the prompt; the filters work from the keyboard.
    page.focus("#new-task-open")
    page.keyboard.press("Enter")
    assert focused(page) == "#f-prompt" and page.get_attribute("#new-task-open", "aria-expanded") == "true"
    page.focus("#filter-outcome")
    page.keyboard.press("ArrowDown")  # Chromium: the next option, without opening the list
    assert page.evaluate("document.querySelector('#filter-outcome').value") == contract.OUTCOME_DONE
