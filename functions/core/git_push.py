"""The runtimes' part of `repo.push`: the git credentials reach the snapshotter of a pushing task, and nothing else.

Invariants
- Only a task whose spec has `repo.push` gets any of it; then only its snapshotter: in the Job, the optional
  Secret `git_push_secret` as the volume `git-credentials`, mounted read-only at `GIT_SECRETS_DIR` into the
  snapshotter alone, and the snapshotter's flags (`--push-url` from the spec, never from the workspace,
  `--push-branch`, `--git-credentials-dir`, `--push-proxy`: git's way out through the egress proxy, for the
  push alone). The local runtime gives the same flags with its credentials directory (`push_flags`).
- Optional: without the Secret (or directory) the task runs, and its result says `push_error`.
- Pure, like the factory that calls it.
"""

from __future__ import annotations

from agent import contract
from functions.core.settings import Settings
from functions.core.task import Task

GIT_SECRETS_DIR = f"{contract.SECRETS_DIR}/git"  # in the snapshotter: agent/push.py reads username, password|token, hosts
VOLUME = "git-credentials"


def pushes(task: Task) -> bool:
    return bool(task.repo) and task.repo.get("push") is not None


def push_flags(task: Task, credentials_dir: str | None, proxy: str | None = None) -> list[str]:
    """The snapshotter's flags for the task's push; [] when it does not push."""
    if not pushes(task):
        return []
    branch = task.repo["push"].get("branch")
    return ["--push-url", task.repo["url"], *(["--push-branch", branch] if branch else []),
            *(["--git-credentials-dir", credentials_dir] if credentials_dir else []), *(["--push-proxy", proxy] if proxy else [])]


def volumes(task: Task, settings: Settings) -> list[dict]:
    """The Job's volume of the git Secret: optional, so a cluster without it still runs the task."""
    if not pushes(task):
        return []
    return [{"name": VOLUME, "secret": {"secretName": settings.git_push_secret, "defaultMode": 0o440, "optional": True}}]


def snapshotter_args(task: Task, settings: Settings) -> list[str]:
    return push_flags(task, GIT_SECRETS_DIR, settings.egress_proxy or None)


def snapshotter_mounts(task: Task) -> list[dict]:
    return [{"name": VOLUME, "mountPath": GIT_SECRETS_DIR, "readOnly": True}] if pushes(task) else []
