"""A task's trace for a terminal: one SSE message in, a short readable text out.

Pure functions of the message (no I/O), so `dockyard logs` and `dockyard demo`
print the same thing and tests check the text directly. Unknown event types are
shown as compact JSON rather than dropped: a newer agent never goes silent.
`Renderer` adds the one thing a single message cannot say: the trace's running
totals (model turns and time, tokens, cost, the task's duration), printed before
the end of the stream.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent import contract

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
WIDTH = 100  # a tool result or summary is cut to about this many characters on its line


def render(event: str, data: dict[str, Any]) -> str | None:
    """Text for one SSE message (`event` is its SSE event name), or None to print nothing.
    Safe for a terminal: every control character but newline and tab is removed (agent output
    could otherwise move the cursor, rewrite lines or set the window title with ESC sequences)."""
    text = _render(event, data)
    return None if text is None else terminal_safe(text)


def terminal_safe(text: str) -> str:
    """`text` without C0 controls (except newline and tab), DEL and C1 controls (ESC, CSI, OSC...)."""
    return _CONTROL.sub("", text)


def _render(event: str, data: dict[str, Any]) -> str | None:
    if event == "log":
        return _log(data)
    if event == "end":
        return "-- end of stream"
    kind = data.get("type") or event
    renderer = _RENDERERS.get(kind)
    return renderer(data) if renderer else f"{kind}: {_compact(data, drop=('type', 'task_id', 'ts'))}"


def render_message(message: Any) -> str | None:
    """The same for an `sse_client.SSEMessage`."""
    return render(message.event, message.data)


@dataclass
class Totals:
    """A trace's running totals, from its `thought`, `usage` and `status` events.

    Tokens and cost come from the model gateway's `usage` events when there are
    any (it sees every call, and only it knows the price: each call's own counts
    are summed, as the tracker does); else from the provider's counts in the
    thoughts. A thought is counted once per turn, so a turn replayed after a
    crash replaces its first try.
    """

    turns: dict[int, dict] = field(default_factory=dict)  # turn -> its closing thought
    gateway: dict[str, float] = field(default_factory=lambda: {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    started: str | None = None
    finished: str | None = None

    def add(self, kind: str, data: dict) -> None:
        if kind == contract.EV_THOUGHT and not data.get("open") and isinstance(data.get("turn"), int):
            self.turns[data["turn"]] = data
        elif kind == contract.EV_USAGE and not data.get("refused"):
            self.gateway["calls"] += 1
            for name in ("input_tokens", "output_tokens", "cost_usd"):
                value = data.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                    self.gateway[name] += value
        elif kind == contract.EV_STATUS:
            if data.get("state") == contract.STATE_STARTED and self.started is None:
                self.started = data.get("ts")
            elif data.get("state") == contract.STATE_FINISHED:
                self.finished = data.get("ts")

    @property
    def empty(self) -> bool:
        return not self.turns and not self.gateway["calls"]

    def tokens(self) -> tuple[int, int, str]:
        """(input, output, where from): the gateway's counts, else the providers' as the thoughts carry them."""
        if self.gateway["calls"]:
            return int(self.gateway["input_tokens"]), int(self.gateway["output_tokens"]), "model gateway"
        usages = [t["usage"] for t in self.turns.values() if isinstance(t.get("usage"), dict)]
        return (sum(_count(u.get("input_tokens")) for u in usages), sum(_count(u.get("output_tokens")) for u in usages),
                "provider" if usages else "")

    def model_seconds(self) -> float:
        return sum(_count(t.get("latency_ms")) for t in self.turns.values()) / 1000

    def task_seconds(self) -> float | None:
        return _seconds_between(self.started, self.finished)

    def line(self) -> str:
        tokens_in, tokens_out, source = self.tokens()
        parts = [f"{len(self.turns)} model turn{'s' if len(self.turns) != 1 else ''} in {self.model_seconds():.1f}s"]
        parts.append(f"{tokens_in} in / {tokens_out} out tokens ({source})" if source else "no token counts")
        if self.gateway["calls"]:
            parts.append(f"${self.gateway['cost_usd']:.4f}")
        took = self.task_seconds()
        if took is not None:
            parts.append(f"task took {_duration(took)}")
        return "-- totals: " + ", ".join(parts)


class Renderer:
    """`render_message` for one whole trace: the same lines, and the totals before the end of the stream."""

    def __init__(self) -> None:
        self.totals = Totals()

    def render_message(self, message: Any) -> str | None:
        data = message.data if isinstance(message.data, dict) else {}
        if message.event != "log":
            self.totals.add(data.get("type") or message.event, data)
        line = render_message(message)
        if message.event == "end" and not self.totals.empty:
            return terminal_safe(self.totals.line()) + ("\n" + line if line else "")
        return line


def final_snapshot_location(store_url: str, task_id: str) -> str:
    """Where the final workspace archive of a task is, as a URL a person can open or copy."""
    return f"{store_url.rstrip('/')}/{contract.final_archive_key(task_id)}"


# --- one function per event type ------------------------------------------------


def _phase(data: dict) -> str:
    phase = str(data.get("phase") or "?")
    banner = f"== {phase} =="
    if data.get("objective"):
        return f"{banner} {_one_line(data['objective'])}"
    if data.get("report"):
        return f"{banner} report: {_one_line(data['report'])}"
    return banner


def _tool(data: dict) -> str:
    name = str(data.get("name") or "tool")
    if data.get("stage") == "end":
        seconds = data.get("seconds")
        took = f" {seconds:.1f}s" if isinstance(seconds, (int, float)) else ""
        status = "ok" if data.get("ok", True) else "error"
        if isinstance(data.get("output_head"), str) and isinstance(data.get("output_bytes"), int):
            first = str(data.get("result") or "").split("\n", 1)[0]  # "exit code 1" of a command
            said = f": {_one_line(first)}" if first.startswith("exit code") or first.startswith("timed out") else ""
            return f"  -> {status}{took}{_size(data['output_bytes'])}{said}" + _tool_output(data)
        result = _one_line(data.get("result") or "")
        return f"  -> {status}{took}" + (f": {result}" if result else "")
    return f"$ {name}: {_tool_args(name, data.get('args'))}"


HEAD_LINES, TAIL_LINES = 5, 10  # of a tool's output in `dockyard logs`: more of the end, where errors are


def _tool_output(data: dict) -> str:
    """A tool's output: the first lines of its head, "… N bytes cut …" (what is not shown, of the true
    size), the last lines of its tail, and where the whole of it is kept."""
    head, tail = str(data.get("output_head") or ""), str(data.get("output_tail") or "")
    head_lines, tail_lines = head.splitlines(), tail.splitlines()
    if not tail and len(head_lines) <= HEAD_LINES + TAIL_LINES and data["output_bytes"] <= len(head.encode()):
        first, last = head_lines, []  # all of it
    else:
        first = head_lines[:HEAD_LINES]
        last = (tail_lines or head_lines[HEAD_LINES:])[-TAIL_LINES:]
    shown = sum(len(line.encode()) + 1 for line in first + last)
    lines = [f"     {line}" for line in first]
    if last or data["output_bytes"] > shown:
        lines.append(f"     … {max(data['output_bytes'] - shown, 0)} bytes cut …")
    lines += [f"     {line}" for line in last]
    if data.get("output_file"):
        cut = " (its first bytes only: the task's outputs bound)" if data.get("output_file_cut") else ""
        lines.append(f"     full output: {data['output_file']}{cut}")
    return "".join("\n" + line.rstrip() for line in lines)


def _tool_args(name: str, args: Any) -> str:
    """The argument a person wants to see: the command, the path; else the arguments as JSON."""
    if isinstance(args, dict):
        for key in ("command", "path", "pattern", "query"):
            if isinstance(args.get(key), str):
                return _one_line(args[key])
        return _compact(args)
    return _one_line(str(args or ""))


def _todo(data: dict) -> str:
    todos = data.get("todos") or []
    if not todos:
        return "todo: (empty)"
    return "todo:\n" + "\n".join(f"  - {_one_line(str(item))}" for item in todos)


def _status(data: dict) -> str:
    state = data.get("state")
    if state == contract.STATE_STARTED:
        return "-- started" + (f" with model {data['model']}" if data.get("model") else "")
    if state == contract.STATE_RESUMED:
        where = f" in {data['phase']}" if data.get("phase") else ""
        done = f" ({data.get('model_turns', 0)} model turns, {data.get('tool_calls', 0)} tool calls done)"
        return f"-- resumed from checkpoint{where}{done}"
    if state == contract.STATE_RETRYING:
        after = f" after exit code {data['exit_code']}" if data.get("exit_code") is not None else ""
        wait = f", in {data['backoff_seconds']:g}s" if isinstance(data.get("backoff_seconds"), (int, float)) else ""
        return f"-- retrying: attempt {data.get('attempt', '?')}{after}{wait}"
    if state == contract.STATE_FINISHED:
        line = f"-- finished: {outcome_words(data)}"
        if data.get("summary") and data.get("summary") != data.get("reason"):
            line += f" - {_one_line(data['summary'])}"
        facts = _end_facts(data)
        if facts:
            line += f"\n   {facts}"
        detail = [row for row in str(data.get("detail") or "").splitlines() if row.strip()]
        if detail and detail[-1].strip() != str(data.get("reason") or "").strip():
            line += "\n   details (last lines):" + "".join(f"\n     {row}" for row in detail[-DETAIL_LINES:])
        return line
    extra = f" ({data['reason']})" if data.get("reason") else ""
    return f"-- {state or 'status'}{extra}"


DETAIL_LINES = 5  # of a failure's detail (its traceback, git's message) under the finished line


def outcome_words(record: dict) -> str:
    """An end in one line, for `dockyard tasks` and the finished line of `dockyard logs`:
    "failed (fatal): git clone failed: repository not found"."""
    outcome = str(record.get("outcome") or "unknown")
    kind = f" ({record['failure_class']})" if record.get("failure_class") else ""
    reason = f": {_one_line(record['reason'])}" if record.get("reason") else ""
    return f"{outcome}{kind}{reason}"


def _end_facts(data: dict) -> str:
    """Attempts, the deadline and the queue time of a finished task, when the event says them."""
    facts = []
    if isinstance(data.get("attempts"), int):
        facts.append(f"{data['attempts']} attempt{'s' if data['attempts'] != 1 else ''}")
    if isinstance(data.get("deadline_seconds"), int):
        facts.append(f"deadline {data['deadline_seconds']} s from the first start")
    if isinstance(data.get("queued_seconds"), (int, float)):
        facts.append(f"queued {_duration(data['queued_seconds'])} before its first start")
    return ", ".join(facts)


def _snapshot(data: dict) -> str:
    if data.get("final"):
        where = data.get("archive_key") or data.get("key")
        line = "snapshot: final" + (f" {where}" if where else "") + _size(data.get("archive_size") or data.get("size"))
        push = data.get("push")
        if isinstance(push, dict) and push.get("branch"):
            line += f"; pushed branch {push['branch']} at {str(push.get('commit') or '')[:12]}"
        elif data.get("push_error"):
            line += f"; push failed: {data['push_error']}"
        return line
    if not data.get("key"):
        return "snapshot: nothing to snapshot yet"
    return f"snapshot: {data['key']}{_size(data.get('size'))}" + ("" if data.get("uploaded", True) else " (unchanged)")


def _result(data: dict) -> str:
    summary = f" - {_one_line(data['summary'])}" if data.get("summary") else ""
    return f"result: {data.get('outcome') or 'unknown'}{summary}"


def _message(data: dict) -> str:
    return f"> message to the agent: {_one_line(str(data.get('text') or ''))}"


def _warning(data: dict) -> str:
    text = data.get("message") or data.get("text") or _compact(data, drop=("type", "task_id", "ts"))
    return f"! warning: {_one_line(str(text))}"


def _usage(data: dict) -> str:
    """A model call as the model gateway counted it, with the task's running totals."""
    totals = data.get("totals") if isinstance(data.get("totals"), dict) else {}
    if data.get("refused"):
        return f"! model gateway refused a call: {_one_line(str(data['refused']))}"
    cached = f" ({data.get('cached_tokens')} cached)" if data.get("cached_tokens") else ""
    cost = f", ${data.get('cost_usd'):.4f}" if isinstance(data.get("cost_usd"), (int, float)) and data.get("cost_usd") else ""
    seconds = data.get("latency_ms") / 1000 if isinstance(data.get("latency_ms"), (int, float)) else 0.0
    task = f"; task {totals.get('tokens')} tokens" if totals.get("tokens") is not None else ""
    return (f"usage: {_one_line(str(data.get('model') or '?'), 40)} {data.get('input_tokens', 0)} in{cached} / "
            f"{data.get('output_tokens', 0)} out, {seconds:.1f}s{cost}{task}")


