"""A task as submitted: validation of untrusted input into a `Task`.

Invariant: a `Task` that exists is valid. Every rejection is a `BadInput`
naming the field and what to do, so the edge can answer 4xx and launch nothing.
Lineage (`from`, a retry or fork) is checked for form here (`parse_from`); the
handler looks the parent up, fills in what the data leaves out (`inherit`) and
then parses the result as any task, so an inherited field is validated too.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

from agent import contract
from functions.errors import BadInput

MAX_PROMPT_BYTES = 64 * 1024
REPO_SCHEMES = ("https", "ssh", "file")  # file: only with allow_file_repos
MAX_COST_USD = 100_000.0  # limits.max_cost_usd: a number, not a typo of a few more zeros
PUSH_SCHEMES = ("https", "file")  # repo.push: credentials go over https only (file: a dev machine's repository)
PUSH_BRANCH_MAX = 200

WORKSPACE_RESTORE = "restore"  # from.workspace: start in the parent's final workspace (fork)
WORKSPACE_FRESH = "fresh"  # ... or in an empty one, the parent's spec run again (retry)
INHERITED_FIELDS = ("prompt", "repo", "model", "limits")  # taken from the parent's spec when the data omits them


@dataclass(frozen=True)
class Limits:
    deadline_seconds: int
    retries: int
    storage: str
    max_tokens: int | None = None  # the model gateway refuses calls once the task used this many tokens
    max_cost_usd: float | None = None  # ... or spent this much (estimated from the price table)


@dataclass(frozen=True)
class LimitsPolicy:
    """Defaults and maxima for task limits; from the settings of the process."""

    default_deadline_seconds: int = 3600
    max_deadline_seconds: int = 24 * 3600
    default_retries: int = 3
    max_retries: int = 10
    default_storage: str = "5Gi"
    max_storage_gi: int = 100
    default_max_tokens: int | None = None  # None: no token budget unless the task sets one
    max_max_tokens: int = 1_000_000_000


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    limits: Limits
    repo: dict | None = None  # {"url": ..., "ref": ...}
    model: str | None = None
    extra: dict = field(default_factory=dict, compare=False)
    # Lineage: {"task_id", "snapshot" (a key under the parent's checkpoints/, or None), "workspace"}.
    parent: dict | None = None

    def to_dict(self) -> dict:
        data = {
            "task_id": self.task_id,
            "prompt": self.prompt,
            "limits": {
                "deadline_seconds": self.limits.deadline_seconds,
                "retries": self.limits.retries,
                "storage": self.limits.storage,
            },
        }
        # Only when set: the spec hash of a task without them stays what it was.
        if self.limits.max_tokens is not None:
            data["limits"]["max_tokens"] = self.limits.max_tokens
        if self.limits.max_cost_usd is not None:
            data["limits"]["max_cost_usd"] = self.limits.max_cost_usd
        if self.repo:
            data["repo"] = dict(self.repo)
        if self.model:
            data["model"] = self.model
        if self.parent:
            data["from"] = dict(self.parent)
        return data

    @property
    def restores_parent(self) -> bool:
        """A fork: the restore step brings the parent's workspace (and conversation) into this task's."""
        return bool(self.parent) and self.parent.get("workspace") == WORKSPACE_RESTORE

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def spec_hash(self) -> str:
        """Identifies the spec: a redelivery has the same hash, a reuse of the id does not."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _storage_gi(value: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            number = value[: -len(suffix)]
            if number.isdigit() and int(number) > 0:
                return int(number) * factor
    raise BadInput(f"limits.storage {value!r} is not a size like '5Gi' or '512Mi'", "limits.storage")


def _int_field(limits: dict, name: str, default: int, maximum: int, minimum: int) -> int:
    value = limits.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"limits.{name} must be an integer", f"limits.{name}")
    if not minimum <= value <= maximum:
        raise BadInput(f"limits.{name} must be between {minimum} and {maximum}, got {value}", f"limits.{name}")
    return value


def parse_task(
    data: object, *, source: str, event_id: str, policy: LimitsPolicy | None = None, allow_file_repos: bool = False
) -> Task:
    """Validate the data of a task.submitted event; derive the id from the event when absent.
    `file://` repositories are refused unless `allow_file_repos` (`dockyard dev --allow-file-repos`)."""
    policy = policy or LimitsPolicy()
    if not isinstance(data, dict):
        raise BadInput("event data must be a JSON object with at least 'prompt'", "data")
    return Task(  # fields checked in this order: the first fault is the one reported
        prompt=_prompt(data.get("prompt")),
        task_id=_task_id(data.get("task_id"), source, event_id),
        repo=_repo(data.get("repo"), allow_file_repos),
        model=_model(data.get("model")),
        limits=_limits(data.get("limits"), policy),
    )


