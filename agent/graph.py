"""The agent's state machine, declared in one place.

    START ─► strategic ──plan──► tactical ──tool calls──► act ─┐
               ▲   │ finish/budget        │ no tool call       │ one call per step
               │   ▼                      ▼                    │
               │  END       report ◄──────┘ ◄── more / budget ─┘
               └─────────────────────┘

STRATEGIC keeps the todo list and picks the next objective with `plan`, or
ends the run with `finish`. TACTICAL works on one objective with the work
tools and reports back by answering without a tool call.

Invariant: `act` runs exactly one tool call per step. With durability "sync"
every step is checkpointed before the next starts, so after a crash only the
call that was running is run again; no completed tool call is repeated.
Nodes are plain functions of state; side effects go through `Deps`.

The state is small and of a bounded size, so a checkpoint costs the same at
step 400 as at step 1: counters, the todo list, and for each conversation a
`View` of the transcript (agent.transcript holds the messages, written once;
agent.context keeps what the model sees under its token budget). Each TACTICAL
phase starts a new conversation; STRATEGIC keeps only its report.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol, TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph

from agent import context, contract, thought
from agent.context import View
from agent.models import BudgetExhausted
from agent.redact import Redactor
from agent.transcript import Transcript

STRATEGIC_PROMPT = """You are the strategic half of a coding agent working in a private workspace.
Keep a short todo list. Each turn call exactly one control tool:
- plan(todos, objective): the updated todo list and the next objective to work on;
- finish(summary): when the task is done (or cannot be done), with a summary for the user.
Reports from the tactical phase and messages from humans arrive as user messages."""

TACTICAL_PROMPT = """You are the tactical half of a coding agent. Work on the objective with the tools
execute, read_file, write_file and list_dir; paths are relative to the workspace.
When the objective is reached (or you are stuck), answer without a tool call: that answer is your
report to the strategic phase. Be concise."""

CONTROL_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "plan",
            "description": "Set the todo list and the next objective for the tactical phase.",
            "parameters": {
                "type": "object",
                "properties": {
                    "todos": {"type": "array", "items": {"type": "string"}},
                    "objective": {"type": "string"},
                },
                "required": ["todos", "objective"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "finish",
            "description": "End the task with a summary for the user.",
            "parameters": {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]},
        },
    },
]


STRATEGIC = "strategic"  # the conversations of the transcript
TACTICAL = "tactical"


class AgentState(TypedDict, total=False):
    prompt: str  # moved to the transcript by the first step (then "")
    phase: str
    transcript_len: int  # rows of the transcript that belong to the run
    strategic: View | None  # None until the first step
    tactical: View | None  # a new one for each objective
    reply: int  # the row of the last TACTICAL reply; its calls are run one per `act` step
    calls_answered: int  # calls of that reply answered so far
    calls_total: int
    todos: list[str]
    objective: str
    model_turns: int  # all model turns so far; the scripted model replays by this count
    strategic_rounds: int
    tactical_calls: int  # tool calls in the current tactical phase
    tool_calls: int  # tool calls in the whole run
    inbox_seen: int  # human messages already taken from the inbox
    outcome: str | None
    summary: str | None


@dataclass(frozen=True)
class Budgets:
    max_strategic_rounds: int = 30
    max_tool_calls: int = 40  # per tactical phase
    context_tokens: int = 60_000  # what the model sees of a conversation (estimated; see agent.context)


class Reporter(Protocol):
    def event(self, type: str, **fields) -> None: ...


class Tools(Protocol):
    def call(self, name: str, args: dict, call_id: str | None = None): ...
    def schemas(self) -> list[dict]: ...


@dataclass
class Deps:
    model: object  # agent.models.Model
    tools: Tools
    reporter: Reporter
    inbox: "Inbox"
    budgets: Budgets = field(default_factory=Budgets)
    waiting: Callable[[float], object] | None = None  # heartbeat context while blocked
    transcript: Transcript = field(default_factory=Transcript.in_memory)  # a run gives the checkpoint's database


class Inbox:
    """Human messages, appended to a file before they are acknowledged, read by index.

    A file (not graph state) because messages arrive between steps from another
    thread; the strategic node records how many it has taken, so a replayed
    step takes the same ones again.
    """

    def __init__(self, path: Path):
        self.path = path

    def append(self, text: str) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"text": text, "ts": time.time()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_from(self, index: int) -> list[str]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines[index:]:
            try:
                entries.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                entries.append("")  # a torn last line still counts, so indexes stay stable
        return entries


def initial_state(prompt: str) -> AgentState:
    return {
        "prompt": prompt,
        "phase": contract.PHASE_STRATEGIC,
        "transcript_len": 0,
        "strategic": None,
        "tactical": None,
        "reply": -1,
        "calls_answered": 0,
        "calls_total": 0,
        "todos": [],
        "objective": "",
        "model_turns": 0,
        "strategic_rounds": 0,
        "tactical_calls": 0,
        "tool_calls": 0,
        "inbox_seen": 0,
        "outcome": None,
        "summary": None,
    }


_FORMATS_ONLY = Redactor()


def _truncate(deps: Deps, value: object, limit: int = 500) -> object:
    """`value` for a trace event: each string redacted first, then cut (a cut secret would pass)."""
    redactor = getattr(deps.reporter, "redactor", None) or _FORMATS_ONLY
    if isinstance(value, str):
        return redactor.cut(value, limit)
    if isinstance(value, dict):
        return {k: _truncate(deps, v, limit) for k, v in value.items()}
    return value


EVENT_HEAD_CHARS = 2000  # of a tool's output in its `tool` event
EVENT_TAIL_CHARS = 4000  # more of the end: where build and test errors are


def _output_fields(deps: Deps, result) -> dict:
    """A tool call's output for its `tool` event: the true size, head and tail (each redacted before it is
    cut, as `result` is), and the file that keeps all of it (agent.outputs)."""
    size = getattr(result, "output_bytes", None)
    if size is None:
        return {}
    redactor = getattr(deps.reporter, "redactor", None) or _FORMATS_ONLY
    head = redactor.redact(result.output_head)
    if result.output_tail:  # the middle was never in memory: the tail is its own piece
        tail = redactor.redact(result.output_tail)[-EVENT_TAIL_CHARS:]
    else:
        tail = head[EVENT_HEAD_CHARS:][-EVENT_TAIL_CHARS:]
    fields = {"output_bytes": size, "output_head": head[:EVENT_HEAD_CHARS], "output_tail": tail}
    if result.output_file:
        fields["output_file"] = result.output_file
        if result.output_cut:
            fields["output_file_cut"] = True
    return fields


def build_graph(deps: Deps, checkpointer=None):
    """The whole state machine: three nodes bound to `deps`, and the routes between them."""
    graph = StateGraph(AgentState)
    graph.add_node("strategic", partial(_strategic, deps))
    graph.add_node("tactical", partial(_tactical, deps))
    graph.add_node("act", partial(_act, deps))
    graph.add_edge(START, "strategic")
    graph.add_conditional_edges("strategic", _after_strategic, ["strategic", "tactical", END])
    graph.add_conditional_edges("tactical", _after_tactical, ["act", "strategic", END])
    graph.add_conditional_edges("act", _after_act, ["act", "tactical", "strategic"])
    return graph.compile(checkpointer=checkpointer)


# --- nodes ---------------------------------------------------------------------
def _strategic(deps: Deps, state: AgentState) -> AgentState:
    """One strategic round: take new human messages, then plan the next objective or finish."""
    end, update = state["transcript_len"], {}
    view = state["strategic"]
    entries: list[BaseMessage] = []
    if view is None:  # the first step: the prompt moves from the state (rewritten every step) to the transcript
        entries.append(HumanMessage(content=f"Task:\n{state['prompt']}"))
        view, update = context.new_view(end), {"prompt": ""}
    news = deps.inbox.read_from(state["inbox_seen"])
    entries += [HumanMessage(content=f"Message from a human: {text}") for text in news]
    end = _write(deps, end, STRATEGIC, entries)
    update.update(inbox_seen=state["inbox_seen"] + len(news), strategic=view, transcript_len=end)
    if state["strategic_rounds"] >= deps.budgets.max_strategic_rounds:
        summary = f"stopped: the budget of {deps.budgets.max_strategic_rounds} strategic rounds is spent"
        return {**update, "outcome": contract.OUTCOME_BUDGET, "summary": summary}

    try:
        reply, view, end = _ask_model(deps, STRATEGIC, view, end, CONTROL_TOOLS, state["model_turns"])
    except BudgetExhausted as exc:  # the model gateway refuses: a token or cost limit is spent
        return {**update, "outcome": contract.OUTCOME_BUDGET, "summary": f"stopped: {exc}"}
    update.update(model_turns=state["model_turns"] + 1, strategic_rounds=state["strategic_rounds"] + 1, strategic=view)
    entries = [reply]
    control = _control_call(reply)
    for call in reply.tool_calls:  # every call needs an answer before the next model turn
        answer = "ok" if call is control else "ignored: call exactly one of plan or finish"
        entries.append(ToolMessage(content=answer, tool_call_id=call["id"]))
    if control is None:
        entries.append(HumanMessage(content="Call plan(todos, objective) or finish(summary)."))
    end = _write(deps, end, STRATEGIC, entries)
    update["transcript_len"] = end
    if control is None:
        return update
    args = control["args"] or {}
    if control["name"] == "finish":
        return {**update, "outcome": contract.OUTCOME_DONE, "summary": str(args.get("summary", ""))}
    return {**update, **_plan(deps, state, args, end)}


def _control_call(reply: AIMessage) -> dict | None:
    """The first plan or finish call of a strategic reply; any other call is ignored."""
    return next((c for c in reply.tool_calls if c["name"] in ("plan", "finish")), None)


def _plan(deps: Deps, state: AgentState, args: dict, end: int) -> AgentState:
    """Hand the next objective to a fresh tactical conversation; the todo list is reported only when it changed."""
    todos = [str(t) for t in args.get("todos") or []]
    objective = str(args.get("objective") or (todos[0] if todos else ""))
    if todos != state["todos"]:
        deps.reporter.event(contract.EV_TODO, todos=todos)
    deps.reporter.event(contract.EV_PHASE, phase=contract.PHASE_TACTICAL, objective=objective)
    first = HumanMessage(content=f"Objective: {objective}\nTodo list: {json.dumps(todos)}")
    return {
        "todos": todos,
        "objective": objective,
        "phase": contract.PHASE_TACTICAL,
        "tactical": context.new_view(end),
        "transcript_len": _write(deps, end, TACTICAL, [first]),
        "tactical_calls": 0,
        "calls_answered": 0,
        "calls_total": 0,
    }


def _tactical(deps: Deps, state: AgentState) -> AgentState:
    """One tactical model turn; an answer without a tool call is the report back to STRATEGIC."""
    try:
        reply, view, end = _ask_model(deps, TACTICAL, state["tactical"], state["transcript_len"], deps.tools.schemas(), state["model_turns"])
    except BudgetExhausted as exc:
        return {"phase": contract.PHASE_STRATEGIC, "outcome": contract.OUTCOME_BUDGET, "summary": f"stopped: {exc}"}
    reply_row, end = end, _write(deps, end, TACTICAL, [reply])
    update: AgentState = {"tactical": view, "transcript_len": end, "model_turns": state["model_turns"] + 1}
    if reply.tool_calls:
        return {**update, "reply": reply_row, "calls_answered": 0, "calls_total": len(reply.tool_calls)}
    return {**update, "calls_total": 0, **_report(deps, reply.text or "(no report)", end)}


def _act(deps: Deps, state: AgentState) -> AgentState:
    """Run exactly one pending tool call (the invariant that makes a crash repeat at most this call)."""
    call = deps.transcript.row(state["reply"]).message.tool_calls[state["calls_answered"]]
    deps.reporter.event(contract.EV_TOOL, name=call["name"], args=_truncate(deps, call["args"]), call_id=call["id"], stage="start")
    started = time.monotonic()
    result = deps.tools.call(call["name"], call["args"] or {}, call_id=call["id"])
    deps.reporter.event(
        contract.EV_TOOL,
        name=call["name"],
        call_id=call["id"],
        stage="end",
        ok=result.ok,
        result=_truncate(deps, result.output, 2000),
        seconds=round(time.monotonic() - started, 3),
        **_output_fields(deps, result),
    )
    answer = ToolMessage(content=result.output, tool_call_id=call["id"], status="success" if result.ok else "error")
    end = _write(deps, state["transcript_len"], TACTICAL, [answer])
    calls = state["tactical_calls"] + 1
    update: AgentState = {
        "transcript_len": end,
        "calls_answered": state["calls_answered"] + 1,
        "tactical_calls": calls,
        "tool_calls": state["tool_calls"] + 1,
    }
    if calls >= deps.budgets.max_tool_calls:
        report = f"stopped: the budget of {deps.budgets.max_tool_calls} tool calls for this objective is spent"
        return {**update, **_report(deps, report, end)}
    return update


def _ask_model(deps: Deps, conversation: str, view: View, end: int, tools: list[dict], turn: int) -> tuple[AIMessage, View, int]:
    """A model turn on the conversation's window (compacted first when over the budget); inside
    `deps.waiting` (when given) so a long call keeps the heartbeat alive. Returns the reply, the view and
    the end of the transcript (a compaction writes a summary row)."""
    budget = context.Budget(deps.budgets.context_tokens)
    view, end = context.fit(deps.transcript, conversation, view, end, budget)
    prompt = STRATEGIC_PROMPT if conversation == STRATEGIC else TACTICAL_PROMPT
    phase = contract.PHASE_STRATEGIC if conversation == STRATEGIC else contract.PHASE_TACTICAL
    shown = [SystemMessage(content=prompt), *context.messages(deps.transcript, conversation, view, end, budget)]
    with deps.waiting(600) if deps.waiting is not None else nullcontext():
        return _think(deps, phase, shown, tools, turn), view, end


def _think(deps: Deps, phase: str, shown: list[BaseMessage], tools: list[dict], turn: int) -> AIMessage:
    """The model call between its two `thought` events (agent.thought): the second one always comes,
    also when the call raises, so a trace never shows a call open that has ended."""
    def cut(text: str, limit: int) -> str:
        return _truncate(deps, text, limit)

    deps.reporter.event(contract.EV_THOUGHT, **thought.opened(phase=phase, turn=turn))
    started = time.monotonic()
    try:
        reply = deps.model.invoke(phase, shown, tools, turn)
    except BaseException as exc:
        took = round((time.monotonic() - started) * 1000)
        deps.reporter.event(contract.EV_THOUGHT, **thought.failed(exc, phase=phase, turn=turn, latency_ms=took, cut=cut))
        raise
    took = round((time.monotonic() - started) * 1000)
    deps.reporter.event(contract.EV_THOUGHT, **thought.closed(reply, phase=phase, turn=turn, latency_ms=took, cut=cut))
    return reply


def _write(deps: Deps, end: int, conversation: str, entries: list[BaseMessage]) -> int:
    return deps.transcript.write(end, [(conversation, message) for message in entries])


def _report(deps: Deps, text: str, end: int) -> AgentState:
    """Back to STRATEGIC with the tactical phase's report as a user message."""
    deps.reporter.event(contract.EV_PHASE, phase=contract.PHASE_STRATEGIC, report=_truncate(deps, text))
    report = HumanMessage(content=f"Report from the tactical phase: {text}")
    return {"phase": contract.PHASE_STRATEGIC, "transcript_len": _write(deps, end, STRATEGIC, [report])}


# --- routes --------------------------------------------------------------------
def _after_strategic(state: AgentState) -> str:
    if state.get("outcome"):
        return END
    return "tactical" if state["phase"] == contract.PHASE_TACTICAL else "strategic"


def _after_tactical(state: AgentState) -> str:
    if state.get("outcome"):  # a budget refusal of the model gateway
        return END
    return "act" if state["phase"] == contract.PHASE_TACTICAL else "strategic"


def _after_act(state: AgentState) -> str:
    if state["phase"] == contract.PHASE_STRATEGIC:
        return "strategic"
    return "act" if state["calls_answered"] < state["calls_total"] else "tactical"
