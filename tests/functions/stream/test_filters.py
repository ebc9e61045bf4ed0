"""`?types=` and `?level=`: only what was asked is sent, live and replayed, and resuming anywhere stays exact."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agent import contract
from functions.core.registry import new_record
from functions.errors import BadInput
from functions.stream import feed
from functions.stream.filters import LEVELS, Filter, log_level
from tests.conftest import eventually_async
from tests.functions.stream.support import (
    AUTH,
    collect,
    collect_into,
    ev,
    finished,
    log_record,
    publish,
)

pytestmark = pytest.mark.timeout(120)


def test_a_filter_is_parsed_from_the_query_and_names_the_field_at_fault():
    assert Filter.from_query(None, None).everything
    only = Filter.from_query("phase, logs", "WARNING")
    assert (only.logs, only.events, only.min_level) == (True, frozenset({"phase"}), LEVELS["warning"])
    assert only.passes("phase", 0) and not only.passes("tool", 0)
    assert only.passes("log", LEVELS["error"]) and not only.passes("log", LEVELS["info"])
    assert Filter.from_query("events", None).events is None and not Filter.from_query("events", None).logs
    for types, level, field in (("phse", None, "types"), ("", None, "types"), (" , ", None, "types"), (None, "loud", "level")):
        with pytest.raises(BadInput) as caught:
            Filter.from_query(types, level)
        assert caught.value.field == field
    assert log_level({"level": "Debug"}) == LEVELS["debug"]
    assert log_level({"level": None}) == log_level({}) == log_level("text") == LEVELS["info"]


async def test_filters_send_only_what_was_asked_and_resume_exactly(bus, serve, monkeypatch):
    monkeypatch.setattr(feed, "MAX_FEED_FRAMES", 4)  # late readers catch up on their own consumer: both paths
    server = await serve()
    task = "t-filter"
    url = f"{server.url}/api/stream/{task}"
    bodies = [
        ev(task, contract.EV_STATUS, state=contract.STATE_STARTED),
        log_record(task, "d", "DEBUG"),
        log_record(task, "i", "INFO"),
        ev(task, contract.EV_PHASE, phase=contract.PHASE_STRATEGIC),
        log_record(task, "w", "WARNING"),
        ev(task, contract.EV_TOOL, name="execute", stage="start"),
        log_record(task, "e", "ERROR"),
        ev(task, contract.EV_TODO, todos=["x"]),
        {**log_record(task, "no level"), "level": None},
        ev(task, contract.EV_TOOL, name="execute", stage="end"),
        log_record(task, "c", "CRITICAL"),
    ]
    cases = {
        "types=events": lambda b: "type" in b,
        "types=logs": lambda b: "type" not in b,
        "types=phase,tool": lambda b: b.get("type") in ("phase", "tool"),
        "level=warning": lambda b: "type" in b or b["level"] in ("WARNING", "ERROR", "CRITICAL"),
        "types=logs,tool&level=ERROR": lambda b: b.get("type") == "tool" or b.get("level") in ("ERROR", "CRITICAL"),
        "types=todo,logs&level=info": lambda b: b.get("type") == "todo" or ("type" not in b and b["level"] != "DEBUG"),
    }
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=contract.iso_utc()))
    live = {query: [] for query in cases}
    followers = [asyncio.create_task(collect_into(f"{url}?{q}", into)) for q, into in live.items()]
    # Each filtered client starts with an empty stream (only heartbeats until something passes) on the shared feed.
    await eventually_async(lambda: server.feed(task) is not None and server.feed(task).waiting == len(cases), "every client waits on the feed")
    seqs = [await publish(bus.js, task, body) for body in bodies]
    seqs.append(await publish(bus.js, task, finished(task)))
    bodies.append(finished(task))
    await asyncio.wait_for(asyncio.gather(*followers), 30)

    for query, wanted in cases.items():
        expected = [seq for seq, body in zip(seqs, bodies, strict=True) if wanted(body)]
        assert [m.id for m in live[query]] == expected + [None], query  # `end` whatever the filter
        assert [m.id for m in await collect(f"{url}?{query}")] == expected + [None], query
        for after in seqs[:-1]:  # resuming anywhere, also where the next messages are filtered out
            resumed = await collect(f"{url}?{query}", after=after)
            assert [m.id for m in resumed] == [s for s in expected if s > after] + [None], (query, after)

    async with httpx.AsyncClient(headers=AUTH, base_url=server.url, timeout=5) as client:
        for query, field in (("types=phse", "types"), ("types=", "types"), ("level=loud", "level")):
            response = await client.get(f"/api/stream/{task}?{query}")
            assert (response.status_code, response.json()["field"]) == (400, field), query
        assert "phase" in (await client.get(f"/api/stream/{task}?types=phse")).json()["error"]