def _thought(data: dict) -> str | None:
    """A model turn: its text's first line, how long it took, its tokens; nothing for the call's start."""
    if data.get("open"):
        return None
    took = f"{_count(data.get('latency_ms')) / 1000:.1f}s"
    if data.get("error"):
        return f"! model call failed after {took}: {_one_line(str(data['error']))}"
    facts = [took]
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    if usage:
        facts.append(f"{_count(usage.get('input_tokens'))} in / {_count(usage.get('output_tokens'))} out")
    calls = _count(data.get("tool_calls"))
    if calls:
        facts.append(f"{calls} tool call{'s' if calls != 1 else ''}")
    lines = [line for line in str(data.get("text") or "").splitlines() if line.strip()]
    said = _one_line(lines[0]) + (" [...]" if len(lines) > 1 else "") if lines else "(no text)"
    return f"~ {said} ({', '.join(facts)})"


def _log(data: dict) -> str:
    ts = str(data.get("ts") or "")
    clock = ts[11:19] if len(ts) >= 19 else ts
    level = str(data.get("level") or "INFO")
    line = f"{clock} {level:<7} {data.get('logger') or '-'}: {data.get('msg', '')}".rstrip()
    if data.get("exc"):
        line += "\n" + "\n".join("    " + row for row in str(data["exc"]).splitlines()[-5:])
    return line


