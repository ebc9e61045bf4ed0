"""Who may call the model gateway for which task, and within which limits.

One gateway can serve many tasks (`dockyard dev`: one per dev stack) or one (the pod's sidecar).
A task's grant is `<grants dir>/<task_id>.json`, `{task_id, token_sha256, max_tokens?, max_cost_usd?}`,
written by the launcher (mode 0600, in a 0700 directory the agents' commands cannot see) each time the
task is admitted; the token itself goes to the task's agent only (its own secrets folder).

Invariants
- A token works for its own task only: it names the task (`dyg.<task_id>.<secret>`) and the gateway
  compares the sha256 of the whole token with the grant's, in constant time. Reading a grant gives no token.
- A grant that is missing or unreadable grants nothing (401).
- This module imports nothing from the project but `agent.contract`: the launcher (`functions`) writes
  grants with it, the gateway reads them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from agent import contract

TOKEN_PREFIX = "dyg"


@dataclass(frozen=True)
class Grant:
    task_id: str
    token_sha256: str = ""  # empty: no token needed (the pod's sidecar, reached on the pod's loopback only)
    max_tokens: int | None = None
    max_cost_usd: float | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if v is not None})

    @classmethod
    def from_json(cls, text: str) -> "Grant":
        data = json.loads(text)
        if not isinstance(data, dict) or not contract.is_valid_task_id(data.get("task_id")):
            raise ValueError("a grant needs a valid task_id")
        tokens, cost = data.get("max_tokens"), data.get("max_cost_usd")
        return cls(
            task_id=data["task_id"],
            token_sha256=str(data.get("token_sha256") or ""),
            max_tokens=int(tokens) if tokens is not None else None,
            max_cost_usd=float(cost) if cost is not None else None,
        )


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(task_id: str) -> str:
    """A fresh token for `task_id` (256 random bits)."""
    return f"{TOKEN_PREFIX}.{task_id}.{secrets.token_urlsafe(32)}"


def task_of(token: str) -> str | None:
    """The task a token names, or None when it is not a gateway token."""
    prefix, _, rest = token.partition(".")
    task_id, _, secret = rest.partition(".")
    return task_id if prefix == TOKEN_PREFIX and secret and contract.is_valid_task_id(task_id) else None


def matches(grant: Grant, token: str) -> bool:
    return bool(grant.token_sha256) and hmac.compare_digest(grant.token_sha256, sha256(token))


def grant_path(grants_dir: Path, task_id: str) -> Path:
    return Path(grants_dir) / f"{task_id}.json"


def write_grant(grants_dir: Path, grant: Grant) -> None:
    """Atomically, readable by this user only."""
    grants_dir = Path(grants_dir)
    grants_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = grant_path(grants_dir, grant.task_id)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(grant.to_json())
    os.replace(tmp, path)


def read_grant(grants_dir: Path, task_id: str) -> Grant | None:
    try:
        return Grant.from_json(grant_path(grants_dir, task_id).read_text())
    except (OSError, ValueError):
        return None
