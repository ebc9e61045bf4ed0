"""Command-line parsing and stderr lines shared by the agent's three processes (run, snapshotter, restore).

Each flag has an environment fallback (`DOCKYARD_<NAME>`), so the same image runs
from a Job spec or a shell. A usage error is fatal (exit 3, never retried):
retrying a pod with bad arguments cannot help.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable

from agent import contract

if TYPE_CHECKING:
    from agent.telemetry.connection import NatsAuth


class UsageError(Exception):
    """Bad flags or settings: the process exits with `contract.EXIT_FATAL`."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def stderr_logger(prog: str) -> Callable[[str], None]:
    """`log(message)` writes `prog: message` to stderr and flushes it at once: the pod log keeps
    the last lines even when the process dies next (Kubernetes makes them the termination message)."""

    def log(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)

    return log


def env_default(name: str, default=None):
    return os.environ.get(contract.ENV_PREFIX + name, default)


def task_parser(prog: str, description: str, *, store: bool) -> Parser:
    """A parser with the flags every process has: --task-id, --workspace and, if asked, --store."""
    parser = Parser(prog=prog, description=description + " Each flag can also be set by the environment variable in brackets.")
    parser.add_argument("--task-id", default=env_default("TASK_ID"), help="task id, a DNS-1123 label [DOCKYARD_TASK_ID]")
    parser.add_argument(
        "--workspace",
        default=env_default("WORKSPACE", contract.WORKSPACE_MOUNT),
        help=f"workspace directory (default {contract.WORKSPACE_MOUNT}) [DOCKYARD_WORKSPACE]",
    )
    if store:
        parser.add_argument("--store", default=env_default("STORE"), help="s3://bucket/prefix or file:///dir [DOCKYARD_STORE]")
    return parser


def add_nats_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--nats and its credentials (--nats-creds or --nats-nkey), each with its environment fallback."""
    parser.add_argument("--nats", default=env_default("NATS_URL"), help=f"NATS URL (user:password@ or token@ allowed) for {what} [DOCKYARD_NATS_URL]")
    parser.add_argument("--nats-creds", default=env_default("NATS_CREDS"), metavar="FILE", help="NATS credentials file: user JWT and nkey seed, as nsc writes it [DOCKYARD_NATS_CREDS]")
    parser.add_argument("--nats-nkey", default=env_default("NATS_NKEY"), metavar="FILE", help="NATS nkey seed file, for a server that knows the user by its nkey [DOCKYARD_NATS_NKEY]")


def nats_auth(args: argparse.Namespace) -> "NatsAuth":
    """The credentials files given, checked now: a bad one is a UsageError naming its flag."""
    from agent.telemetry.connection import CredentialsError, NatsAuth

    try:
        return NatsAuth.load(args.nats_creds, args.nats_nkey)
    except CredentialsError as exc:
        raise UsageError(str(exc)) from None


def check_common(args: argparse.Namespace) -> None:
    if not args.task_id or not contract.is_valid_task_id(args.task_id):
        raise UsageError(
            f"--task-id: {args.task_id!r} is not a valid task id (a DNS-1123 label of 1-{contract.TASK_ID_MAX} chars)"
        )
    if hasattr(args, "store") and not args.store:
        raise UsageError("--store is required (or DOCKYARD_STORE)")
