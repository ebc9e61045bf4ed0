"""Every name the orchestrator (`functions`) and the agent share.

One name, one place: event types, NATS subjects, stream and bucket names,
Kubernetes labels, storage keys, paths and exit codes live here and nowhere
else. Manifests in `knative/` and `eventing/` are checked against this module
by tests. This module imports nothing from the project.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

# --- distribution -----------------------------------------------------------
DISTRIBUTION = "dockyard"

# --- task ids ---------------------------------------------------------------
TASK_ID_MAX = 40
TASK_ID_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # used with fullmatch: `$` would allow a trailing "\n"


def is_valid_task_id(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= TASK_ID_MAX and bool(TASK_ID_PATTERN.fullmatch(value))


# Any C0 control (NUL, CR, LF, ESC, ...), DEL or C1 control: never part of an identifier, URL or ref.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A scripted model is named by a bare file name in the scripts directory, never a path.
SCRIPT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.(yaml|yml|json))?")
SCRIPTED_PROVIDER = "scripted"
# The providers a model spec may name besides `scripted` (agent/models.py loads them; the cockpit's form checks them).
MODEL_PROVIDERS = ("openai", "anthropic", "ollama", "vllm", "openai-compatible")


def has_control_chars(value: str) -> bool:
    return bool(CONTROL_CHARS.search(value))


def is_valid_script_name(name: str) -> bool:
    """`example`, `gated`, `turns.yaml`: no path separator, no '..', no control character."""
    return len(name) <= 100 and bool(SCRIPT_NAME_PATTERN.fullmatch(name))


def derive_task_id(source: str, event_id: str) -> str:
    """A task id that is the same for every delivery of one CloudEvent."""
    digest = hashlib.sha256(f"{source}\x00{event_id}".encode()).hexdigest()
    return f"t-{digest[:16]}"


# --- CloudEvents ------------------------------------------------------------
EVENT_TASK_SUBMITTED = "dev.dockyard.task.submitted"
EVENT_TASK_COMMAND = "dev.dockyard.task.command"
EVENT_JOB_UPDATE = "dev.knative.apiserver.resource.update"
EVENT_PING = "dev.knative.sources.ping"
EVENT_SOURCE_CLI = "dockyard/cli"
EVENT_SOURCE_LOCAL_RUNTIME = "dockyard/runtime/local"


# --- NATS -------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream's configuration as plain data, defined once below.

    The agent's telemetry and `functions.core.bus.ensure_stream` both create the
    stream from it with `StreamConfig(**spec.config())`: the same bytes go to the
    server from either side, so whichever creates it first, the other finds an
    identical configuration. Field names and units (seconds) are nats-py's.
    """

    name: str
    subjects: tuple[str, ...]
    max_age_seconds: float
    duplicate_window_seconds: float
    storage: str = "file"
    retention: str = "limits"
    discard: str = "old"
    num_replicas: int = 1

    def config(self, max_age_seconds: float | None = None) -> dict:
        """Keyword arguments for `nats.js.api.StreamConfig`; `max_age_seconds` overrides the default age.

        The duplicate window is capped at the max age (the server refuses a longer one)."""
        max_age = self.max_age_seconds if max_age_seconds is None else max_age_seconds
        return {
            "name": self.name,
            "subjects": list(self.subjects),
            "retention": self.retention,
            "discard": self.discard,
            "storage": self.storage,
            "num_replicas": self.num_replicas,
            "max_age": max_age,
            "duplicate_window": min(self.duplicate_window_seconds, max_age),
        }


AGENT_STREAM = StreamSpec(
    name="AGENT",
    subjects=("logs.agent.>", "events.agent.>"),
    max_age_seconds=7 * 24 * 3600,
    # The agent re-sends unacknowledged records after a reconnect with their original
    # Nats-Msg-Id; this window drops the ones already stored. It must outlast the agent's
    # hold of records during an outage (30 s) plus an ack timeout (5 s).
    duplicate_window_seconds=120,
)
STREAM_NAME = AGENT_STREAM.name
STREAM_SUBJECTS = AGENT_STREAM.subjects
STREAM_MAX_AGE_SECONDS = AGENT_STREAM.max_age_seconds
KV_BUCKET = "dockyard-tasks"


def subject_cmd(task_id: str) -> str:
    return f"cmd.agent.{task_id}"


def subject_events(task_id: str) -> str:
    return f"events.agent.{task_id}"


def subject_logs(task_id: str) -> str:
    return f"logs.agent.{task_id}"


def inbox_prefix(task_id: str) -> str:
    """The reply inbox of a task's processes (`_INBOX.<id>.<nuid>...`): its credentials may subscribe there only."""
    return f"_INBOX.{task_id}"


def command_reply_prefix(task_id: str) -> str:
    """Where the answers to a task's commands go (`_INBOX.<id>.cmd.<nuid>`): the task's agent user may publish
    there. A requester's own `_INBOX.<nuid>` would do for a direct client (its response permission), but not
    through the pod's leaf node: interest crosses a leaf connection only on subjects its user may publish."""
    return f"{inbox_prefix(task_id)}.cmd"


# Event kinds published on events.agent.<id> (field "type" of the JSON body).
EV_STATUS = "status"
EV_PHASE = "phase"
EV_TOOL = "tool"
EV_TODO = "todo"
EV_SNAPSHOT = "snapshot"
EV_RESULT = "result"
EV_MESSAGE = "message"
EV_WARNING = "warning"
EV_USAGE = "usage"  # published by the model gateway, one per model call
EV_THOUGHT = "thought"  # the agent, per model turn: `open: true` when the call starts, then its text and usage

