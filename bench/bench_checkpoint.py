"""Per-step cost of a long phase: the agent's graph on its SQLite checkpoint + transcript, against the same graph
on LangGraph's InMemorySaver and against the stock pattern (messages in the state, `MessagesState`, on the stock
SqliteSaver), in the same run.

    .venv/bin/python bench/bench_checkpoint.py [--steps 400] [--sizes 2000,16000]

Each run is one TACTICAL phase of --steps steps (a model turn, then one `read_file` of a file of SIZE bytes, and
so on), checkpointed with durability "sync". Both SQLite runs use the agent's connection settings (WAL,
synchronous=NORMAL; ours copies the WAL from a thread of its own, as `python -m agent run` does) and prune to the newest 20 checkpoints every 10 steps, as `python -m agent run` does, so the
difference is the design: what a checkpoint holds. Measured per step: wall time (from one streamed update to the
next) and bytes written (`wchar` of /proc/self/io: the WAL, the database and its checkpoints).

Targets (issue 13), checked on ours, exit status 1 when one is missed:
- per-step time, median of steps 350-400 <= 1.2x the median of steps 1-50;
- bytes written per step, the same windows, <= 1.2x;
- database size linear in steps (its live bytes grow by the same amount, within 1.2x, in each of the last three
  quarters of the run) and <= the stock pattern's;
- p99 step <= 10 ms with 16 KB outputs;
- the context sent to the model at the last turn under its budget (--context-tokens, the agent's default).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langchain_core.messages import AIMessage, ToolMessage  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from langgraph.graph import START, MessagesState, StateGraph  # noqa: E402

from agent.checkpoint import WalCheckpointer, connect, open_saver, prune  # noqa: E402
from agent.graph import Budgets, Deps, Inbox, build_graph, initial_state  # noqa: E402
from agent.models import ScriptedModel  # noqa: E402
from agent.tools import WorkTools  # noqa: E402
from agent.transcript import Transcript, estimate_tokens  # noqa: E402

KEEP, PRUNE_EVERY = 20, 10  # as agent.run
TIME_RATIO, BYTES_RATIO, SIZE_GROWTH, P99_MS = 1.2, 1.2, 1.2, 10.0


class Quiet:
    def event(self, type: str, **fields) -> None:
        pass


class Recording(ScriptedModel):
    """Measures the context of the last TACTICAL turn (the report) only: measuring every turn would add its
    own cost, growing with the context, to the steps being measured."""

    def __init__(self, turns):
        super().__init__(turns=turns, source="bench")
        self.last_tokens = 0

    def invoke(self, phase, messages, tools, turn):
        if turn == len(self.turns) - 2:
            self.last_tokens = sum(estimate_tokens(m) for m in messages[1:])
        return super().invoke(phase, messages, tools, turn)


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def turns_for(steps: int) -> list[dict]:
    """plan, then a tactical turn + a tool call per two steps, then report and finish."""
    turns = [{"tool_calls": [{"name": "plan", "args": {"todos": ["read"], "objective": "read"}}]}]
    turns += [{"tool_calls": [{"name": "read_file", "args": {"path": "notes.txt"}}]}] * (steps // 2)
    return turns + [{"content": "read"}, {"tool_calls": [{"name": "finish", "args": {"summary": "ok"}}]}]


def measure(updates, db: Path | None, saver, thread: str, quarter: int, after_step=lambda: None) -> dict:
    """Per-step wall time and bytes written while streaming; the database's size at half way and at the end."""
    times, written, sizes = [], [], {}
    last, last_bytes, step = time.perf_counter(), written_bytes(), 0
    for _ in updates:
        step += 1
        after_step()
        if step % PRUNE_EVERY == 0 and db is not None:
            prune(saver, thread, keep=KEEP)
        now, now_bytes = time.perf_counter(), written_bytes()
        times.append(now - last)
        written.append(now_bytes - last_bytes)
        if db is not None and step % quarter == 0:
            sizes[step] = live_bytes(db)
        last, last_bytes = time.perf_counter(), written_bytes()  # the size check is not the step's
    if db is not None:
        sizes["files"] = file_bytes(db)
    return {"times": times, "written": written, "sizes": sizes}


def live_bytes(db: Path) -> int:
    """The database's live pages (its WAL included, its free pages not): what a snapshot copies."""
    with closing(sqlite3.connect(db)) as conn:
        pages, free, size = (conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "freelist_count", "page_size"))
    return (pages - free) * size


