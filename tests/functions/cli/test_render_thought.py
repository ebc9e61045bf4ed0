"""Thought lines and the trace's totals in the terminal: `render`, `Renderer`, and `dockyard logs` over real HTTP."""

from __future__ import annotations

import pytest

from agent import contract
from functions.cli import main as cli
from functions.cli import render
from functions.cli.sse_client import SSEMessage


def thought(turn: int, text: str = "", **fields) -> dict:
    return {"type": contract.EV_THOUGHT, "phase": "TACTICAL", "turn": turn, "text": text, "latency_ms": 1500, "tool_calls": 0, **fields}


@pytest.mark.parametrize(
    "data, text",
    [
        (thought(1, "I'll build the module first,\nthen its tests.", usage={"input_tokens": 120, "output_tokens": 14}, tool_calls=2),
         "~ I'll build the module first, [...] (1.5s, 120 in / 14 out, 2 tool calls)"),
        (thought(2, "", tool_calls=1), "~ (no text) (1.5s, 1 tool call)"),
        (thought(3, "\n\n  Done.  \n"), "~ Done. (1.5s)"),
        (thought(4, "", error="the task's token budget is spent"), "! model call failed after 1.5s: the task's token budget is spent"),
        (thought(5, "x", latency_ms="soon", usage={"input_tokens": -1}), "~ x (0.0s, 0 in / 0 out)"),  # nonsense counts count as 0
    ],
)
def test_a_closed_thought_is_one_line_with_its_time_and_tokens(data, text):
    assert render.render(contract.EV_THOUGHT, data) == text


def test_the_start_of_a_model_call_prints_nothing_and_escape_sequences_never_reach_the_terminal():
    assert render.render(contract.EV_THOUGHT, {"type": "thought", "phase": "TACTICAL", "turn": 0, "open": True}) is None
    line = render.render(contract.EV_THOUGHT, thought(0, "\x1b]0;owned\x07plain \x1b[2Jtext"))
    assert "\x1b" not in line and "\x07" not in line and "plain" in line


def message(seq: int, data: dict) -> SSEMessage:
    return SSEMessage(event=data.get("type", "event"), data=data, id=seq)


def feed(renderer: render.Renderer, events: list[dict]) -> list[str]:
    lines = [renderer.render_message(message(i, e)) for i, e in enumerate(events, 1)]
    lines.append(renderer.render_message(SSEMessage(event="end", data={}, id=None)))
    return "\n".join(line for line in lines if line is not None).splitlines()


STARTED = {"type": "status", "state": "started", "ts": "2030-01-01T00:00:00.000Z"}
FINISHED = {"type": "status", "state": "finished", "outcome": "done", "ts": "2030-01-01T00:01:05.500Z"}


def test_totals_from_the_providers_counts_when_no_gateway_spoke_and_a_replayed_turn_counts_once():
    events = [
        STARTED,
        {"type": "thought", "turn": 0, "open": True},
        thought(0, "plan", usage={"input_tokens": 100, "output_tokens": 10}),
        thought(1, "", error="the pod went away"),  # the turn's first try, cut short...
        thought(1, "work", usage={"input_tokens": 200, "output_tokens": 20}, latency_ms=2500),  # ...and its replay
        FINISHED,
    ]
    lines = feed(render.Renderer(), events)
    assert lines[-2:] == ["-- totals: 2 model turns in 4.0s, 300 in / 30 out tokens (provider), task took 1m 06s", "-- end of stream"]


def test_totals_prefer_the_gateways_counts_and_cost():
    events = [
        STARTED,
        thought(0, "plan", usage={"input_tokens": 100, "output_tokens": 10}, response_id="msg_1"),
        {"type": "usage", "model": "m", "response_id": "msg_1", "input_tokens": 101, "output_tokens": 11, "cost_usd": 0.0125},
        {"type": "usage", "refused": "limits.max_tokens = 10", "status": 402},  # a refused call costs nothing
        thought(1, "", error="refused"),
        {"type": "usage", "model": "m", "input_tokens": 50, "output_tokens": 5, "cost_usd": 0.0025},
    ]
    lines = feed(render.Renderer(), events)
    assert lines[-2] == "-- totals: 2 model turns in 3.0s, 151 in / 16 out tokens (model gateway), $0.0150"


def test_a_trace_without_model_turns_has_no_totals_line():
    assert feed(render.Renderer(), [STARTED, FINISHED])[-1] == "-- end of stream"
    assert not any("totals" in line for line in feed(render.Renderer(), [STARTED, FINISHED]))


def test_dockyard_logs_prints_thoughts_and_the_totals_at_the_end(server, capsys):
    for data in [
        STARTED,
        {"type": "thought", "phase": "STRATEGIC", "turn": 0, "open": True},
        {**thought(0, "I'll build the module first.", usage={"input_tokens": 120, "output_tokens": 14}, tool_calls=1), "phase": "STRATEGIC"},
        {"type": "phase", "phase": "TACTICAL", "objective": "write it"},
        FINISHED,
    ]:
        server.add_event(data["type"], data)
    server.end()
    assert cli.main(["logs", "t-1", "--url", server.url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "-- started",
        "~ I'll build the module first. (1.5s, 120 in / 14 out, 1 tool call)",
        "== TACTICAL == write it",
        "-- finished: done",
        "-- totals: 1 model turn in 1.5s, 120 in / 14 out tokens (provider), task took 1m 06s",
        "-- end of stream",
    ]
