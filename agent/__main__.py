"""`python -m agent run|snapshotter|restore ...`: the three processes of an agent pod (and `template`, the local runtime's warm start)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m agent {run,snapshotter,restore,template} [options]

  run           run a task: the STRATEGIC/TACTICAL agent, checkpointing every step
  snapshotter   copy the checkpoint to the object store on request and at shutdown
  restore       bring the newest snapshot back into an empty workspace
  template      (local runtime only) a pre-imported agent that forks run and restore on request

'python -m agent COMMAND --help' documents each command's flags."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from agent.run import main as run
    elif command == "snapshotter":
        from agent.snapshotter import main as run
    elif command == "restore":
        from agent.restore import main as run
    elif command == "template":
        from agent.template import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
