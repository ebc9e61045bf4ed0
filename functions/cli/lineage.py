"""`dockyard retry TASK` and `dockyard fork TASK --prompt ...`: a new task from an existing one.

Both post a dev.dockyard.task.submitted CloudEvent with a `from` field, like
`dockyard submit` posts one with a prompt; the function fills in what the
event leaves out from the parent's recorded spec (functions/handlers/task_submitted.py).
Retry: `from: {task_id, workspace: "fresh"}`, the same spec run again from an empty workspace.
Fork: `from: {task_id, snapshot?}` and a new prompt; the child starts in the parent's final
workspace and continues the conversation of the chosen snapshot (the newest by default).
"""

from __future__ import annotations

import argparse

from functions.cli.client import EXIT_OK, submit_task


def add_parsers(sub, add_url, token) -> None:
    """Register both subcommands; `add_url(parser)` and `token(args)` are main's, shared by every command."""
    retry = sub.add_parser(
        "retry", help="run a task's spec again as a new task",
        description="Submit the same spec (prompt, repository, model, limits) as a new task that starts from an "
        "empty workspace, linked to TASK as its parent. Prints the new task id.")
    retry.add_argument("task_id", help="the task to run again")
    retry.add_argument("--task-id", dest="new_task_id", help="an id for the new task (derived from the event when omitted)")
    add_url(retry)
    retry.set_defaults(run=lambda args: _submit(args, {"from": {"task_id": args.task_id, "workspace": "fresh"}}, token))

    fork = sub.add_parser(
        "fork", help="continue a finished task with a new instruction",
        description="Start a new task in TASK's final workspace, continuing the conversation of one of its "
        "snapshots (the newest unless --snapshot names one) with PROMPT as a new instruction. Its change set is "
        "against TASK's base, so it shows both tasks' work. Prints the new task id.")
    fork.add_argument("task_id", help="the finished task to fork")
    fork.add_argument("--prompt", required=True, help="the new instruction")
    fork.add_argument("--snapshot", metavar="KEY", help="which of TASK's snapshots: its key or name (default: the newest)")
    fork.add_argument("--model", help="another model for the new task (default: TASK's)")
    fork.add_argument("--task-id", dest="new_task_id", help="an id for the new task (derived from the event when omitted)")
    add_url(fork)
    fork.set_defaults(run=lambda args: _submit(args, _fork_data(args), token))


def _fork_data(args: argparse.Namespace) -> dict:
    source = {"task_id": args.task_id, "workspace": "restore", **({"snapshot": args.snapshot} if args.snapshot else {})}
    return {"from": source, "prompt": args.prompt, **({"model": args.model} if args.model else {})}


def _submit(args: argparse.Namespace, data: dict, token) -> int:
    if args.new_task_id:
        data["task_id"] = args.new_task_id
    print(submit_task(args.url, data, token(args)), flush=True)
    return EXIT_OK