def parse_from(value: object) -> dict:
    """The `from` field of a task.submitted event, checked for form only: {task_id, snapshot?, workspace}.
    Whether the parent and its snapshot exist is the handler's question (the registry and the store)."""
    if not isinstance(value, dict):
        raise BadInput('from must be an object {"task_id", "snapshot"?, "workspace"?: "restore"|"fresh"}', "from")
    unknown = sorted(set(value) - {"task_id", "snapshot", "workspace"})
    if unknown:
        raise BadInput(f"from has unknown field(s) {', '.join(map(repr, unknown))}; use task_id, snapshot, workspace", f"from.{unknown[0]}")
    task_id = value.get("task_id")
    if not contract.is_valid_task_id(task_id):
        raise BadInput("from.task_id must name an existing task (a task id like the one `dockyard submit` printed)", "from.task_id")
    workspace = value.get("workspace", WORKSPACE_RESTORE)
    if workspace not in (WORKSPACE_RESTORE, WORKSPACE_FRESH):
        raise BadInput(f'from.workspace must be "{WORKSPACE_RESTORE}" (fork: start in the parent\'s workspace) '
                       f'or "{WORKSPACE_FRESH}" (retry: start empty)', "from.workspace")
    snapshot = value.get("snapshot")
    if snapshot is not None:
        if not isinstance(snapshot, str) or not snapshot or len(snapshot) > 512:
            raise BadInput("from.snapshot must be the key or the name of one of the parent's snapshots", "from.snapshot")
        _no_control(snapshot, "from.snapshot")
        if workspace == WORKSPACE_FRESH:
            raise BadInput('from.snapshot chooses where a fork starts; a "fresh" retry takes none', "from.snapshot")
    return {"task_id": task_id, "snapshot": snapshot, "workspace": workspace}


def inherit(data: dict, parent_spec: dict) -> dict:
    """The child's data: each of INHERITED_FIELDS the data does not give, as the parent's spec has it."""
    merged = dict(data)
    for name in INHERITED_FIELDS:
        if merged.get(name) is None and parent_spec.get(name) is not None:
            merged[name] = parent_spec[name]
    return merged


def with_parent(task: Task, parent: dict) -> Task:
    """`task` with its lineage recorded (the snapshot resolved to a key, or None)."""
    return replace(task, parent={"task_id": parent["task_id"], "snapshot": parent.get("snapshot"), "workspace": parent["workspace"]})


def restore_parent_args(task: Task, task_file: str) -> list[str]:
    """A fork's restore also brings its parent's workspace and conversation (agent/restore.py); the task
    file gives it the new instruction."""
    if not task.restores_parent:
        return []
    snapshot = task.parent.get("snapshot")
    return ["--parent", task.parent["task_id"], *(["--parent-snapshot", snapshot] if snapshot else []), "--task-file", task_file]


def _prompt(prompt: object) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput("prompt is required: a non-empty string describing the task", "prompt")
    if len(prompt.encode()) > MAX_PROMPT_BYTES:
        raise BadInput(f"prompt is larger than {MAX_PROMPT_BYTES} bytes; shorten it or put details in the repo", "prompt", 413)
    return prompt


def _no_control(value: str, name: str) -> str:
    if contract.has_control_chars(value):
        raise BadInput(f"{name} must not contain control characters (NUL, newline, ESC, ...)", name)
    return value


def _task_id(task_id: object, source: str, event_id: str) -> str:
    if task_id is None:
        return contract.derive_task_id(source, event_id)
    if isinstance(task_id, str):
        _no_control(task_id, "task_id")
    if not contract.is_valid_task_id(task_id):
        raise BadInput(
            f"task_id must be 1-{contract.TASK_ID_MAX} characters of lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (a DNS-1123 label); omit it to have one derived",
            "task_id",
        )
    return task_id


