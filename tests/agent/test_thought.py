"""The `thought` events of model turns: the scripted model in-process, real SQLite checkpoints, real tools."""

from __future__ import annotations

import threading

import pytest
from langchain_core.messages import AIMessage

from agent import contract
from agent.checkpoint import open_saver
from agent.graph import build_graph, initial_state
from agent.models import BudgetExhausted, ModelConfigError, ScriptedModel
from agent.redact import Redactor
from agent.thought import TEXT_LIMIT
from tests.agent.test_graph import Recorder, make_deps, run
from tests.conftest import eventually

TURNS = [
    {"content": "I'll list the files first.", "usage": {"input_tokens": 120, "output_tokens": 14}, "response_id": "chatcmpl-1",
     "tool_calls": [{"name": "plan", "args": {"todos": ["look"], "objective": "Look around"}}]},
    {"delay_seconds": 0.2, "tool_calls": [{"name": "list_dir", "args": {"path": "."}}, {"name": "list_dir", "args": {"path": "."}}]},
    {"content": "Nothing here yet.", "usage": {"input_tokens": 300, "output_tokens": 5}},
    {"tool_calls": [{"name": "finish", "args": {"summary": "looked"}}]},
]


def thoughts(recorder: Recorder) -> list[dict]:
    return [e for e in recorder.events if e["type"] == contract.EV_THOUGHT]


def run_all(tmp_path, turns, deps=None):
    if deps is None:
        deps, recorder = make_deps(tmp_path, turns)
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    return run(graph, {"configurable": {"thread_id": "t"}}, initial_state("p")), deps


def test_each_model_turn_opens_then_closes_a_thought_with_its_text_usage_and_phase(tmp_path):
    deps, recorder = make_deps(tmp_path, TURNS)
    values, _ = run_all(tmp_path, TURNS, deps)
    assert values["outcome"] == contract.OUTCOME_DONE
    events = thoughts(recorder)
    assert len(events) == 2 * len(TURNS)
    opens, closes = events[0::2], events[1::2]
    assert all(e == {"type": "thought", "phase": e["phase"], "turn": i, "open": True} for i, e in enumerate(opens))
    assert [e["turn"] for e in closes] == [0, 1, 2, 3]
    assert [e["phase"] for e in closes] == ["STRATEGIC", "TACTICAL", "TACTICAL", "STRATEGIC"]
    assert [e["text"] for e in closes] == ["I'll list the files first.", "", "Nothing here yet.", ""]
    assert [e["tool_calls"] for e in closes] == [1, 2, 0, 1]
    assert closes[0]["usage"] == {"input_tokens": 120, "output_tokens": 14, "total_tokens": 134}
    assert closes[0]["response_id"] == "chatcmpl-1"
    assert "response_id" not in closes[2] and closes[2]["usage"]["input_tokens"] == 300
    assert "usage" not in closes[1]  # no count is made up when the provider gave none
    assert closes[1]["latency_ms"] >= 200  # the scripted call's delay is inside the measured time
    assert all("open" not in e and "error" not in e for e in closes)


def test_a_thought_comes_after_its_turns_start_and_before_the_tool_calls_it_asked_for(tmp_path):
    deps, recorder = make_deps(tmp_path, TURNS)
    run_all(tmp_path, TURNS, deps)
    kinds = [(e["type"], e.get("open", e.get("stage"))) for e in recorder.events if e["type"] in (contract.EV_THOUGHT, contract.EV_TOOL)]
    # turn 1 (tactical) asks for two list_dir calls: they run after its thought closes
    second_close = [i for i, k in enumerate(kinds) if k == ("thought", None)][1]
    assert kinds[second_close - 1] == ("thought", True)
    assert kinds[second_close + 1: second_close + 5] == [("tool", "start"), ("tool", "end"), ("tool", "start"), ("tool", "end")]


def test_long_text_is_cut_with_a_marker(tmp_path):
    turns = [{"content": "x" * (TEXT_LIMIT + 123), "tool_calls": [{"name": "finish", "args": {"summary": "s"}}]}]
    deps, recorder = make_deps(tmp_path, turns)
    run_all(tmp_path, turns, deps)
    text = thoughts(recorder)[1]["text"]
    assert text == "x" * TEXT_LIMIT + "... [123 more chars]"


def test_a_secret_in_the_models_text_is_redacted_before_the_cut(tmp_path):
    secret = "my-known-secret-value-42"
    # The secret straddles the cut: cut first, its head would pass.
    turns = [{"content": "y" * (TEXT_LIMIT - 5) + secret, "tool_calls": [{"name": "finish", "args": {"summary": "s"}}]}]
    deps, recorder = make_deps(tmp_path, turns)
    recorder.redactor = Redactor(known_values=[secret])
    run_all(tmp_path, turns, deps)
    text = thoughts(recorder)[1]["text"]
    assert secret[:5] not in text and text.startswith("y" * (TEXT_LIMIT - 5) + "[RED")