def file_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def ours(root: Path, steps: int, durable: bool, context_tokens: int) -> dict:
    model = Recording(turns_for(steps))
    db = root / "ours.db"
    deps = Deps(
        model=model,
        tools=WorkTools(root / "ws", root / "home", output_cap=1_000_000),
        reporter=Quiet(),
        inbox=Inbox(root / "ws" / "inbox.jsonl"),
        budgets=Budgets(max_strategic_rounds=10, max_tool_calls=100_000, context_tokens=context_tokens),
        transcript=Transcript.open(db, autocheckpoint=False) if durable else Transcript.in_memory(),
    )
    saver = open_saver(db, autocheckpoint=False) if durable else InMemorySaver()
    checkpointer = WalCheckpointer(db).start() if durable else None  # as agent.run: no step copies the WAL
    graph = build_graph(deps, checkpointer=saver)
    config = {"configurable": {"thread_id": "bench"}, "recursion_limit": 100_000}
    updates = graph.stream(initial_state("bench"), config, durability="sync", stream_mode="updates")
    result = measure(updates, db if durable else None, saver, "bench", steps // 4, checkpointer.nudge if checkpointer else lambda: None)
    if checkpointer is not None:
        checkpointer.stop()
    return {**result, "context_tokens": model.last_tokens}


def stock(root: Path, steps: int, size: int) -> dict:
    """The stock pattern: every message in `MessagesState`, the stock SqliteSaver (same pragmas as ours)."""
    output = (root / "ws" / "notes.txt").read_text()
    calls = {"n": 0}

    def model(state: MessagesState):
        calls["n"] += 1
        call = {"name": "read_file", "args": {"path": "notes.txt"}, "id": f"call_{calls['n']}", "type": "tool_call"}
        return {"messages": [AIMessage(content="", tool_calls=[call])]}

    def tool(state: MessagesState):
        call = state["messages"][-1].tool_calls[0]
        return {"messages": [ToolMessage(content=output, tool_call_id=call["id"])]}

    def route(state: MessagesState) -> str:  # as ours: a model turn and a tool call per two steps
        return "tool" if calls["n"] <= steps // 2 else "__end__"

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tool", tool)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, ["tool", "__end__"])
    graph.add_edge("tool", "model")
    db = root / "stock.db"
    saver = SqliteSaver(connect(db))
    saver.setup()
    app = graph.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "bench"}, "recursion_limit": 100_000}
    updates = app.stream({"messages": [("user", "bench")]}, config, durability="sync", stream_mode="updates")
    return measure(updates, db, saver, "bench", steps // 4)


def window(values: list[float], first: int, last: int) -> float:
    return statistics.median(values[first - 1 : last])


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def one_size(size: int, steps: int, context_tokens: int) -> list[str]:
    """Runs the three variants for outputs of `size` bytes; prints the figures, returns the targets missed."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ws").mkdir()
        (root / "ws" / "notes.txt").write_text("x" * size)
        ours(root, 40, False, context_tokens)  # warm imports and caches
        memory = ours(root, steps, False, context_tokens)
        durable = ours(root, steps, True, context_tokens)
        base = stock(root, steps, size)
    late_from = steps - 50
    print(f"\n== outputs of {size:,} bytes, {steps} steps ==")
    print(f"{'':28} {'steps 1-50':>12} {f'steps {late_from}-{steps}':>14} {'ratio':>7} {'p99':>9}")
    for name, run in (("ours (SQLite + transcript)", durable), ("ours on InMemorySaver", memory), ("stock (messages in state)", base)):
        early, late = window(run["times"], 1, 50), window(run["times"], late_from, steps)
        print(f"{name:28} {early * 1000:9.2f} ms {late * 1000:11.2f} ms {late / early:6.2f}x {p99(run['times']) * 1000:6.2f} ms")
    early_b, late_b = window(durable["written"], 1, 50), window(durable["written"], late_from, steps)
    stock_b = window(base["written"], late_from, steps)
    print(f"bytes written per step (median): ours {early_b:,.0f} -> {late_b:,.0f} ({late_b / max(early_b, 1):.2f}x); "
          f"stock at the end {stock_b:,.0f}")
    print(f"bytes written per step (mean):   ours {statistics.fmean(durable['written'][:50]):,.0f} -> "
          f"{statistics.fmean(durable['written'][late_from - 1:]):,.0f}; stock {statistics.fmean(base['written'][late_from - 1:]):,.0f}")
    quarters = [q * (steps // 4) for q in (1, 2, 3, 4)]
    growth = [(durable["sizes"][b] - durable["sizes"][a]) / (b - a) for a, b in zip(quarters, quarters[1:], strict=False)]
    end, stock_end = durable["sizes"][quarters[-1]], base["sizes"][quarters[-1]]
    print(f"database, live bytes at steps {quarters}: ours {[round(durable['sizes'][q] / 1e6, 2) for q in quarters]} MB, "
          f"growing {[round(g) for g in growth]} B/step (the output is {size:,} B per two steps); "
          f"stock {[round(base['sizes'][q] / 1e6, 2) for q in quarters]} MB")
    print(f"database files (with the WAL) at the end: ours {durable['sizes']['files'] / 1e6:.2f} MB, stock {base['sizes']['files'] / 1e6:.2f} MB")
    print(f"context at the last model turn: {durable['context_tokens']:,} tokens (budget {context_tokens:,})")
    print(f"ours vs InMemorySaver, median step: {statistics.median(durable['times']) / statistics.median(memory['times']):.2f}x")

    missed = []
    time_ratio = window(durable["times"], late_from, steps) / window(durable["times"], 1, 50)
    if time_ratio > TIME_RATIO:
        missed.append(f"{size} B: per-step time {time_ratio:.2f}x > {TIME_RATIO}x")
    if late_b / max(early_b, 1) > BYTES_RATIO:
        missed.append(f"{size} B: bytes per step {late_b / max(early_b, 1):.2f}x > {BYTES_RATIO}x")
    if max(growth) > SIZE_GROWTH * min(growth) or end > stock_end:
        missed.append(f"{size} B: database growth per step {[round(g) for g in growth]}, {end / 1e6:.2f} MB vs stock {stock_end / 1e6:.2f} MB")
    if size >= 16_000 and p99(durable["times"]) * 1000 > P99_MS:
        missed.append(f"{size} B: p99 step {p99(durable['times']) * 1000:.2f} ms > {P99_MS} ms")
    if durable["context_tokens"] > context_tokens:
        missed.append(f"{size} B: context {durable['context_tokens']} tokens > budget {context_tokens}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sizes", default="2000,16000")
    parser.add_argument("--context-tokens", type=int, default=Budgets().context_tokens)
    args = parser.parse_args()
    missed = [m for size in args.sizes.split(",") for m in one_size(int(size), args.steps, args.context_tokens)]
    print("\ntargets: per-step time and bytes <= 1.2x (steps 350-400 vs 1-50), database linear and <= stock, "
          "p99 <= 10 ms at 16 KB, context under budget")
    print("MISSED: " + "; ".join(missed) if missed else "all targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
