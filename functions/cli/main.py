"""`dockyard`: the command line.

    dockyard dev        run the whole stack on this machine (functions, broker, stream, NATS, agents)
    dockyard submit     send a task (a dev.dockyard.task.submitted CloudEvent) to the broker
    dockyard logs       print a task's trace; -f follows it live, resuming after dropped connections
    dockyard tasks      list tasks
    dockyard diff       print what a finished task changed (its change set, from the store or --url)
    dockyard download   fetch a finished task's workspace, unpacked safely (or --patch), from the store or --url
    dockyard retry      run a task's spec again as a new task (fresh workspace)
    dockyard fork       continue a finished task in its workspace with a new instruction
    dockyard cancel     stop a task
    dockyard message    tell a running agent something
    dockyard demo       start the stack, run the bundled example task, stop
    dockyard token      make an API token (`create --name N --scope read|write`)
    dockyard nats-auth  make a cluster's NATS credentials (`init --out DIR`) and print how to install them

Each subcommand is one `_register_*` function in `COMMANDS` that adds its
parser and sets `run`; a new subcommand is one more function in that list.
Exit codes: 0 success; 1 the task failed or the server cannot be reached;
2 the server refused the request (its error and the field at fault are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Callable

from agent import contract
from functions.cli import redaction
from functions.cli.client import (
    DEFAULT_URL,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    get_json,
    post_event,
    print_trace,
    resolve_token,
    submit_task,
)
from functions.cli.render import terminal_safe
from functions.errors import SettingsError

# --- subcommands -----------------------------------------------------------------


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"where `dockyard dev` (or the ingress) listens (default {DEFAULT_URL})")
    parser.add_argument("--token", help="API token (default: $DOCKYARD_TOKEN, else the dev token in <data dir>/api-token)")
    parser.add_argument("--data-dir", type=Path, default=Path(".dockyard"), help="`dockyard dev`'s data dir, for its token (default ./.dockyard)")


def _token(args) -> str | None:
    return resolve_token(args.token, args.data_dir)


def _register_dev(sub) -> None:
    p = sub.add_parser("dev", help="run the whole stack on this machine", description="Run broker, functions, stream and agents locally, with an embedded NATS.")
    p.add_argument("--port", type=int, default=8080, help="HTTP port for the broker ingress, the stream and the API (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--data-dir", type=Path, default=Path(".dockyard"), help="workspaces, NATS store and file store (default ./.dockyard)")
    p.add_argument("--nats", help="use this NATS server instead of starting an embedded one")
    p.add_argument("--store", help="object store URL (default file://<data-dir>/store)")
    p.add_argument("--model", help="model for tasks that name none (the agent's default otherwise)")
    p.add_argument(
        "--allow-file-repos", action="store_true",
        help="accept file:// repositories (tasks then read any repository this user can read; off by default)")
    p.add_argument("--max-running", type=int, metavar="N", help="run at most N tasks at once, queue the rest (default: the number of cores)")
    p.add_argument(
        "--runtime", choices=("local", "podman"),
        help="where agents run: child processes (local, the default) or each task's Job as a podman pod "
        "(needs podman, the agent image and an s3:// --store; DOCKYARD_RUNTIME)")
    p.add_argument(
        "--unsafe-no-sandbox", action="store_true",
        help="run the agents' commands on this machine as you, without bubblewrap and the egress proxy "
        "(they can then read your files and reach any address; every task warns)")
    p.set_defaults(run=_run_dev)


def _run_dev(args) -> int:
    from functions.core.settings import Settings
    from functions.devstack import stack as dev

    if args.allow_file_repos:  # a setting like any other: the dev stack and its agents read it from the environment
        os.environ[Settings.variable("allow_file_repos")] = "true"
    if args.max_running is not None:  # checked with the other settings (DOCKYARD_MAX_RUNNING)
        os.environ[Settings.variable("max_running")] = str(args.max_running)
    return dev.main(args)


def _register_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit a task", description="Send a dev.dockyard.task.submitted CloudEvent and print the task id.")
    p.add_argument("prompt", help="what the agent should do")
    p.add_argument("--task-id", help="an id for the task (a DNS-1123 label); derived from the event when omitted")
    p.add_argument("--model", help="model spec, e.g. scripted:example or openai:gpt-4o")
    p.add_argument("--repo", help="repository URL to clone into the workspace")
    p.add_argument("--ref", help="branch, tag or commit of --repo")
    p.add_argument("--push", nargs="?", const="", metavar="BRANCH",
                   help="repo.push: push the change set to --repo as BRANCH (default dockyard/<task-id>) at the end")
    p.add_argument("--deadline", type=int, help="limits.deadline_seconds")
    p.add_argument("--retries", type=int, help="limits.retries")
    p.add_argument("--max-tokens", type=int, help="limits.max_tokens: the model gateway refuses calls past this many tokens")
    p.add_argument("--max-cost-usd", type=float, help="limits.max_cost_usd: ... or past this estimated cost")
    p.add_argument("-f", "--follow", action="store_true", help="then follow the task's trace until it ends")
    _add_url(p)
    p.set_defaults(run=_run_submit)


def _run_submit(args) -> int:
    data: dict = {"prompt": args.prompt}
    if args.task_id:
        data["task_id"] = args.task_id
    if args.model:
        data["model"] = args.model
    if args.repo:
        data["repo"] = {"url": args.repo, **({"ref": args.ref} if args.ref else {})}
        if args.push is not None:
            data["repo"]["push"] = {"branch": args.push} if args.push else {}
    elif args.ref or args.push is not None:
        raise CommandError(f"{'--ref' if args.ref else '--push'} needs --repo", EXIT_BAD_INPUT)
    chosen = (("deadline_seconds", args.deadline), ("retries", args.retries), ("max_tokens", args.max_tokens), ("max_cost_usd", args.max_cost_usd))
    limits = {k: v for k, v in chosen if v is not None}
    if limits:
        data["limits"] = limits
    token = _token(args)
    task_id = submit_task(args.url, data, token)
    print(task_id, flush=True)
    if not args.follow:
        return EXIT_OK
    status = asyncio.run(print_trace(args.url, task_id, after=None, follow=True, idle=0, token=token))
    return EXIT_OK if (status or {}).get("outcome") == contract.OUTCOME_DONE else EXIT_FAILED


def _register_logs(sub) -> None:
    p = sub.add_parser(
        "logs",
        help="print a task's trace",
        description="Print a task's events and logs. Without -f: what exists now (stops at the end of the "
        "task or after --idle seconds without news). With -f: follow until the task ends, reconnecting "
        "with Last-Event-ID when the connection drops.",
    )
    p.add_argument("task_id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    p.add_argument("--after", type=int, help="start after this stream sequence (an SSE id)")
    p.add_argument("--idle", type=float, default=1.0, help="without -f: stop after this many seconds without news (default 1)")
    p.add_argument("--json", action="store_true", help="print each message as a JSON line instead of text")
    _add_url(p)
    p.set_defaults(run=_run_logs)


def _run_logs(args) -> int:
    asyncio.run(print_trace(args.url, args.task_id, after=args.after, follow=args.follow, idle=args.idle, raw=args.json, token=_token(args)))
    return EXIT_OK


def _register_tasks(sub) -> None:
    p = sub.add_parser("tasks", help="list tasks", description="List tasks, newest first.")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    _add_url(p)
    p.set_defaults(run=_run_tasks)


def format_tasks(records: list[dict]) -> str:
    columns = ("task_id", "state", "phase", "outcome", "attempts", "tokens", "cost", "created_at", "reason")
    rows = [[_cell(r, c) for c in columns] for r in records]
    header = [c.upper().replace("_", " ") for c in ("task", *columns[1:])]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])


def _cell(record: dict, column: str) -> str:
    """A column of `dockyard tasks`; tokens and cost are the model gateway's totals (none for a scripted model)."""
    usage = record.get("usage") or {}
    if column == "tokens":
        return f"{usage['tokens']:,}" if isinstance(usage.get("tokens"), int) else ""
    if column == "cost":
        return f"${usage['cost_usd']:.4f}" if isinstance(usage.get("cost_usd"), (int, float)) and usage.get("cost_usd") else ""
    if column == "outcome" and record.get("failure_class"):  # failed (fatal): running it again cannot help
        return f"{record.get('outcome')} ({record['failure_class']})"
    if column == "reason":
        return " ".join(str(record.get("reason") or "").split())[:80]
    value = record.get(column)
    return "" if value is None else str(value)