def _repo(repo: object, allow_file_repos: bool = False) -> dict | None:
    if repo is None:
        return None
    if isinstance(repo, str):
        repo = {"url": repo}
    if not isinstance(repo, dict) or not isinstance(repo.get("url"), str):
        raise BadInput("repo must be an object {url, ref?}", "repo")
    url = _no_control(repo["url"], "repo.url")
    scheme = urlparse(url).scheme
    if scheme not in REPO_SCHEMES and not url.startswith("git@"):
        raise BadInput(f"repo.url scheme must be one of {', '.join(REPO_SCHEMES)}", "repo.url")
    if scheme == "file" and not allow_file_repos:
        raise BadInput(
            "repo.url: file:// repositories are disabled; clone over https or ssh "
            "(on one machine, start `dockyard dev --allow-file-repos`)", "repo.url", 400)
    ref = repo.get("ref")
    if ref is not None and (not isinstance(ref, str) or not ref or ref.startswith("-")):
        raise BadInput("repo.ref must be a branch, tag or commit name", "repo.ref")
    if ref:
        _no_control(ref, "repo.ref")
    push = _push(repo["push"], scheme) if repo.get("push") not in (None, False) else None
    return {"url": url, **({"ref": ref} if ref else {}), **({"push": push} if push is not None else {})}


def _push(push: object, scheme: str) -> dict:
    """`repo.push: {branch?}`: deliver the change set as a branch. Without a branch the finalizer names it
    `dockyard/<task-id>` (left out here, so a retry or fork of the task pushes its own branch)."""
    if push is True:
        push = {}
    if not isinstance(push, dict) or set(push) - {"branch"}:
        raise BadInput("repo.push must be an object {branch?} (or true)", "repo.push")
    if scheme not in PUSH_SCHEMES:
        raise BadInput(f"repo.push: pushing needs an {' or '.join(PUSH_SCHEMES)} repo.url", "repo.push")
    branch = push.get("branch")
    if branch is None:
        return {}
    if not isinstance(branch, str) or not _valid_branch(branch):
        raise BadInput(
            f"repo.push.branch must be a git branch name (at most {PUSH_BRANCH_MAX} characters; no '..', '@{{', "
            "control characters, spaces or any of ~^:?*[\\; not starting with '-' or '/', not 'HEAD')", "repo.push.branch")
    return {"branch": branch}


def _valid_branch(name: str) -> bool:
    """`git check-ref-format --branch` rules for `refs/heads/<name>`, checked here (no process)."""
    if not name or len(name) > PUSH_BRANCH_MAX or name == "HEAD" or name.startswith("-") or name == "@":
        return False
    if contract.has_control_chars(name) or any(ch in name for ch in " ~^:?*[\\\x7f"):
        return False
    if ".." in name or "@{" in name or "//" in name or name.startswith("/") or name.endswith(("/", ".")):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in name.split("/"))


def _model(model: object) -> str | None:
    if model is None:
        return None
    if not isinstance(model, str) or ":" not in model:
        raise BadInput("model must look like 'provider:model' (e.g. 'openai:gpt-4o' or 'scripted:example')", "model")
    _no_control(model, "model")
    provider, _, name = model.partition(":")
    known = (contract.SCRIPTED_PROVIDER, *contract.MODEL_PROVIDERS)
    if provider not in known or not name:
        raise BadInput(f"model: the provider must be one of {', '.join(known)}, then ':' and a model name "
                       f"(got {model[:80]!r})", "model")
    if provider == contract.SCRIPTED_PROVIDER and not contract.is_valid_script_name(name):
        raise BadInput(
            "model: a scripted model is named by a file in the scripts directory (DOCKYARD_SCRIPTS_DIR), "
            "e.g. 'scripted:example' or 'scripted:turns.yaml', never by a path", "model")
    return model


def _limits(limits: object, policy: LimitsPolicy) -> Limits:
    if limits is None:
        limits = {}
    if not isinstance(limits, dict):
        raise BadInput("limits must be an object {deadline_seconds?, retries?, storage?, max_tokens?, max_cost_usd?}", "limits")
    deadline = _int_field(limits, "deadline_seconds", policy.default_deadline_seconds, policy.max_deadline_seconds, 1)
    retries = _int_field(limits, "retries", policy.default_retries, policy.max_retries, 0)
    storage = limits.get("storage", policy.default_storage)
    if not isinstance(storage, str):
        raise BadInput("limits.storage must be a string like '5Gi'", "limits.storage")
    if _storage_gi(storage) > policy.max_storage_gi:
        raise BadInput(f"limits.storage must be at most {policy.max_storage_gi}Gi", "limits.storage")
    max_tokens = policy.default_max_tokens
    if limits.get("max_tokens") is not None:
        max_tokens = _int_field(limits, "max_tokens", 0, policy.max_max_tokens, 1)
    return Limits(deadline_seconds=deadline, retries=retries, storage=storage, max_tokens=max_tokens, max_cost_usd=_cost(limits.get("max_cost_usd")))


def _cost(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= MAX_COST_USD:
        raise BadInput(f"limits.max_cost_usd must be a number of US dollars above 0 and at most {MAX_COST_USD:g}", "limits.max_cost_usd")
    return float(value)
