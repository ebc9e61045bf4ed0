"""The task view in Chromium against a real `dockyard dev`: where it opens, following, folds, filters,
tool output, the outcome banner, stop snapshots, retry and fork, accessibility, screenshots.

Traces a scripted model cannot easily produce (hundreds of calls, a failed clone's outcome, a task
stopped and resumed) are published on the task's events subject of dev's real NATS, shaped
exactly like the agent's (tests/cockpit/synthetic.py); the stream app serves them as it serves
an agent's. Waits are on conditions in the page, never on time.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from agent import contract
from tests.cockpit import synthetic
from tests.cockpit.conftest import find_axe
from tests.cockpit.test_cockpit_browser import ARTIFACTS, EXAMPLE_PROMPT, cockpit, submit_over_http, wait_until_ended
from tests.conftest import eventually

pytestmark = pytest.mark.xdist_group("cockpit")

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
REASON = "git clone failed: repository not found"
TRACEBACK = 'Traceback (most recent call last):\n  File "agent/workspace.py", line 88, in clone\nGitError: repository not found'
ROWS_JS = "() => document.querySelectorAll('#tv-trace [data-id]').length"


def new_task_id() -> str:
    return f"t-tv-{uuid.uuid4().hex[:12]}"


def open_task(page, dev, task_id: str) -> None:
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    page.wait_for_selector("#task-view:not([hidden])")


def wait_rows(page, n: int) -> None:
    page.wait_for_function(f"() => ({ROWS_JS})() >= {n}", timeout=60_000)


def failed_clone(task_id: str, calls: int = 60) -> list[dict]:
    """A task that ran some calls, then failed for good, with every field of contract C."""
    events = synthetic.long_trace(task_id, calls, errors_every=9)
    events.append(
        synthetic.status(
            task_id, contract.STATE_FINISHED, outcome=contract.OUTCOME_FAILED, reason=REASON, failure_class="fatal", detail=TRACEBACK,
            attempts=1, deadline_seconds=25, queued_seconds=21.0, started_at=synthetic.ts(-4), finished_at=synthetic.ts(),
        )
    )  # fmt: skip
    return events


def axe_violations(page) -> list[dict]:
    """axe-core's violations inside the task view (the rest of the page is the shell's)."""
    path = find_axe()
    if not page.evaluate("() => Boolean(window.axe)"):
        page.add_script_tag(path=str(path))
    found = page.evaluate("async () => (await axe.run('#task-view', {resultTypes: ['violations']})).violations")
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]} for v in found]


def assert_accessible(page, what: str) -> None:
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        violations = axe_violations(page)
        assert violations == [], f"axe-core on the {what} task view ({scheme}): {json.dumps(violations, indent=1)}"
    page.emulate_media(color_scheme="light")


def screenshots(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        page.evaluate("window.scrollTo(0, 0)")
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"], f"{name} sticks out at {size}"
        page.screenshot(path=str(ARTIFACTS / f"task-view-{name}-{label}.png"))
    page.set_viewport_size(DESKTOP)


def test_a_failed_task_opens_at_its_top_with_the_reason_in_words(page, dev):
    page.set_viewport_size(DESKTOP)
    task_id = new_task_id()
    events = failed_clone(task_id)
    synthetic.publish(dev, task_id, events)
    open_task(page, dev, task_id)
    wait_until_ended(page)
    wait_rows(page, len(events))

    assert page.evaluate("document.documentElement.scrollHeight") > 3 * DESKTOP["height"]  # a long trace...
    assert page.evaluate("window.scrollY") == 0  # ...and the view is at its top
    banner = page.locator("#tv-outcome")
    box = banner.bounding_box()
    assert box and box["y"] + box["height"] < DESKTOP["height"]  # the outcome is in view
    assert banner.get_attribute("data-outcome") == "failed"
    assert banner.locator(".outcome-reason").inner_text() == REASON
    assert "fatal" in banner.locator(".outcome-class").inner_text()
    facts = {k: banner.locator(f"dd[data-fact={k}]").inner_text() for k in ("attempts", "ran", "queued")}
    assert facts["attempts"] == "1"
    assert facts["ran"].endswith("of a 25.0s deadline"), facts
    assert facts["queued"] == "21.0s"  # the queue time is its own fact
    details = banner.locator("details.outcome-detail")
    assert not details.evaluate("d => d.open")  # the traceback is folded...
    details.locator("summary").focus()
    page.keyboard.press("Enter")  # ...and opens by keyboard
    assert details.locator("pre").inner_text() == TRACEBACK
    assert "null" not in banner.inner_text()

    # A finished task: durations, not a growing age; retry and fork, no live controls.
    page.locator("#tv-facts dt", has_text="took").wait_for()
    assert page.locator("#tv-done-controls").is_visible()
    assert page.is_disabled("#tv-cancel") and page.is_disabled("#tv-message-form button")
    assert page.locator("#tv-follow").is_hidden()

    assert_accessible(page, "failed")
    screenshots(page, "failed")


def test_an_outcome_without_a_reason_or_summary_is_said_in_words_never_null(page, dev):
    task_id = new_task_id()
    events = [
        synthetic.status(task_id, contract.STATE_STARTED),
        {"type": contract.EV_RESULT, "task_id": task_id, "ts": synthetic.ts(), "outcome": "done", "summary": None},
        synthetic.status(task_id, contract.STATE_FINISHED, outcome="done", reason=None, summary="null"),
    ]
    synthetic.publish(dev, task_id, events)
    open_task(page, dev, task_id)
    wait_until_ended(page)
    banner = page.locator("#tv-outcome[data-outcome=done]")
    banner.wait_for()
    assert banner.locator(".outcome-reason").inner_text() == "The agent finished and gave no summary."
    assert "null" not in banner.inner_text().lower()
    assert "null" not in page.locator("#tv-trace").inner_text().lower()


def test_live_updates_while_scrolled_up_never_move_the_view_and_folds_stay_folded(page, dev):
    page.set_viewport_size(DESKTOP)
    task_id = new_task_id()
    first = synthetic.long_trace(task_id, 80)
    synthetic.publish(dev, task_id, first)
    open_task(page, dev, task_id)
    page.wait_for_selector("#tv-conn[data-state=live]")
    wait_rows(page, len(first))
    assert page.evaluate("window.scrollY") == 0  # a running task opens at its top too
    assert page.locator("#tv-follow").is_visible()  # ...and offers to follow
    assert page.locator("#tv-done-controls").is_hidden() and page.is_enabled("#tv-cancel")

    # Fold the first phase by keyboard; each phase says its call count and duration.
    fold = page.locator("#tv-trace section.phase details.phase-fold").first
    assert fold.locator(".phase-calls").inner_text() == "20 calls"
    fold.locator(":scope > summary").focus()
    page.keyboard.press("Enter")
    assert not fold.evaluate("d => d.open")

    # Scrolled up (not at the bottom): 50 more events land and the view stays where it was.
    page.evaluate("window.scrollTo(0, 600)")
    page.wait_for_function("() => window.scrollY === 600")
    # The first row in view below the top bar: the one a reader's eyes are on.
    anchor = page.evaluate("""() => {
      const el = [...document.querySelectorAll('#tv-trace [data-id]')].find(r => r.getBoundingClientRect().top > 150 && r.checkVisibility());
      return [el.dataset.id, el.getBoundingClientRect().top];
    }""")
    more = [e for n in range(80, 105) for e in synthetic.tool_call(task_id, n)]
    assert len(more) == 50
    synthetic.publish(dev, task_id, more)
    wait_rows(page, len(first) + 50)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")  # any scroll asked for has happened
    assert page.evaluate("window.scrollY") == 600
    again = page.evaluate(f"() => document.querySelector(\"#tv-trace [data-id='{anchor[0]}']\").getBoundingClientRect().top")
    assert again == anchor[1]
    assert not fold.evaluate("d => d.open")  # the fold survived the live updates

    # At the bottom (the person's own End key), the view follows the live end.
    page.locator("body").press("End")
    page.wait_for_function("() => window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 2")
    page.wait_for_selector("#tv-follow", state="hidden")
    synthetic.publish(dev, task_id, [e for n in range(105, 115) for e in synthetic.tool_call(task_id, n)])
    wait_rows(page, len(first) + 70)
    page.wait_for_function("() => window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 2")

    # A filter applies to rows arriving live too.
    page.select_option("#tv-filter-status", "error")
    synthetic.publish(dev, task_id, [*synthetic.tool_call(task_id, 500, ok=False), *synthetic.tool_call(task_id, 501)])
    wait_rows(page, len(first) + 74)
    shown = "() => [...document.querySelectorAll('#tv-trace details.tool')].filter(d => d.checkVisibility()).map(d => d.dataset.call)"
    assert page.evaluate(shown) == ["call_00500"]
    page.select_option("#tv-filter-status", "")

    page.evaluate("window.scrollTo(0, 0)")
    assert_accessible(page, "running")
    screenshots(page, "running")
    synthetic.publish(dev, task_id, [synthetic.status(task_id, contract.STATE_FINISHED, outcome="cancelled", reason="test over")])
    wait_until_ended(page)


def test_filter_by_tool_and_status_search_and_jump_to_the_first_error(page, dev):
    task_id = new_task_id()
    events = synthetic.long_trace(task_id, 40, errors_every=13)
    events += synthetic.tool_call(task_id, 900, name="read_file")
    events.append(synthetic.status(task_id, contract.STATE_FINISHED, outcome="done", summary="ok"))
    synthetic.publish(dev, task_id, events)
    open_task(page, dev, task_id)
    wait_until_ended(page)
    wait_rows(page, len(events))
    visible_calls = "() => [...document.querySelectorAll('#tv-trace details.tool')].filter(d => d.checkVisibility()).map(d => d.dataset.call)"

    page.select_option("#tv-filter-tool", "read_file")
    assert page.evaluate(visible_calls) == ["call_00900"]
    page.select_option("#tv-filter-tool", "")
    page.select_option("#tv-filter-status", "error")
    assert page.evaluate(visible_calls) == ["call_00012", "call_00025", "call_00038"]
    assert page.inner_text("#tv-filter-count") == "3 of 43 rows match"  # 41 calls and 2 status rows
    page.select_option("#tv-filter-status", "")
    page.fill("#tv-search", "make step-21")
    page.wait_for_function(f"() => ({visible_calls})().length === 1")
    assert page.evaluate(visible_calls) == ["call_00021"]
    page.fill("#tv-search", "")
    page.wait_for_function(f"() => ({visible_calls})().length === 41")

    # Fold everything, then jump: the first failed call opens, with its phase, and has the focus.
    page.click("#tv-fold-all")
    assert page.evaluate("() => [...document.querySelectorAll('#tv-trace details.phase-fold')].every(d => !d.open)")
    page.focus("#tv-jump-error")
    page.keyboard.press("Enter")
    target = page.locator("#tv-trace details.tool[data-call=call_00012]")
    assert target.evaluate("d => d.open && d.closest('details.phase-fold').open")
    assert page.evaluate("document.activeElement === document.querySelector('#tv-trace details.tool[data-call=call_00012] > summary')")
    assert target.is_visible() and target.locator(".tool-result.error").is_visible()


def test_tool_output_shows_head_tail_the_cut_a_full_output_link_and_copies_by_keyboard(page, dev):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    task_id = new_task_id()
    head, tail = "Building…\n" * 20, "FAILED test_x: assert 1 == 2\n"
    total = 600_000
    big = synthetic.tool_call(task_id, 1, ok=False)
    big[1].update(output_head=head, output_tail=tail, output_bytes=total, result=head[:2000])
    old = synthetic.tool_call(task_id, 2)
    for key in ("output_head", "output_tail", "output_bytes", "output_file"):
        old[1].pop(key)  # an agent from before contract A: `result` only
    old[1]["result"] = "exit code 0\nold-style output"
    events = [synthetic.status(task_id, contract.STATE_STARTED), synthetic.phase(task_id, "TACTICAL"), *big, *old]
    events.append(synthetic.status(task_id, contract.STATE_FINISHED, outcome="done", summary="ok"))
    synthetic.publish(dev, task_id, events)
    open_task(page, dev, task_id)
    wait_until_ended(page)

    call = page.locator("#tv-trace details.tool[data-call=call_00001]")
    call.locator("summary").focus()
    page.keyboard.press("Enter")
    assert call.locator("pre.out-head").inner_text() == head.rstrip("\n") or call.locator("pre.out-head").inner_text() == head
    assert call.locator("pre.out-tail").inner_text().strip() == tail.strip()
    cut = total - len(head.encode()) - len(tail.encode())
    assert call.locator(".out-cut").inner_text() == f"… {cut:,} bytes cut …"
    link = call.locator("a.full-output")
    assert link.get_attribute("href") == f"api/tasks/{task_id}/outputs/call_00001"
    assert call.locator("pre.out-head").get_attribute("tabindex") == "0"  # a scrollable <pre> is reachable by keyboard

    call.locator("button.copy", has_text="copy command").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("navigator.clipboard.readText()") == "make step-1"
    call.locator("button.copy", has_text="copy result").focus()
    page.keyboard.press("Space")
    assert page.evaluate("navigator.clipboard.readText()") == f"{head}\n{tail}"

    plain = page.locator("#tv-trace details.tool[data-call=call_00002]")
    plain.locator("summary").click()
    assert plain.locator("pre.out-head").inner_text() == "exit code 0\nold-style output"
    assert plain.locator(".out-cut").count() == 0 and plain.locator("a.full-output").count() == 0


def test_a_snapshot_taken_at_a_stop_is_not_final_when_the_task_resumed(page, dev):
    task_id = new_task_id()

    def stop_snapshot(n: int) -> dict:
        return {"type": contract.EV_SNAPSHOT, "task_id": task_id, "ts": synthetic.ts(), "key": f"jobs/{task_id}/checkpoints/2026120{n}T000000.000000Z.db",
                "size": 4096, "uploaded": True, "final": True, "archive_key": contract.final_archive_key(task_id), "archive_size": 2048}  # fmt: skip

    synthetic.publish(dev, task_id, [synthetic.status(task_id, contract.STATE_STARTED), stop_snapshot(1), synthetic.status(task_id, contract.STATE_INTERRUPTED)])
    open_task(page, dev, task_id)
    tags = page.locator("#tv-snapshots .tag")
    tags.first.wait_for()
    assert tags.all_inner_texts() == ["at stop"]  # SIGTERM: the task may go on

    synthetic.publish(dev, task_id, [synthetic.status(task_id, contract.STATE_RESUMED), stop_snapshot(2), synthetic.status(task_id, contract.STATE_FINISHED, outcome="done", summary="ok")])
    wait_until_ended(page)
    assert tags.all_inner_texts() == ["at stop", "final"]
    assert [t.strip() for t in page.locator("#tv-trace .ev-snapshot .tag").all_inner_texts()] == ["at stop", "final"]
    link = page.locator("#tv-snapshots a").first
    assert link.get_attribute("href") == f"api/tasks/{task_id}/workspace.tar.gz"


def test_retry_and_fork_post_the_lineage_event_and_downloads_are_links(page, dev):
    task_id = submit_over_http(dev, {"prompt": EXAMPLE_PROMPT, "model": "scripted:example"})
    open_task(page, dev, task_id)
    wait_until_ended(page)
    page.wait_for_selector("#tv-done-controls:not([hidden])")
    assert page.is_disabled("#tv-cancel")
    # A done task is told by its summary, not by the Job's word for it (the record's reason, "CompletionsReached").
    record = lambda: httpx.get(f"{dev.url}/api/tasks/{task_id}", headers=dev.headers).json()  # noqa: E731
    summary = eventually(lambda: record().get("summary"), "the record's summary (job_finished)", 45, interval=0.2)
    page.wait_for_function("(s) => document.querySelector('#tv-outcome .outcome-reason')?.textContent === s", arg=summary)

    # The artifacts and the stored keys download through the stream app's routes.
    page.wait_for_selector("#tv-artifacts a", timeout=45_000)
    hrefs = page.eval_on_selector_all("#tv-artifacts a", "els => els.map(a => a.getAttribute('href'))")
    assert hrefs == [f"api/tasks/{task_id}/{name}" for name in ("changes.patch", "changes.json", "workspace.tar.gz", "result.json")]
    assert page.get_attribute(f"#tv-stored a:has(code:text-is('{contract.final_archive_key(task_id)}'))", "href") == f"api/tasks/{task_id}/workspace.tar.gz"
    assert_accessible(page, "finished")
    screenshots(page, "finished")

    # Retry, by keyboard: the same task again from a fresh workspace (contract D).
    page.focus("#tv-retry")
    with page.expect_request(lambda r: r.method == "POST" and r.url.rstrip("/") == dev.url) as posted:
        page.keyboard.press("Enter")
    event = json.loads(posted.value.post_data)
    assert event["type"] == contract.EVENT_TASK_SUBMITTED
    assert event["data"] == {"from": {"task_id": task_id, "workspace": "fresh"}}
    settle_submission(page, posted.value, task_id, "retry")

    # Fork: a dialog asks for a prompt (and offers the snapshots); the event carries both.
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    page.wait_for_selector("#tv-done-controls:not([hidden])")
    page.focus("#tv-fork")
    page.keyboard.press("Enter")
    page.wait_for_selector("#tv-fork-dialog[open]")
    assert page.evaluate("document.activeElement.name") == "prompt"
    assert_accessible(page, "fork dialog of the finished")
    page.focus("#tv-fork-form textarea[name=prompt]")
    page.keyboard.type("Now add a README")
    snapshot = page.eval_on_selector_all("#tv-fork-form select[name=snapshot] option", "os => os.map(o => o.value).filter(Boolean)")
    chosen = snapshot[0] if snapshot else ""
    if chosen:
        page.select_option("#tv-fork-form select[name=snapshot]", chosen)
    with page.expect_request(lambda r: r.method == "POST" and r.url.rstrip("/") == dev.url) as posted:
        page.click("#tv-fork-form button[type=submit]")
    data = json.loads(posted.value.post_data)["data"]
    assert data == {"from": {"task_id": task_id, **({"snapshot": chosen} if chosen else {})}, "prompt": "Now add a README"}
    settle_submission(page, posted.value, task_id, "fork")


def settle_submission(page, request, parent: str, op: str) -> None:
    """Accepted (202): the page goes to the new task, which links back to its parent and runs to its end."""
    response = request.response()
    assert response.status == 202, response.text()
    page.wait_for_function(f"() => location.hash.startsWith('#/tasks/') && !location.hash.endsWith('/{parent}')")
    label = "retry of" if op == "retry" else "forked from"
    page.wait_for_selector(f"#tv-facts div:has(dt:text-is('{label}')) a[href='#/tasks/{parent}']", timeout=45_000)
    wait_until_ended(page)
    page.wait_for_selector("#tv-outcome.outcome-done:not([hidden])", timeout=90_000)
