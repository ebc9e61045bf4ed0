"""`dockyard manifests job`: print the Job and PVC a task would get, as multi-document YAML.

The output is exactly what `KubernetesRuntime.launch` sends, except the owner UID,
which only the API server assigns (a placeholder here), and, when the settings name a
NATS signing key, the task's Secret of NATS credentials: printed between the two with
placeholder values (the launcher mints real ones; they are never printed). Settings come
from the `DOCKYARD_*` environment, then from `--settings FILE` (a YAML mapping of
`functions.core.settings.Settings` field names), so `kubectl apply --dry-run=server -f -`
can check them.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

SOURCE = "dockyard/manifests"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "manifests",
        help="print Kubernetes manifests",
        description="Print the Kubernetes manifests dockyard creates, without a cluster.",
    )
    kinds = p.add_subparsers(dest="manifest", metavar="KIND", required=True)
    job = kinds.add_parser(
        "job",
        help="the Job and PVC of a task",
        description="Print the Job agent-<id>, its NATS Secret agent-<id> (with a signing key in the settings; "
        "placeholder values) and its PVC workspace-<id> as YAML (the owner UID is a placeholder).",
    )
    job.add_argument("--task-file", required=True, type=Path, help="task as JSON or YAML: {prompt, task_id?, repo?, model?, limits?}")
    job.add_argument("--settings", type=Path, help="YAML mapping of settings (field names of functions.core.settings.Settings, e.g. agent_image), over the DOCKYARD_* environment")
    job.add_argument("--task-id", help="the task id; default: the file's task_id, else one derived from the file's content")
    job.set_defaults(run=run_job)


def run_job(args, out=None) -> int:
    import yaml

    from functions.cli.client import EXIT_BAD_INPUT, CommandError
    from functions.core.factory import render
    from functions.core.settings import Settings
    from functions.core.task import parse_task
    from functions.errors import BadInput, SettingsError

    raw = _read(args.task_file, "--task-file")
    try:
        data = yaml.safe_load(raw)
        settings = Settings.from_env()
        if args.settings:
            values = yaml.safe_load(_read(args.settings, "--settings")) or {}
            if not isinstance(values, dict):
                raise SettingsError(f"{args.settings}: the file must hold a mapping of setting names to values")
            settings = settings.updated(values, source=str(args.settings))
    except yaml.YAMLError as exc:
        raise CommandError(f"not valid YAML or JSON: {exc}", EXIT_BAD_INPUT) from None
    except SettingsError as exc:
        raise CommandError(str(exc), EXIT_BAD_INPUT) from None
    if isinstance(data, dict) and args.task_id:
        data = {**data, "task_id": args.task_id}
    try:
        task = parse_task(data, source=SOURCE, event_id=hashlib.sha256(raw.encode()).hexdigest())
    except BadInput as exc:
        field = f" (field: {exc.field})" if exc.field else ""
        raise CommandError(f"{args.task_file}: {exc.message}{field}", EXIT_BAD_INPUT) from None
    yaml.safe_dump_all(render(task, settings), out or sys.stdout, sort_keys=False)
    return 0


def _read(path: Path, flag: str) -> str:
    from functions.cli.client import EXIT_BAD_INPUT, CommandError

    try:
        return path.read_text()
    except OSError as exc:
        raise CommandError(f"{flag} {path}: {exc.strerror or exc}", EXIT_BAD_INPUT) from None

