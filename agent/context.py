"""What the model sees of a conversation: a window of the transcript that stays under a token budget.

A conversation (STRATEGIC's, or one TACTICAL phase's) is shown as its first message (the task, or the
objective: never dropped), the summary of what was compacted (if any), then its messages from `start` on.
Before a model call, a window over its budget is compacted: the older turns are folded into the summary
(one line per call, answer and report) and the tool outputs still shown are cut to head and tail, until the
window is under half its budget, so compactions are rare and each buys room for many turns.

The summary is mechanical, not written by the model: a model call to summarise would cost a turn of the
budget, could fail, and would change what a scripted run replays. Tokens are estimated
(`agent.transcript.estimate_tokens`), so the budget leaves the model's real limit some room.

A `View` is a few integers in the graph state; the text lives in the transcript (agent.transcript).
"""

from __future__ import annotations

import json
from typing import TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from agent.transcript import SUMMARY, Row, Transcript

NO_SUMMARY = -1
LINE_CHARS = 240  # one summary line per message


class View(TypedDict):
    first: int  # the row shown first, always
    summary: int  # the summary row, or NO_SUMMARY
    start: int  # messages from here on are shown
    cut_below: int  # tool outputs before this row are shown cut to head and tail
    cut_tokens: int  # the estimated size of the messages in [start, cut_below), as shown


def new_view(first: int) -> View:
    return {"first": first, "summary": NO_SUMMARY, "start": first + 1, "cut_below": first + 1, "cut_tokens": 0}


class Budget:
    """Sizes derived from one figure, the context budget in tokens."""

    def __init__(self, tokens: int):
        self.tokens = int(tokens)
        self.target = self.tokens // 2  # a compaction leaves the window under this
        self.summary_chars = self.tokens * 4 // 8  # the summary keeps its newest lines within an eighth
        self.cut_output_chars = max(self.tokens * 4 // 16, 1000)  # a compacted tool output: head and tail


def messages(transcript: Transcript, conversation: str, view: View, end: int, budget: Budget) -> list[BaseMessage]:
    """The messages the model sees, in order."""
    transcript.forget_before(conversation, view["start"])
    shown = [transcript.row(view["first"]).message]
    if view["summary"] != NO_SUMMARY:
        shown.append(transcript.row(view["summary"]).message)
    shown += [row.cut(budget.cut_output_chars) for row in transcript.rows(conversation, view["start"], view["cut_below"])]
    return shown + [row.message for row in transcript.rows(conversation, view["cut_below"], end)]


def tokens(transcript: Transcript, conversation: str, view: View, end: int) -> int:
    """The estimated size of what the model sees."""
    total = transcript.row(view["first"]).tokens + view["cut_tokens"]
    if view["summary"] != NO_SUMMARY:
        total += transcript.row(view["summary"]).tokens
    return total + transcript.tokens(conversation, view["cut_below"], end)


def fit(transcript: Transcript, conversation: str, view: View, end: int, budget: Budget) -> tuple[View, int]:
    """`view` when it is under the budget; else compacted: a summary row written at `end`. Returns the view
    and the new end of the transcript."""
    if tokens(transcript, conversation, view, end) <= budget.tokens:
        return view, end
    rows = transcript.rows(conversation, view["start"], end)
    sizes = [row.cut_tokens(budget.cut_output_chars) for row in rows]  # as shown once compacted
    fixed = transcript.row(view["first"]).tokens + budget.summary_chars // 4 + 4
    keep_from = len(rows)
    kept = 0
    for index in range(len(rows) - 1, -1, -1):  # the newest turns that fit in the target
        kept += sizes[index]
        if fixed + kept > budget.target and keep_from < len(rows):
            break
        if not rows[index].is_tool_output:  # a turn starts at a model reply or a user message
            keep_from = index
    dropped = rows[:keep_from]
    if not dropped:  # the newest turn alone is over the target: cutting its outputs is all there is to do
        return {**view, "cut_below": end, "cut_tokens": sum(sizes)}, end
    earlier = transcript.row(view["summary"]).message.content if view["summary"] != NO_SUMMARY else ""
    summary = HumanMessage(content=_summary_text(str(earlier), dropped, budget))
    end_after = transcript.write(end, [(conversation, summary)], kind=SUMMARY)
    start = rows[keep_from].seq if keep_from < len(rows) else end_after
    compacted: View = {"first": view["first"], "summary": end, "start": start, "cut_below": end, "cut_tokens": sum(sizes[keep_from:])}
    return compacted, end_after


HEADER = "Summary of the earlier turns of this conversation (compacted to fit the context):"


def _summary_text(earlier: str, dropped: list[Row], budget: Budget) -> str:
    """The earlier summary's lines and one line per dropped message; the oldest lines go first when over."""
    lines = [line for line in earlier.splitlines()[1:] if not line.startswith("[")]
    lines += [line for row in dropped for line in _lines(row.message)]
    text_lines: list[str] = []
    size = len(HEADER)
    for line in reversed(lines):
        if size + len(line) + 1 > budget.summary_chars:
            text_lines.append(f"[{len(lines) - len(text_lines)} older lines dropped]")
            break
        text_lines.append(line)
        size += len(line) + 1
    return "\n".join([HEADER, *reversed(text_lines)])


def _lines(message: BaseMessage) -> list[str]:
    if isinstance(message, ToolMessage):
        status = "error" if message.status == "error" else "ok"
        first = next((line for line in str(message.content).splitlines() if line.strip()), "")
        return [_clip(f"  -> {status}: {first}")]
    lines = []
    if isinstance(message, AIMessage):
        if str(message.content).strip():
            lines.append(_clip(f"- assistant: {message.content}"))
        lines += [_clip(f"- call {call['name']}({json.dumps(call['args'])})") for call in message.tool_calls]
        return lines
    return [_clip(f"- user: {message.content}")]


def _clip(line: str) -> str:
    line = " ".join(line.split())
    return line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"
