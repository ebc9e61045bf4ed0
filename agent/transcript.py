"""The run's transcript: every message of both conversations, written once, beside the checkpoint.

Why a table of our own: LangGraph's SqliteSaver writes every channel value in full at every step, so a
message list in the graph state makes each step rewrite the whole conversation (the bytes written grow
with the square of the steps). Here the state holds counters and the bounds of what the model sees
(`agent.context.View`); each message is a row, written once.

Invariants:
- A row's `seq` is its position in the run; the state's `transcript_len` counts the rows that belong to
  the run. A node writes its rows at `transcript_len` before it returns; when the process dies before that
  step's checkpoint, the step runs again and writes the same positions again (INSERT OR REPLACE), so a row
  past `transcript_len` is never read and never kept twice.
- The rows live in the checkpoint's SQLite file and are committed before the checkpoint that counts them:
  a snapshot (one online backup of that file) holds both, consistent with each other.
- A run reads only the windows of its next model call; memory holds what they show and forgets the rows a
  window has moved past (`forget_before`), so neither memory nor reads grow with the run.
"""

from __future__ import annotations

import json
import sqlite3
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

from langchain_core.messages import BaseMessage, ToolMessage, message_to_dict, messages_from_dict

from agent.execute import cap_text

MESSAGE = "message"
SUMMARY = "summary"  # what a compaction wrote in place of older rows (see agent.context)
SINGLES_KEPT = 64  # rows looked up one by one (first messages, summaries, replies) kept in memory

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS transcript ("
    " seq INTEGER PRIMARY KEY, conversation TEXT NOT NULL, kind TEXT NOT NULL,"
    " tokens INTEGER NOT NULL, message TEXT NOT NULL);"
    "CREATE INDEX IF NOT EXISTS transcript_by_conversation ON transcript (conversation, seq);"
)
_COLUMNS = "seq, conversation, kind, tokens, message"


def estimate_tokens(message: BaseMessage) -> int:
    """About four characters per token, plus a little per message (no tokenizer: which one depends on the model)."""
    content = message.content if isinstance(message.content, str) else json.dumps(message.content)
    calls = getattr(message, "tool_calls", None)
    return (len(content) + (len(json.dumps([c["args"] for c in calls])) if calls else 0)) // 4 + 4


