"""Child processes that cannot outlive their owner: parent-death signals and process groups.

Used by the agent's tools, the local runtime, the dev stack and the tests. Two
invariants hold everywhere:

- A child started with `preexec_fn=die_with_parent(sig)` gets `sig` from the
  kernel when its parent dies (Linux PR_SET_PDEATHSIG); elsewhere the owner's
  clean stop still ends it.
- A child started with `start_new_session=True` leads its own process group, so
  `signal_group(pid, sig)` reaches everything it started that did not call
  setsid itself. `live_group_members`, `group_alive` and `pid_alive` read
  /proc, because orphans reparented to a PID 1 that never reaps them stay
  zombies and would count as alive. `start_time` tells a process from a later
  one that got its pid.

A third, for the agent's commands outside a sandbox (the pod): the agent makes
itself a child subreaper (`become_subreaper`), so what a command detached from
its group (setsid, double fork) is reparented to the agent instead of to PID 1,
and `kill_orphans` ends it when the command ends.

The signal on parent death is the caller's choice, on purpose: the local runtime
and the dev stack ask for SIGTERM (an agent stops after its step, nats-server
shuts down cleanly), the agent's `execute` for SIGKILL (a command of a killed
agent must not complete behind its back). Nothing else in agent/ or functions/
calls killpg or prctl.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
ORPHAN_ROUNDS = 100  # a process forking as fast as it is killed is given up on after this many sweeps


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


def _stat(proc_dir: Path) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        raw = (proc_dir / "stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].split()


def _live(fields: list[bytes]) -> bool:
    return fields[0] not in (b"Z", b"X")  # a zombie has exited; it only waits to be reaped


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in a process group, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry)
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid and _live(fields):
            found.append(int(entry.name))
    return found


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat): with its pid, a process's
    identity, since the kernel never gives a live pid to two processes with the same start time."""
    fields = _stat(Path(f"/proc/{pid}"))
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def group_alive(pgid: int) -> bool:
    """Whether any live process is left in the group."""
    if not Path("/proc/self/stat").exists():
        return signal_group(pgid, 0)
    return bool(live_group_members(pgid))


def pid_alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie counts as gone)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat(Path(f"/proc/{pid}"))
    return fields is not None and _live(fields)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER)."""
    return _PRCTL is not None and _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children(pid: int, zombies: bool = False) -> list[int]:
    """PIDs of the live (with `zombies`: also the exited, unreaped) children of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry)
            if fields is not None and len(fields) > 1 and int(fields[1]) == pid and (zombies or _live(fields)):
                found.append(int(entry.name))
    return found


def kill_orphans(known: set[int]) -> int:
    """SIGKILL and reap every child of this process not in `known` (orphans a command left to the
    subreaper), then the orphans of those, until none is left. Returns how many were killed."""
    me, killed = os.getpid(), 0
    for _ in range(ORPHAN_ROUNDS):
        strays = [pid for pid in children(me, zombies=True) if pid not in known]
        if not strays:
            break
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for pid in strays:
            try:
                os.waitpid(pid, 0)  # its own children are now ours: the next round gets them
            except ChildProcessError:
                pass
    return killed


def terminate(proc: "subprocess.Popen", timeout: float) -> bool:
    """SIGTERM a child, wait up to `timeout` seconds, then SIGKILL it; True when SIGTERM was enough."""
    import subprocess

    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