def test_a_refused_call_closes_its_thought_with_the_error(tmp_path):
    deps, recorder = make_deps(tmp_path, TURNS)
    scripted = deps.model

    class Gateway:
        def invoke(self, phase, messages, tools, turn):
            if turn == 1:
                raise BudgetExhausted("the task's token budget is spent: limits.max_tokens = 100")
            return scripted.invoke(phase, messages, tools, turn)

    deps.model = Gateway()
    values, _ = run_all(tmp_path, TURNS, deps)
    assert values["outcome"] == contract.OUTCOME_BUDGET
    last = thoughts(recorder)[-1]
    assert last["turn"] == 1 and last["text"] == "" and "limits.max_tokens = 100" in last["error"]
    assert thoughts(recorder)[-2] == {"type": "thought", "phase": "TACTICAL", "turn": 1, "open": True}


class Crash(Exception):
    pass


def test_a_resumed_run_does_not_repeat_the_thoughts_of_finished_steps(tmp_path):
    """A crash inside turn 2's call: the first run closes it with the error; the resumed run starts at turn 2."""
    deps, first = make_deps(tmp_path, TURNS)
    scripted = deps.model
    crashed: list[int] = []

    class Flaky:
        def invoke(self, phase, messages, tools, turn):
            if turn == 2 and not crashed:
                crashed.append(turn)
                raise Crash("the pod went away")
            return scripted.invoke(phase, messages, tools, turn)

    deps.model = Flaky()
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    config = {"configurable": {"thread_id": "t"}}
    with pytest.raises(Crash):
        run(graph, config, initial_state("p"))
    assert [e["turn"] for e in thoughts(first) if not e.get("open")] == [0, 1, 2]
    assert "pod went away" in thoughts(first)[-1]["error"]

    second = Recorder()
    deps.reporter = second
    values = run(graph, config, None)  # resume from the checkpoint
    assert values["outcome"] == contract.OUTCOME_DONE
    assert [(e["turn"], e.get("open", False)) for e in thoughts(second)] == [(2, True), (2, False), (3, True), (3, False)]
    assert thoughts(second)[1]["text"] == "Nothing here yet."


def test_a_gated_scripted_turn_stays_open_until_its_file_exists(tmp_path):
    """The tests' way to hold a model call open (the cockpit's "thinking…" indicator) without a sleep deciding."""
    turns = [{"content": "held", "gate": "go", "tool_calls": [{"name": "finish", "args": {"summary": "s"}}]}]
    deps, recorder = make_deps(tmp_path, turns)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (run_all(tmp_path, turns, deps), done.set()))
    worker.start()
    eventually(lambda: thoughts(recorder), "the call to open")
    assert not done.wait(0.3) and len(thoughts(recorder)) == 1  # open, and not closed while the gate is shut
    (tmp_path / "go").touch()
    worker.join(30)
    assert done.is_set() and thoughts(recorder)[1]["text"] == "held"


def test_a_gate_that_is_a_path_is_refused(tmp_path):
    script = tmp_path / "s.json"
    script.write_text('[{"content": "x", "gate": "../../etc/passwd"}]')
    with pytest.raises(ModelConfigError, match="'gate' must be a bare file name"):
        ScriptedModel.load(script)


def test_a_reply_in_content_blocks_shows_its_text_blocks_only(tmp_path):
    """Anthropic's replies are lists of blocks: the thought (and the tactical report) is the text, not the list."""
    deps, recorder = make_deps(tmp_path, TURNS)
    scripted = deps.model

    class Blocks:
        def invoke(self, phase, messages, tools, turn):
            if turn != 2:
                return scripted.invoke(phase, messages, tools, turn)
            return AIMessage(
                content=[{"type": "text", "text": "Nothing here"}, {"type": "text", "text": " yet."}],
                usage_metadata={"input_tokens": 7, "output_tokens": 3, "total_tokens": 10,
                                "input_token_details": {"cache_read": 4}, "output_token_details": {"reasoning": 2}},
                response_metadata={"id": "msg_01"},
            )

    deps.model = Blocks()
    run_all(tmp_path, TURNS, deps)
    close = thoughts(recorder)[5]
    assert close["turn"] == 2 and close["text"] == "Nothing here yet." and close["response_id"] == "msg_01"
    assert close["usage"] == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10, "cached_tokens": 4, "reasoning_tokens": 2}
    reports = [e.get("report") for e in recorder.events if e["type"] == contract.EV_PHASE and e.get("report")]
    assert reports == ["Nothing here yet."]
