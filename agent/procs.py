"""Child processes that cannot outlive their owner: parent-death signals and process groups.

Used by the agent's tools, the local runtime, the dev stack and the tests. Two
invariants hold everywhere:

- A child started with `preexec_fn=die_with_parent(sig)` gets `sig` from the
  kernel when its parent dies (Linux PR_SET_PDEATHSIG); elsewhere the owner's
  clean stop still ends it.
- A child started with `start_new_session=True` leads its own process group, so
  `signal_group(pid, sig)` reaches everything it started that did not call
  setsid itself. `live_group_members` reads /proc, because orphans reparented
  to a PID 1 that never reaps them stay zombies and would count as alive.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable

PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, in the parent: a forked child must not load libraries (loader locks).
_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the kernel sends `sig` to the child when its parent dies (Linux only)."""

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False if it no longer exists (or is not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in a process group, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    """Whether any live process is left in the group."""
    if not Path("/proc/self/stat").exists():
        return signal_group(pgid, 0)
    return bool(live_group_members(pgid))