def _run_tasks(args) -> int:
    records = redaction.redactor().redact_obj(get_json(args.url, "/api/tasks", _token(args)))
    print(json.dumps(records, indent=2) if args.json else terminal_safe(format_tasks(records) if records else "no tasks"))
    return EXIT_OK


def _register_diff(sub) -> None:
    from functions.cli.diff import add_parser

    add_parser(sub)


def _register_download(sub) -> None:
    from functions.cli.download import add_parser

    add_parser(sub)


def _register_lineage(sub) -> None:
    from functions.cli.lineage import add_parsers

    add_parsers(sub, _add_url, _token)


def _register_cancel(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a task", description="Stop a task after its current step.")
    p.add_argument("task_id")
    _add_url(p)
    p.set_defaults(run=lambda args: _command(args, {"task_id": args.task_id, "op": "cancel"}))


def _register_message(sub) -> None:
    p = sub.add_parser("message", help="send a message to a running agent", description="The agent reads it in its next STRATEGIC phase.")
    p.add_argument("task_id")
    p.add_argument("text")
    _add_url(p)
    p.set_defaults(run=lambda args: _command(args, {"task_id": args.task_id, "op": "message", "text": args.text}))


def _command(args, data: dict) -> int:
    _, answer = post_event(args.url, contract.EVENT_TASK_COMMAND, data, _token(args))
    answer = (answer.get("results") or {}).get("task_command") or answer
    print(f"{data['op']} {args.task_id}: {answer.get('status') or 'sent'}")
    return EXIT_OK


def _register_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the bundled example task end to end",
        description="Start `dockyard dev` in the background, submit the example task (model scripted:example), "
        "follow it to the end, print where its final snapshot is, and stop. Exit 0 when the task is done.",
    )
    p.add_argument("--data-dir", type=Path, help="data dir for the stack (default: a new temporary directory)")
    p.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from functions.cli import demo

    return demo.run(args)