_RENDERERS = {
    contract.EV_PHASE: _phase,
    contract.EV_TOOL: _tool,
    contract.EV_TODO: _todo,
    contract.EV_STATUS: _status,
    contract.EV_SNAPSHOT: _snapshot,
    contract.EV_RESULT: _result,
    contract.EV_MESSAGE: _message,
    contract.EV_WARNING: _warning,
    contract.EV_USAGE: _usage,
    contract.EV_THOUGHT: _thought,
}


# --- helpers ---------------------------------------------------------------------


def _one_line(text: Any, width: int = WIDTH) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _compact(data: Any, drop: tuple[str, ...] = ()) -> str:
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in drop}
    return _one_line(json.dumps(data, separators=(",", ":"), default=str))


def _count(value: Any) -> int | float:
    """A count or duration from an event, 0 when it is missing or not a non-negative number."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        return (datetime.fromisoformat(str(end).replace("Z", "+00:00")) - datetime.fromisoformat(str(start).replace("Z", "+00:00"))).total_seconds()
    except (ValueError, TypeError):
        return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _size(size: Any) -> str:
    if not isinstance(size, (int, float)) or size <= 0:
        return ""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f" ({size:.0f} {unit})" if unit == "B" else f" ({size:.1f} {unit})"
        size /= 1024
    return f" ({size:.1f} GiB)"
