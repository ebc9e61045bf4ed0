"""What a client asked to be sent: `?types=` (events, logs, event types) and `?level=` (least severe log record).

Invariant: a filter decides what is sent, never the position. Filtered-out
messages advance a client's position like sent ones, so a filtered client
resumes exactly and is never sent what its filter excludes. `end` is sent
whatever the filter. Unknown names are a 400 naming the field.
"""

from __future__ import annotations

import dataclasses

from agent import contract
from functions.errors import BadInput
from functions.stream.sse import LOG_EVENT

# Log levels a client may ask for with ?level=, and how a record's "level" ranks.
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
UNKNOWN_LEVEL = LEVELS["info"]
# Every event type the agent and the functions publish: the names in agent/contract.py.
EVENT_TYPES = tuple(value for name, value in vars(contract).items() if name.startswith("EV_"))


def log_level(record: object) -> int:
    """How a log record's "level" ranks; a record without a known level counts as info."""
    level = record.get("level") if isinstance(record, dict) else None
    return LEVELS.get(level.lower(), UNKNOWN_LEVEL) if isinstance(level, str) else UNKNOWN_LEVEL


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a client asked to be sent (`?types=`, `?level=`); everything by default."""

    logs: bool = True
    events: frozenset[str] | None = None  # None: every event type
    min_level: int = 0

    @property
    def everything(self) -> bool:
        return self.logs and self.events is None and self.min_level == 0

    def passes(self, kind: str, level: int) -> bool:
        if kind == LOG_EVENT:
            return self.logs and level >= self.min_level
        return self.events is None or kind in self.events

    @classmethod
    def from_query(cls, types: str | None, level: str | None) -> Filter:
        logs, events = True, None
        if types is not None:
            names = {name.strip() for name in types.split(",") if name.strip()}
            unknown = sorted(names - {"logs", "events", *EVENT_TYPES})
            if not names or unknown:
                raise BadInput(
                    f"types: {', '.join(map(repr, unknown)) or 'empty'} unknown; use a comma list of "
                    f"'events', 'logs' or event types ({', '.join(EVENT_TYPES)})",
                    "types",
                )
            logs = "logs" in names
            events = None if "events" in names else frozenset(names - {"logs"})
        min_level = 0
        if level is not None:
            if level.lower() not in LEVELS:
                raise BadInput(f"level must be one of {', '.join(LEVELS)} (the least severe log level sent)", "level")
            min_level = LEVELS[level.lower()]
        return cls(logs, events, min_level)


EVERYTHING = Filter()