def _register_token(sub) -> None:
    p = sub.add_parser(
        "token",
        help="make API tokens",
        description="`dockyard token create --name N --scope read|write`: print a new token and its tokens-file line "
        "(add the line to DOCKYARD_API_TOKENS_FILE, or to the Secret it is mounted from).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="print a new token and the line for the tokens file")
    create.add_argument("--name", required=True, help="a one-word name for the token (who holds it)")
    create.add_argument("--scope", required=True, choices=("read", "write"), help="read: streams and task lists; write: also submit, cancel, message")
    create.set_defaults(run=_run_token_create)


def _run_token_create(args) -> int:
    from functions.stream.auth import new_token, token_line

    token = new_token()
    try:
        line = token_line(args.name, args.scope, token)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_BAD_INPUT) from None
    print(f"token: {token}")
    print(f"tokens-file line: {line}")
    return EXIT_OK


def _register_manifests(sub) -> None:
    from functions.cli.manifests import add_parser

    add_parser(sub)


def _register_nats_auth(sub) -> None:
    from functions.cli.nats_auth import add_parser

    add_parser(sub)


COMMANDS: list[Callable] = [
    _register_dev,
    _register_submit,
    _register_logs,
    _register_tasks,
    _register_diff,
    _register_download,
    _register_lineage,
    _register_cancel,
    _register_message,
    _register_demo,
    _register_token,
    _register_manifests,
    _register_nats_auth,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=contract.DISTRIBUTION, description="Run LLM coding agents as Kubernetes Jobs, or locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as exc:  # may quote the server's answer: no raw control characters
        print(terminal_safe(f"dockyard {args.command}: {exc}"), file=sys.stderr)
        return exc.code
    except SettingsError as exc:  # a DOCKYARD_* variable is wrong (`dockyard dev`): the message names it
        print(f"dockyard {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dockyard logs ID | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK

