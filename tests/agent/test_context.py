"""Flat per-step cost and a bounded context: the state machine on real SQLite with long phases and big outputs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from agent import contract
from agent.checkpoint import open_saver
from agent.context import Budget, fit, messages, new_view, tokens
from agent.graph import Budgets, Deps, Inbox, build_graph, initial_state
from agent.models import ScriptedModel
from agent.tools import WorkTools
from agent.transcript import Transcript, estimate_tokens

OUTPUT = 16_000  # bytes per tool output, the tools' own cap


class Quiet:
    def event(self, type: str, **fields) -> None:
        pass


class Recording(ScriptedModel):
    """The scripted model, keeping what each turn was shown."""

    def __init__(self, turns: list[dict]):
        super().__init__(turns=turns, source="test")
        self.shown: list[list] = []

    def invoke(self, phase, messages, tools, turn):
        self.shown.append(list(messages))
        return super().invoke(phase, messages, tools, turn)


def long_phase(calls: int) -> list[dict]:
    """One objective of `calls` reads of a 16 KB file, one call per turn, then report and finish."""
    turns = [{"tool_calls": [{"name": "plan", "args": {"todos": ["read"], "objective": "read the notes"}}]}]
    turns += [{"tool_calls": [{"name": "read_file", "args": {"path": f"notes{i % 7}.txt"}}]} for i in range(calls)]
    return turns + [{"content": "read them all"}, {"tool_calls": [{"name": "finish", "args": {"summary": "ok"}}]}]


def setup(tmp_path: Path, turns: list[dict], context_tokens: int, transcript: Transcript | None = None):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    for i in range(7):  # different files, so a line of the summary names each
        (ws / f"notes{i}.txt").write_text(f"notes {i} " + "x" * (OUTPUT - 10))
    db = tmp_path / "c.db"
    model = Recording(turns)
    deps = Deps(
        model=model,
        tools=WorkTools(ws, tmp_path / "home", output_cap=OUTPUT),
        reporter=Quiet(),
        inbox=Inbox(ws / "inbox.jsonl"),
        budgets=Budgets(max_strategic_rounds=10, max_tool_calls=10_000, context_tokens=context_tokens),
        transcript=transcript or Transcript.open(db),
    )
    return deps, model, db


def run(deps: Deps, db: Path, state=None):
    graph = build_graph(deps, checkpointer=open_saver(db))
    config = {"configurable": {"thread_id": "t"}, "recursion_limit": 10_000}
    for _ in graph.stream(state, config, durability="sync", stream_mode="updates"):
        pass
    return graph.get_state(config).values


def shown_tokens(shown: list) -> int:
    return sum(estimate_tokens(m) for m in shown[1:])  # the system prompt is not the conversation's


def test_every_model_call_of_a_long_phase_stays_under_the_budget(tmp_path):
    deps, model, db = setup(tmp_path, long_phase(120), context_tokens=20_000)
    values = run(deps, db, initial_state("read every note"))

    assert values["outcome"] == contract.OUTCOME_DONE and values["tool_calls"] == 120
    sizes = [shown_tokens(shown) for shown in model.shown]
    assert max(sizes) <= 20_000, sizes
    # The budget is used, not avoided: without compaction the last call would carry 120 outputs of 4,000 tokens.
    assert max(sizes) > 10_000
    last_tactical = model.shown[-2]
    assert last_tactical[1].content.startswith("Objective: read the notes")  # the objective is never dropped
    summary = last_tactical[2].content
    assert summary.startswith("Summary of the earlier turns") and 'call read_file({"path": "notes' in summary
    assert "-> ok: notes" in summary  # each answer in a line: its status and first line


def test_compacted_outputs_keep_head_and_tail(tmp_path):
    transcript = Transcript.in_memory()
    budget = Budget(4_000)
    end = transcript.write(0, [("tactical", HumanMessage(content="Objective: o"))])
    view = new_view(0)
    for i in range(6):
        call = {"name": "execute", "args": {"command": f"step {i}"}, "id": f"c{i}", "type": "tool_call"}
        output = f"HEAD{i} " + "." * 6_000 + f" TAIL{i}"
        end = transcript.write(end, [("tactical", AIMessage(content="", tool_calls=[call])), ("tactical", ToolMessage(content=output, tool_call_id=f"c{i}"))])

    compacted, new_end = fit(transcript, "tactical", view, end, budget)
    shown = messages(transcript, "tactical", compacted, new_end, budget)

    assert new_end == end + 1 and compacted["summary"] == end  # one summary row, written at the end
    assert tokens(transcript, "tactical", compacted, new_end) <= budget.target
    outputs = [m for m in shown if isinstance(m, ToolMessage)]
    assert outputs and outputs[-1].content.startswith("HEAD5") and outputs[-1].content.endswith("TAIL5")
    assert "bytes elided" in outputs[-1].content
    # The transcript keeps the whole output: only what the model sees is cut.
    assert transcript.rows("tactical", compacted["start"], new_end)[-1].message.content.endswith("." * 100 + " TAIL5")
    assert "call execute" in shown[1].content and '"command": "step 0"' in shown[1].content


def test_the_checkpoint_stays_the_same_size_however_long_the_phase(tmp_path):
    deps, _, db = setup(tmp_path, long_phase(60), context_tokens=20_000)
    run(deps, db, initial_state("p" * 5_000))
    with sqlite3.connect(db) as conn:
        sizes = [n for (n,) in conn.execute("SELECT length(checkpoint) FROM checkpoints ORDER BY checkpoint_id")]
        written = conn.execute("SELECT count(*), sum(length(message)) FROM transcript").fetchone()
    # 60 outputs of 16 KB went by; a checkpoint holds counters and views, not messages (nor the 5 KB
    # prompt, after the first step): the last is the size of one early in the phase, give or take digits.
    early = sizes[4]
    assert early < 3_000 and abs(sizes[-1] - early) < 100, (early, sizes[-1])
    assert written[0] >= 2 * 60 and written[1] > 60 * OUTPUT  # each message is in the transcript, once


class CrashAfterWrite(Transcript):
    """Commits a row, then dies before the step's checkpoint (as a SIGKILL there would)."""

    def __init__(self, conn, crash_on_write: int):
        super().__init__(conn)
        self.writes, self.crash_on_write = 0, crash_on_write

    def write(self, at, entries, kind="message"):
        end = super().write(at, entries, kind)
        self.writes += 1
        if self.writes == self.crash_on_write:
            raise SystemExit("killed after the row was committed")
        return end


