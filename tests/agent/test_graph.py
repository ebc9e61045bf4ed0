"""The state machine in-process: real SQLite checkpoints, scripted model, real tools."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent import contract
from agent.checkpoint import checkpoint_count, open_saver, prune
from agent.graph import Budgets, Deps, Inbox, build_graph, initial_state
from agent.models import ModelConfigError, ScriptedModel, load_model
from agent.tools import WorkTools


class Recorder:
    def __init__(self):
        self.events: list[dict] = []

    def event(self, type: str, **fields) -> None:
        self.events.append({"type": type, **fields})


def make_deps(tmp_path: Path, turns: list[dict], budgets: Budgets | None = None) -> tuple[Deps, Recorder]:
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    script = tmp_path / "turns.yaml"
    script.write_text(yaml.safe_dump(turns))
    recorder = Recorder()
    deps = Deps(
        model=ScriptedModel.load(script),
        tools=WorkTools(workspace, tmp_path / "home"),
        reporter=recorder,
        inbox=Inbox(workspace / ".dockyard" / "inbox.jsonl"),
        budgets=budgets or Budgets(),
    )
    return deps, recorder


def run(graph, config, state=None):
    for _ in graph.stream(state, config, durability="sync", stream_mode="updates"):
        pass
    return graph.get_state(config).values


def test_example_task_alternates_phases_and_finishes(tmp_path):
    deps, recorder = make_deps(tmp_path, yaml.safe_load((Path("agent/examples/example_turns.yaml")).read_text()))
    saver = open_saver(tmp_path / "ws" / contract.checkpoint_path("t1"))
    graph = build_graph(deps, checkpointer=saver)
    config = {"configurable": {"thread_id": "t1"}, "recursion_limit": 1000}
    values = run(graph, config, initial_state("fizzbuzz"))

    assert values["outcome"] == contract.OUTCOME_DONE
    assert "unittest passes" in values["summary"]
    phases = [e["phase"] for e in recorder.events if e["type"] == contract.EV_PHASE]
    assert phases == ["TACTICAL", "STRATEGIC", "TACTICAL", "STRATEGIC"]
    tool_ends = [e for e in recorder.events if e["type"] == contract.EV_TOOL and e["stage"] == "end"]
    assert [e["name"] for e in tool_ends] == ["write_file", "write_file", "list_dir", "execute"]
    assert all(e["ok"] for e in tool_ends), tool_ends
    assert (tmp_path / "ws" / "fizzbuzz.py").exists()
    assert values["model_turns"] == 8 and values["tool_calls"] == 4


def test_failed_tool_call_is_seen_by_the_model_not_a_crash(tmp_path):
    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["x"], "objective": "escape"}}]},
        {"tool_calls": [{"name": "read_file", "args": {"path": "../../etc/passwd"}}, {"name": "execute", "args": {"command": "exit 7"}}]},
        {"content": "could not"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "gave up"}}]},
    ]
    deps, recorder = make_deps(tmp_path, turns)
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    values = run(graph, {"configurable": {"thread_id": "t"}}, initial_state("p"))
    ends = [e for e in recorder.events if e["type"] == contract.EV_TOOL and e["stage"] == "end"]
    assert [e["ok"] for e in ends] == [False, False]
    assert "7" in ends[1]["result"]
    assert values["outcome"] == contract.OUTCOME_DONE


def test_strategic_budget_ends_with_a_clear_outcome(tmp_path):
    turns = [{"content": "thinking, no control tool"}] * 5
    deps, _ = make_deps(tmp_path, turns, Budgets(max_strategic_rounds=3, max_tool_calls=5))
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    values = run(graph, {"configurable": {"thread_id": "t"}}, initial_state("p"))
    assert values["outcome"] == contract.OUTCOME_BUDGET
    assert values["strategic_rounds"] == 3
    assert "3 strategic rounds" in values["summary"]


@pytest.mark.parametrize("refused_turn", [0, 1, 3])  # strategic, tactical, tactical after a tool call
def test_a_gateway_budget_refusal_ends_the_run_with_budget_exhausted_naming_the_limit(tmp_path, refused_turn):
    from agent.models import BudgetExhausted

    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["a"], "objective": "work"}}]},
        {"tool_calls": [{"name": "list_dir", "args": {"path": "."}}]},
        {"tool_calls": [{"name": "list_dir", "args": {"path": "."}}]},
        {"content": "never reached"},
    ]
    deps, _ = make_deps(tmp_path, turns)
    scripted = deps.model

    class Gateway:
        def invoke(self, phase, messages, tools, turn):
            if turn >= refused_turn:
                raise BudgetExhausted("the task's token budget is spent: limits.max_tokens = 100, 120 tokens used")
            return scripted.invoke(phase, messages, tools, turn)

    deps.model = Gateway()
    values = run(build_graph(deps, checkpointer=open_saver(tmp_path / "c.db")), {"configurable": {"thread_id": "t"}}, initial_state("p"))
    assert values["outcome"] == contract.OUTCOME_BUDGET
    assert values["summary"] == "stopped: the task's token budget is spent: limits.max_tokens = 100, 120 tokens used"
    assert values["model_turns"] == refused_turn


def test_tool_budget_returns_to_strategic_phase(tmp_path):
    call = {"tool_calls": [{"name": "list_dir", "args": {"path": "."}}]}
    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["a"], "objective": "loop"}}]},
        call, call, call,
        {"tool_calls": [{"name": "finish", "args": {"summary": "stopped looping"}}]},
    ]
    deps, recorder = make_deps(tmp_path, turns, Budgets(max_strategic_rounds=5, max_tool_calls=2))
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    values = run(graph, {"configurable": {"thread_id": "t"}}, initial_state("p"))
    reports = [e.get("report", "") for e in recorder.events if e["type"] == contract.EV_PHASE and e["phase"] == "STRATEGIC"]
    assert any("budget of 2 tool calls" in r for r in reports)
    assert values["tool_calls"] == 2 and values["outcome"] == contract.OUTCOME_DONE


def test_human_message_reaches_the_next_strategic_phase(tmp_path):
    turns = [
        {"tool_calls": [{"name": "plan", "args": {"todos": ["a"], "objective": "o"}}]},
        {"content": "report"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]},
    ]
    deps, _ = make_deps(tmp_path, turns)
    deps.inbox.append("please also add docs")
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    values = run(graph, {"configurable": {"thread_id": "t"}}, initial_state("p"))
    texts = [row.message.content for row in deps.transcript.all() if row.conversation == "strategic"]
    assert texts.count("Message from a human: please also add docs") == 1
    assert values["inbox_seen"] == 1


def test_script_exhausted_is_a_config_error(tmp_path):
    deps, _ = make_deps(tmp_path, [{"content": "no control tool"}])
    graph = build_graph(deps, checkpointer=open_saver(tmp_path / "c.db"))
    with pytest.raises(ModelConfigError, match="has 1 turns"):
        run(graph, {"configurable": {"thread_id": "t"}}, initial_state("p"))


def test_prune_keeps_the_newest_checkpoints_and_resume_still_works(tmp_path):
    turns = [{"tool_calls": [{"name": "plan", "args": {"todos": ["a"], "objective": "o"}}]}]
    turns += [{"tool_calls": [{"name": "list_dir", "args": {}}]}] * 10
    turns += [{"content": "r"}, {"tool_calls": [{"name": "finish", "args": {"summary": "s"}}]}]
    deps, _ = make_deps(tmp_path, turns)
    saver = open_saver(tmp_path / "c.db")
    graph = build_graph(deps, checkpointer=saver)
    config = {"configurable": {"thread_id": "t"}, "recursion_limit": 1000}
    values = run(graph, config, initial_state("p"))
    assert checkpoint_count(saver, "t") > 20
    before = graph.get_state(config).values
    assert prune(saver, "t", keep=3) > 0
    assert checkpoint_count(saver, "t") == 3
    assert graph.get_state(config).values == before == values


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nocolon", "provider:model"),
        ("scripted:/does/not/exist.yaml", "not a bare name"),
        ("scripted:does-not-exist", "no file"),
        ("madeup:model", "not supported"),
    ],
)
def test_bad_model_specs_are_config_errors(tmp_path, spec, message):
    with pytest.raises(ModelConfigError, match=message):
        load_model(spec, secrets_dir=tmp_path)


def test_openai_without_the_gateway_names_the_flag(tmp_path):
    with pytest.raises(ModelConfigError, match="--model-gateway"):
        load_model("openai:gpt-4o", secrets_dir=tmp_path)


def test_the_wal_is_copied_by_the_checkpointer_thread_not_by_the_runs_connections(tmp_path):
    import sqlite3

    from agent.checkpoint import WalCheckpointer, connect

    db = tmp_path / "c.db"
    conn = connect(db, autocheckpoint=False)
    conn.execute("CREATE TABLE t (x BLOB)")
    with conn:
        conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 2000)  # ~2000 pages: past SQLite's 1000

    def rows_in_the_database_file() -> int:  # immutable: the file alone, without the WAL
        with sqlite3.connect(f"file:{db}?immutable=1", uri=True) as reader:
            try:
                return reader.execute("SELECT count(*) FROM t").fetchone()[0]
            except sqlite3.OperationalError:  # not even the table is in the file yet
                return 0

    assert rows_in_the_database_file() == 0  # the run's own connection copied nothing
    checkpointer = WalCheckpointer(db).start()
    checkpointer.nudge()
    checkpointer.stop()  # the last copy ends before stop returns
    assert rows_in_the_database_file() == 2000
