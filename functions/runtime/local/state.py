"""A task's folder and the Job status persisted in it.

Invariants
- A task owns `<data_dir>/tasks/<id>/`: `workspace/` (the PVC), `home/` (the
  emptyDir), `task.json` (the downward-API file), `logs/`, and `supervisor.json`,
  the Job's status.
- Both files are replaced atomically (write a temporary file, then rename), so a
  process that dies at any point leaves the old version or the new one, and a
  new LocalRuntime over the same folder continues where the last one stopped.
- A folder whose name is not a valid task id holds no task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent import contract
from functions.core.task import Limits, Task

STATE_FILE = "supervisor.json"


@dataclass
class SupervisorState:
    """What `supervisor.json` holds: the Job's status and what is needed to pick it up again."""

    task_id: str
    spec_hash: str
    uid: str  # the Job's uid: one per launch, stable across restarts
    created_at: float
    state: str = contract.STATE_QUEUED
    attempts: int = 0  # agent runs started
    failures: int = 0  # attempts that count against limits.retries
    exit_codes: list[int] = field(default_factory=list)
    started_at: float | None = None  # first agent start; the deadline counts from here
    finished_at: float | None = None
    outcome: str | None = None
    reason: str | None = None  # the Job condition reason once finished
    message: str | None = None
    termination_message: str | None = None
    agent_exit: dict | None = None  # the agent container's last end, when a pod runtime knows it: reason, exitCode, signal
    event_sent: bool = False
    workspace_removed: bool = False
    pgids: dict[str, int] = field(default_factory=dict)  # live process groups, reaped after a crash
    starts: dict[str, int] = field(default_factory=dict)  # their leaders' start times (/proc/<pid>/stat): not a reused pid

    @property
    def finished(self) -> bool:
        return self.state == contract.STATE_FINISHED

    @classmethod
    def from_dict(cls, data: dict) -> SupervisorState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class TaskFolder:
    """The paths of one task's folder."""

    root: Path

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def task_file(self) -> Path:
        return self.root / "task.json"

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def result_file(self) -> Path:
        return self.workspace / contract.RESULT_FILE

    def log(self, role: str) -> Path:
        return self.logs / f"{role}.log"

    @property
    def secrets(self) -> Path:
        """The task's own credentials (mode 0700): never inside the workspace, which is snapshotted."""
        return self.root / "secrets"

    def nats_creds(self, role: str) -> Path:
        return self.secrets / f"nats-{role}.creds"


class TaskFolders:
    """`<data_dir>/tasks/`: one folder per task, read and written here only."""

    def __init__(self, tasks_dir: Path):
        self.tasks_dir = tasks_dir
        tasks_dir.mkdir(parents=True, exist_ok=True)

    def folder(self, task_id: str) -> TaskFolder:
        return TaskFolder(self.tasks_dir / task_id)

    def task_ids(self) -> Iterator[str]:
        """The names of the folders, sorted; `load` tells which hold a task."""
        for path in sorted(self.tasks_dir.iterdir()):
            yield path.name

    def create(self, task: Task, state: SupervisorState) -> TaskFolder:
        folder = self.folder(task.task_id)
        for path in (folder.workspace, folder.home, folder.logs):
            path.mkdir(parents=True, exist_ok=True)
        write_atomic(folder.task_file, task.to_json())
        self.save(state)
        return folder

    def load(self, task_id: str) -> SupervisorState | None:
        if not contract.is_valid_task_id(task_id):
            return None
        try:
            return SupervisorState.from_dict(json.loads(self.folder(task_id).state_file.read_text()))
        except FileNotFoundError:
            return None

    def save(self, state: SupervisorState) -> None:
        write_atomic(self.folder(state.task_id).state_file, json.dumps(asdict(state), indent=2, sort_keys=True))

    def load_task(self, task_id: str) -> Task:
        """The task as launched: it was validated then, so it is rebuilt as it is."""
        data = json.loads(self.folder(task_id).task_file.read_text())
        return Task(
            task_id=data["task_id"],
            prompt=data["prompt"],
            limits=Limits(**data["limits"]),
            repo=data.get("repo"),
            model=data.get("model"),
            parent=data.get("from"),
        )

    def read_result(self, task_id: str) -> dict:
        """The agent's result file, or {} while there is none (or it is unreadable)."""
        try:
            data = json.loads(self.folder(task_id).result_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