@pytest.mark.parametrize("crash_on_write", [5, 6, 30])
def test_a_step_that_died_after_writing_its_row_leaves_no_duplicate(tmp_path, crash_on_write):
    from agent.checkpoint import connect

    deps, _, db = setup(tmp_path, long_phase(25), context_tokens=8_000, transcript=CrashAfterWrite(connect(tmp_path / "c.db"), crash_on_write))
    with pytest.raises(SystemExit):
        run(deps, db, initial_state("p"))

    resumed, model, _ = setup(tmp_path, long_phase(25), context_tokens=8_000)  # a new process: a new Transcript
    values = run(resumed, db)
    assert values["outcome"] == contract.OUTCOME_DONE and values["tool_calls"] == 25

    rows = [row for row in resumed.transcript.all() if row.seq < values["transcript_len"]]
    answered = [row.message.tool_call_id for row in rows if isinstance(row.message, ToolMessage) and row.conversation == "tactical"]
    assert len(answered) == len(set(answered)) == 25
    assert [row.seq for row in rows] == list(range(values["transcript_len"]))


def test_a_resumed_run_shows_the_model_what_an_uninterrupted_run_does(tmp_path):
    from agent.checkpoint import connect

    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    straight_dir.mkdir(), crashed_dir.mkdir()
    deps, straight, db = setup(straight_dir, long_phase(25), context_tokens=8_000)
    run(deps, db, initial_state("p"))

    deps, before, db = setup(crashed_dir, long_phase(25), context_tokens=8_000, transcript=CrashAfterWrite(connect(crashed_dir / "c.db"), 20))
    with pytest.raises(SystemExit):
        run(deps, db, initial_state("p"))
    resumed, after, _ = setup(crashed_dir, long_phase(25), context_tokens=8_000)
    run(resumed, db)

    def contents(shown):
        return [[(type(m).__name__, m.content) for m in turn] for turn in shown]

    # The turn that died is asked again; every turn from there on saw exactly what the straight run's did.
    assert contents(after.shown) == contents(straight.shown)[len(straight.shown) - len(after.shown):]
    assert len(before.shown) + len(after.shown) >= len(straight.shown)