@dataclass(frozen=True)
class Row:
    seq: int
    conversation: str
    kind: str
    tokens: int
    message: BaseMessage
    _cuts: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_tool_output(self) -> bool:
        return isinstance(self.message, ToolMessage)

    def cut(self, chars: int) -> BaseMessage:
        """The message with a tool output cut to head and tail of `chars` (made once)."""
        if not self.is_tool_output:
            return self.message
        if chars not in self._cuts:
            self._cuts[chars] = self.message.model_copy(update={"content": cap_text(str(self.message.content), chars)})
        return self._cuts[chars]

    def cut_tokens(self, chars: int) -> int:
        return min(self.tokens, chars // 4 + 8) if self.is_tool_output else self.tokens


class _Lane:
    """One conversation's messages in memory, in order, with running token sums (so a window's size is
    two lookups, and its messages a slice, however long the window)."""

    def __init__(self, rows: list[Row], loaded_from: int):
        self.loaded_from = loaded_from
        self.seqs = [r.seq for r in rows]
        self.rows = rows
        self.prefix = [0]
        for r in rows:
            self.prefix.append(self.prefix[-1] + r.tokens)

    def append(self, row: Row) -> None:
        self.seqs.append(row.seq)
        self.rows.append(row)
        self.prefix.append(self.prefix[-1] + row.tokens)

    def truncate(self, seq: int) -> None:
        """Forget rows from `seq` on: they were written by a step that is being run again."""
        i = bisect_left(self.seqs, seq)
        del self.seqs[i:], self.rows[i:], self.prefix[i + 1 :]

    def forget_before(self, seq: int) -> None:
        i = bisect_left(self.seqs, seq)
        if i > 64 and i * 2 > len(self.seqs):  # in batches, so a moving window costs nothing per step
            del self.seqs[:i], self.rows[:i], self.prefix[:i]
            self.loaded_from = seq

    def span(self, start: int, end: int) -> tuple[int, int]:
        return bisect_left(self.seqs, start), bisect_left(self.seqs, end)


class Transcript:
    """The `transcript` table of one run's database (one task per database)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        conn.executescript(_SCHEMA)
        self._lanes: dict[str, _Lane] = {}
        self._singles: dict[int, Row] = {}

    @classmethod
    def open(cls, db_path: Path, *, autocheckpoint: bool = True) -> "Transcript":
        from agent.checkpoint import connect

        return cls(connect(db_path, autocheckpoint=autocheckpoint))

    @classmethod
    def in_memory(cls) -> "Transcript":
        return cls(sqlite3.connect(":memory:", check_same_thread=False))

    def write(self, at: int, entries: list[tuple[str, BaseMessage]], kind: str = MESSAGE) -> int:
        """Write `(conversation, message)` entries at positions `at`, `at + 1`, ... in one transaction;
        returns the position after the last."""
        rows = [Row(at + i, conversation, kind, estimate_tokens(m), m) for i, (conversation, m) in enumerate(entries)]
        if not rows:
            return at
        with self.conn:
            self.conn.executemany(
                f"INSERT OR REPLACE INTO transcript ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                [(r.seq, r.conversation, r.kind, r.tokens, json.dumps(message_to_dict(r.message))) for r in rows],
            )
        for lane in self._lanes.values():
            if lane.seqs and lane.seqs[-1] >= at:
                lane.truncate(at)
        for seq in [s for s in self._singles if s >= at]:
            del self._singles[seq]
        for row in rows:
            lane = self._lanes.get(row.conversation)
            if row.kind == MESSAGE and lane is not None:
                lane.append(row)
            elif row.kind != MESSAGE:
                self._remember(row)
        return at + len(rows)

    def row(self, seq: int) -> Row:
        for lane in self._lanes.values():
            i = bisect_left(lane.seqs, seq)
            if i < len(lane.seqs) and lane.seqs[i] == seq:
                return lane.rows[i]
        if seq in self._singles:
            return self._singles[seq]
        found = self.conn.execute(f"SELECT {_COLUMNS} FROM transcript WHERE seq = ?", (seq,)).fetchone()
        if found is None:
            raise LookupError(f"transcript row {seq} is missing: the database does not belong to this checkpoint")
        return self._remember(self._row(found))

    def rows(self, conversation: str, start: int, end: int) -> list[Row]:
        """The messages of `conversation` at positions [start, end), oldest first."""
        lane = self._lane(conversation, start, end)
        i, j = lane.span(start, end)
        return lane.rows[i:j]

    def tokens(self, conversation: str, start: int, end: int) -> int:
        """The estimated tokens of those messages."""
        lane = self._lane(conversation, start, end)
        i, j = lane.span(start, end)
        return lane.prefix[j] - lane.prefix[i]

    def all(self) -> list[Row]:
        """Every row, oldest first (for people and tests; a run reads windows)."""
        return [self._row(found) for found in self.conn.execute(f"SELECT {_COLUMNS} FROM transcript ORDER BY seq")]

    def forget_before(self, conversation: str, seq: int) -> None:
        """The conversation's window starts at `seq` now and only moves forward: rows before it may go."""
        lane = self._lanes.get(conversation)
        if lane is not None:
            lane.forget_before(seq)

    def _lane(self, conversation: str, start: int, end: int) -> _Lane:
        """The conversation's lane, read from the database the first time (or when asked for rows it forgot)."""
        lane = self._lanes.get(conversation)
        if lane is None or start < lane.loaded_from:
            query = f"SELECT {_COLUMNS} FROM transcript WHERE conversation = ? AND kind = ? AND seq >= ? AND seq < ? ORDER BY seq"
            lane = _Lane([self._row(found) for found in self.conn.execute(query, (conversation, MESSAGE, start, end))], start)
            self._lanes[conversation] = lane
        return lane

    def _remember(self, row: Row) -> Row:
        self._singles[row.seq] = row
        while len(self._singles) > SINGLES_KEPT:
            del self._singles[next(iter(self._singles))]
        return row

    @staticmethod
    def _row(found: tuple) -> Row:
        seq, conversation, kind, tokens, text = found
        return Row(seq, conversation, kind, tokens, messages_from_dict([json.loads(text)])[0])
