"""Checkpoint cost: a 100-step scripted run with the SQLite saver vs LangGraph's in-memory saver.

Target: SQLite (durability "sync", WAL, synchronous=NORMAL) <= 1.5x the in-memory wall time.
Run: .venv/bin/python bench/bench_checkpoint.py [--steps 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402

from agent.checkpoint import open_saver  # noqa: E402
from agent.graph import Budgets, Deps, Inbox, build_graph, initial_state  # noqa: E402
from agent.models import ScriptedModel  # noqa: E402
from agent.tools import WorkTools  # noqa: E402


class Quiet:
    def event(self, type: str, **fields) -> None:
        pass


def turns_for(steps: int) -> list[dict]:
    # plan + (steps - 3) tool turns + report + finish; each tool call is one step of `act`.
    tool_turns = (steps - 3) // 2
    turns = [{"tool_calls": [{"name": "plan", "args": {"todos": ["read"], "objective": "read"}}]}]
    turns += [{"tool_calls": [{"name": "read_file", "args": {"path": "notes.txt"}}]}] * tool_turns
    turns += [{"content": "read"}, {"tool_calls": [{"name": "finish", "args": {"summary": "ok"}}]}]
    return turns


def one_run(saver_kind: str, steps: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ws").mkdir()
        (root / "ws" / "notes.txt").write_text("x" * 2000)
        deps = Deps(
            model=ScriptedModel(turns=turns_for(steps), source="bench"),
            tools=WorkTools(root / "ws", root / "home"),
            reporter=Quiet(),
            inbox=Inbox(root / "ws" / "inbox.jsonl"),
            budgets=Budgets(max_strategic_rounds=10, max_tool_calls=10_000),
        )
        saver = open_saver(root / "ws" / "c.db") if saver_kind == "sqlite" else InMemorySaver()
        graph = build_graph(deps, checkpointer=saver)
        config = {"configurable": {"thread_id": "bench"}, "recursion_limit": 100_000}
        started = time.perf_counter()
        count = sum(1 for _ in graph.stream(initial_state("bench"), config, durability="sync", stream_mode="updates"))
        return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    one_run("memory", 20)  # warm imports and caches
    memory, sqlite = [], []
    for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
        seconds, steps = one_run("memory", args.steps)
        memory.append(seconds)
        seconds, steps_sqlite = one_run("sqlite", args.steps)
        sqlite.append(seconds)
    m, s = statistics.median(memory), statistics.median(sqlite)
    print(f"steps per run: {steps} (in-memory) / {steps_sqlite} (sqlite)")
    print(f"in-memory saver: {m * 1000:.1f} ms/run ({m / steps * 1000:.2f} ms/step)")
    print(f"sqlite saver:    {s * 1000:.1f} ms/run ({s / steps * 1000:.2f} ms/step)")
    print(f"ratio sqlite/in-memory: {s / m:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
