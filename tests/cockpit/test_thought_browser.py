"""The model's words in the cockpit, in Chromium against a real `dockyard dev`.

A scripted model whose first call is held open by a gate (a file the test
creates), so the "thinking… Ns" indicator is seen while the call is open and
gone after, whatever the machine's speed. The model's text carries markup that
must stay text; a usage event, as the model gateway publishes it, joins its
thought by response id and brings the cost.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from agent import contract
from tests.cockpit.test_cockpit_browser import ARTIFACTS, cockpit, scripted_model, submit_over_http, wait_until_ended

pytestmark = pytest.mark.xdist_group("cockpit")

MARKUP = '<img src=x onerror="window.__owned=1">'
FIRST_WORDS = f"{MARKUP}I'll plan first.\nThen do the work."
RESPONSE_ID = "chatcmpl-cockpit-1"


async def _publish_usage(nats_url: str, task_id: str, options: dict) -> None:
    """A usage event as the model gateway publishes it for the first call."""
    import nats

    nc = await nats.connect(nats_url, **options)
    try:
        usage = {
            "type": contract.EV_USAGE, "task_id": task_id, "ts": contract.iso_utc(), "provider": "openai", "model": "gpt-test",
            "api": "chat", "response_id": RESPONSE_ID, "input_tokens": 121, "output_tokens": 15, "cached_tokens": 0, "tokens": 136,
            "cost_usd": 0.0125, "latency_ms": 900, "status": 200, "stream": False,
        }  # fmt: skip
        await nc.jetstream().publish(contract.subject_events(task_id), json.dumps(usage).encode())
    finally:
        await nc.close()


def publish_usage(dev, task_id: str) -> None:
    # nats-py needs an event loop of its own: Playwright's sync API holds this thread's.
    worker = threading.Thread(target=asyncio.run, args=(_publish_usage(dev.nats_url, task_id, dev.nats_connect_options),))
    worker.start()
    worker.join(15)


def test_thoughts_show_inline_as_text_with_a_live_indicator_durations_and_totals(page, dev, scripts_dir):
    gate = scripts_dir / "thought-gate"
    turns = [
        {"content": FIRST_WORDS, "usage": {"input_tokens": 120, "output_tokens": 14}, "response_id": RESPONSE_ID, "gate": gate.name,
         "tool_calls": [{"name": "plan", "args": {"todos": ["say hi"], "objective": "Say hi"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": "echo hi", "timeout_seconds": 30}}]},
        {"content": "Said hi.", "usage": {"input_tokens": 300, "output_tokens": 5}},
        {"tool_calls": [{"name": "finish", "args": {"summary": "said hi"}}]},
    ]  # fmt: skip
    task_id = submit_over_http(dev, {"prompt": "Say hi", "model": scripted_model(scripts_dir / "thoughts.json", turns)})
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))

    # The first call is open: the indicator is there and counts the seconds.
    indicator = page.locator("#tv-trace .ev-thinking .thinking")
    indicator.wait_for()
    page.wait_for_function("() => /^thinking… [1-9][0-9]*s$/.test(document.querySelector('#tv-trace .thinking')?.textContent || '')")
    publish_usage(dev, task_id)  # the gateway's count of this call lands before its thought
    page.locator("#tv-trace .ev-usage").wait_for()
    gate.touch()
    wait_until_ended(page)
    page.wait_for_selector("#tv-outcome[data-outcome=done]")

    assert page.locator("#tv-trace .ev-thinking").count() == 4  # one per call, each with its SSE id...
    assert page.locator("#tv-trace .ev-thinking:visible").count() == 0  # ...and none is thinking any more
    thoughts = page.locator("#tv-trace .ev-thought")
    assert thoughts.count() == 4

    # Inline in its phase, as text: the markup is shown, never parsed, and its handler never ran.
    first = page.locator("#tv-trace section.phase-STRATEGIC .ev-thought").first
    assert first.locator(".thought-text").inner_text() == FIRST_WORDS
    assert page.locator("#tv-trace img").count() == 0
    assert page.evaluate("window.__owned") is None
    meta = first.locator(".thought-meta").inner_text()
    assert meta.startswith("STRATEGIC · ") and "120 in / 14 out" in meta and "1 tool call" in meta
    assert meta.endswith("· $0.0125")  # joined with the gateway's usage by response id
    tactical = page.locator("#tv-trace section.phase-TACTICAL .ev-thought")
    assert tactical.nth(0).locator(".thought-text").inner_text() == "(no text)"
    assert tactical.nth(1).locator(".thought-text").inner_text() == "Said hi."

    # Each phase says how long it ran; the totals are the gateway's where it spoke.
    tooks = page.locator("#tv-trace .phase-took").all_inner_texts()
    assert len(tooks) == 3 and all(took.endswith("s") for took in tooks), tooks
    totals = {key: page.locator(f"#tv-totals dd[data-total={key}]").inner_text() for key in ("turns", "tokens", "cost", "model-time", "task-time")}
    assert totals["turns"] == "4"
    assert totals["tokens"] == "121 in / 15 out (model gateway)"
    assert totals["cost"] == "$0.0125"
    assert totals["model-time"].endswith("s") and totals["task-time"].endswith("s")
    model_seconds = float(totals["model-time"].removesuffix("s")) if "m" not in totals["model-time"] else 60.0
    assert model_seconds >= 1.0  # the gated call was open at least until the indicator said 1s

    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "cockpit-thoughts.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # thoughts and totals wrap on a phone
    page.screenshot(path=str(ARTIFACTS / "cockpit-thoughts-phone.png"), full_page=True)


def test_without_a_gateway_the_totals_are_the_providers_counts_and_there_is_no_cost(page, dev, scripts_dir):
    turns = [
        {"content": "Planning.", "usage": {"input_tokens": 10, "output_tokens": 2},
         "tool_calls": [{"name": "plan", "args": {"todos": ["x"], "objective": "x"}}]},
        {"content": "Reported.", "usage": {"input_tokens": 20, "output_tokens": 3}},
        {"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]},
    ]  # fmt: skip
    task_id = submit_over_http(dev, {"prompt": "Count", "model": scripted_model(scripts_dir / "counted.json", turns)})
    page.goto(cockpit(dev, f"#/tasks/{task_id}"))
    wait_until_ended(page)
    assert page.locator("#tv-totals dd[data-total=tokens]").inner_text() == "30 in / 5 out (provider)"
    assert page.locator("#tv-totals dd[data-total=cost]").inner_text() == "—"
    assert page.locator("#tv-totals dd[data-total=turns]").inner_text() == "3"


# A TaskView of the page's own trace.js, fed events directly: the paths a live task reaches only by a crash.
FEED_JS = """async (events) => {
    const { TaskView } = await import('./trace.js');
    const root = document.createElement('section');
    for (const id of ['tv-title', 'tv-conn', 'tv-facts', 'tv-prompt', 'tv-outcome', 'tv-trace', 'tv-todo', 'tv-snapshots', 'tv-stored', 'tv-error', 'tv-totals']) {
        const el = document.createElement(id === 'tv-facts' || id === 'tv-totals' ? 'dl' : 'div');
        el.id = id;
        root.append(el);
    }
    root.id = 'fed';
    document.body.append(root);
    const view = new TaskView(root, 't-fed');
    window.fedView = view;
    events.forEach((data, i) => view.render(data.type, data, i + 1));
}"""


def test_a_call_cut_short_by_the_end_of_its_attempt_stops_thinking_and_its_replay_counts_once(page, dev):
    page.goto(cockpit(dev))
    page.wait_for_selector("#server-state[data-state=ok]")
    ago = contract.iso_utc(time.time() - 5)
    page.evaluate(FEED_JS, [
        {"type": "status", "state": "started", "ts": ago},
        {"type": "phase", "phase": "TACTICAL", "objective": "work", "ts": ago},
        {"type": "thought", "phase": "TACTICAL", "turn": 3, "open": True, "ts": ago},
    ])  # fmt: skip
    first = page.locator("#fed [data-id='3'] .thinking")
    assert first.inner_text().startswith("thinking… ")
    page.wait_for_function("() => /^thinking… ([5-9]|[1-9][0-9]+)s$/.test(document.querySelector(\"#fed [data-id='3'] .thinking\")?.textContent)")

    # The attempt ends with the call open (a killed pod), the next one replays the turn.
    page.evaluate("""(now) => {
        const v = window.fedView;
        v.render('status', {type: 'status', state: 'retrying', attempt: 2, ts: now}, 4);
        v.render('status', {type: 'status', state: 'resumed', ts: now}, 5);
        v.render('thought', {type: 'thought', phase: 'TACTICAL', turn: 3, open: true, ts: now}, 6);
        v.render('thought', {type: 'thought', phase: 'TACTICAL', turn: 3, text: 'again', latency_ms: 1200, tool_calls: 0,
                             usage: {input_tokens: 9, output_tokens: 1}, ts: now}, 7);
    }""", contract.iso_utc())
    cut = page.locator("#fed [data-id='3']")
    assert cut.is_visible() and cut.inner_text().endswith("this attempt ended during this model call")
    assert page.locator("#fed .thinking").count() == 0  # nothing ticks any more...
    assert page.locator("#fed [data-id='6']").is_hidden()  # ...the replay's call closed...
    assert page.locator("#fed [data-id='7'] .thought-text").inner_text() == "again"  # ...with its words
    assert page.locator("#fed dd[data-total=turns]").inner_text() == "1"
    assert page.locator("#fed dd[data-total=tokens]").inner_text() == "9 in / 1 out (provider)"
