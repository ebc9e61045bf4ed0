"""`dockyard diff TASK`: a finished task's change set, read from the object store.

The snapshotter's final step stores `jobs/<id>/final/changes.patch` and
`changes.json` (agent/changes.py); this prints them. Piped, the patch is written
byte for byte (`dockyard diff T | git apply` works); on a terminal it is coloured
and stripped of control characters, since its text is the agent's. `--stat`
prints changes.json as a table. The store is the one `dockyard dev` uses
(`--store`, else DOCKYARD_STORE, else `file://<data dir>/store`); with `--url`
the files come from a stream Service's download routes, with the API token
(functions/cli/download.py has both sources). Either way the patch is streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from functions.cli.client import EXIT_OK
from functions.cli.download import PATCH, SUMMARY, add_source_arguments, source_of, store_url, why_none  # noqa: F401
from functions.cli.render import terminal_safe

RESET, BOLD, RED, GREEN, CYAN = "\x1b[0m", "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[36m"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diff",
        help="print what a finished task changed",
        description="Print a finished task's change set (its patch against the commit the repository was cloned at, "
        "or against an empty workspace). Coloured on a terminal, plain when piped.",
    )
    p.add_argument("task_id")
    p.add_argument("--stat", action="store_true", help="list the changed files with their status and line counts")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour the patch (default: auto, on a terminal)")
    add_source_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = source_of(args)
    if args.stat:
        summary = json.loads(b"".join(source.open(args.task_id, SUMMARY)))
        print(terminal_safe(format_stat(summary)))
    else:
        _print_patch(source.open(args.task_id, PATCH), _colour(args.color))
    return EXIT_OK


def _colour(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _print_patch(chunks: Iterator[bytes], colour: bool) -> None:
    out = sys.stdout.buffer
    if not colour:
        for chunk in chunks:
            out.write(chunk)
    else:
        rest = b""
        for chunk in chunks:
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                out.write(colour_line(line.decode("utf-8", errors="replace")).encode())
        if rest:
            out.write(colour_line(rest.decode("utf-8", errors="replace")).encode())
    out.flush()


def colour_line(line: str) -> str:
    """One patch line for a terminal: control characters removed, headers bold, hunks cyan, +/- green/red."""
    text = terminal_safe(line.rstrip("\n"))
    if text.startswith(("diff --git", "index ", "--- ", "+++ ", "new file", "deleted file", "rename ", "similarity", "old mode", "new mode")):
        colour = BOLD
    elif text.startswith("@@"):
        colour = CYAN
    elif text.startswith("+"):
        colour = GREEN
    elif text.startswith("-"):
        colour = RED
    else:
        return text + "\n"
    return f"{colour}{text}{RESET}\n"


def format_stat(summary: dict) -> str:
    """changes.json as a table: status, +added, -deleted, path (old -> new for renames), then the totals."""
    rows = [("STATUS", "+", "-", "PATH")]
    for f in summary.get("files", []):
        path = f"{f['old_path']} -> {f['path']}" if f.get("old_path") else f["path"]
        added, deleted = ("bin", "bin") if f.get("binary") else (str(f.get("added_lines", 0)), str(f.get("deleted_lines", 0)))
        rows.append((f.get("status", "?"), added, deleted, path))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}  {r[3]}" for r in rows]
    totals = summary.get("totals", {})
    base = summary.get("base", {})
    against = f"commit {base.get('commit')}" if base.get("verified") else "the empty tree"
    lines.append(
        f"{totals.get('files', 0)} files, +{totals.get('added_lines', 0)} -{totals.get('deleted_lines', 0)} against {against}"
        + (f" ({base['note']})" if base.get("note") else "")
        + ("; the patch was cut, this list is complete" if summary.get("cut") else "")
    )
    return "\n".join(lines)