# Values of "state" in status events and in the KV entry.
STATE_QUEUED = "queued"
STATE_STARTED = "started"
STATE_RESUMED = "resumed"
STATE_RETRYING = "retrying"
STATE_INTERRUPTED = "interrupted"  # stopped by SIGTERM after a step; resumes on the next start
STATE_FINISHED = "finished"
TERMINAL_STATES = (STATE_FINISHED,)

# Outcomes of a finished task.
OUTCOME_DONE = "done"
OUTCOME_FAILED = "failed"
OUTCOME_CANCELLED = "cancelled"
OUTCOME_BUDGET = "budget_exhausted"
OUTCOME_DEADLINE = "deadline"

# Classes of a failed (or stopped) outcome: whether running the task again can help.
FAILURE_FATAL = "fatal"  # a clone that cannot work, a bad model or provider, a missing key, a budget: never retried
FAILURE_TRANSIENT = "transient"  # anything else: a crash, an eviction, a deadline

# --- phases -----------------------------------------------------------------
PHASE_STRATEGIC = "STRATEGIC"
PHASE_TACTICAL = "TACTICAL"

# --- agent exit codes -------------------------------------------------------
EXIT_DONE = 0  # finished, or stopped by a budget with a clear outcome
EXIT_RETRY = 1  # anything unexpected: the Job retries (backoffLimit)
EXIT_FATAL = 3  # bad configuration, rejected credentials: never retried (podFailurePolicy FailJob)
EXIT_CANCELLED = 4  # cancelled by command: not retried either
EXIT_INTERRUPTED = 143  # SIGTERM: stopped cleanly after the current step, resume later
NO_RETRY_EXIT_CODES = (EXIT_FATAL, EXIT_CANCELLED)

# --- Kubernetes -------------------------------------------------------------
AGENTS_NAMESPACE = "dockyard-agents"
FUNCTIONS_NAMESPACE = "dockyard"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_TASK_ID = "dockyard.dev/task-id"
ANNOTATION_TASK = "dockyard.dev/task"
MANAGED_BY = "dockyard"
COMPONENT_AGENT = "agent"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def job_name(task_id: str) -> str:
    return f"agent-{task_id}"


def pvc_name(task_id: str) -> str:
    return f"workspace-{task_id}"


def agent_labels(task_id: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT_AGENT, LABEL_TASK_ID: task_id}


# --- paths in the pod and in a local workspace ------------------------------
WORKSPACE_MOUNT = "/workspace"
SECRETS_DIR = "/var/secrets"
HOME_DIR = "/home/agent"
PYTHONUSERBASE = "/home/agent/.local"
TASK_FILE = "/etc/dockyard/task.json"
CHECKPOINT_DIR = "checkpoints"  # relative to the workspace
REPO_DIR = "repo"  # where a task's repository is cloned, relative to the workspace
HEARTBEAT_FILE = ".dockyard/heartbeat"  # relative to the workspace
RESULT_FILE = ".dockyard/result.json"  # written by the agent when it exits
MODEL_GATEWAY_PORT = 8790  # the pod's model gateway sidecar, on the pod's loopback
GATEWAY_TOKEN_FILE = "gateway.token"  # the task's model gateway token, relative to the agent's secrets directory
OUTPUTS_DIR = ".dockyard/outputs"  # each tool call's full output, relative to the workspace (agent.outputs)
OUTPUTS_MAX_BYTES = 200_000_000  # all of a task's outputs together, default of DOCKYARD_OUTPUTS_MAX_BYTES
STARTED_AT_FILE = ".dockyard/started_at"  # the agent's first start (epoch seconds): its deadline counts from here
_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def output_file(call_id: str) -> str:
    """Where a tool call's full output is kept, relative to the workspace: the call id made file-safe
    ([A-Za-z0-9_.-], at most 128 characters, never a hidden name, `.` or `..`)."""
    name = _UNSAFE_IN_FILE_NAME.sub("_", call_id)[:128]
    if not name or name.startswith("."):
        name = "_" + name[1:]
    return f"{OUTPUTS_DIR}/{name}.log"


def checkpoint_path(task_id: str) -> str:
    """Checkpoint database, relative to the workspace."""
    return f"{CHECKPOINT_DIR}/job_{task_id}.db"


# --- object storage keys ----------------------------------------------------
def checkpoints_prefix(task_id: str) -> str:
    return f"jobs/{task_id}/checkpoints/"


def checkpoint_key(task_id: str, when: datetime | None = None) -> str:
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    # Lexical order equals time order, so "newest" is the max key.
    return f"{checkpoints_prefix(task_id)}{when.strftime('%Y%m%dT%H%M%S.%fZ')}.db"


def final_archive_key(task_id: str) -> str:
    return f"jobs/{task_id}/final/workspace.tar.gz"


def final_result_key(task_id: str) -> str:
    return f"jobs/{task_id}/final/result.json"


# --- environment variables read by the agent CLI ----------------------------
ENV_PREFIX = "DOCKYARD_"


def iso_utc(ts: float | None = None) -> str:
    """The one format of every `ts` field: ISO-8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    ts = time.time() if ts is None else ts
    sec = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{int((ts - sec) * 1000):03d}Z"
