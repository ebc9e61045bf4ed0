"""Whether a container was OOM-killed, where podman's own answer (State.OOMKilled) cannot be trusted.

On cgroup v1 podman 4.3 with conmon 2.1 misses the kernel's OOM kill: conmon notices it but writes its
`oom` marker into its working directory instead of where podman looks (State.OOMKilled stays false, the
exit code is 137; the runtime runs podman in `<data dir>/podman` so the marker lands there).
The kernel tells anyone who asks: an eventfd registered on the container's `memory.oom_control` through
`cgroup.event_control` is signalled once per OOM event, and once more when the cgroup is removed.

Invariants
- The watch is registered between `podman init` (the cgroup exists) and `podman start` (the process
  runs), so no OOM kill can come before it.
- `oom_killed()` answers only once the cgroup is gone (the container has exited and podman removed
  it): then a count of two or more means an OOM event happened; one is the removal alone.
- Without cgroup v1 or without permission there is no watch, and the answer is None (unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

MEMORY_V1 = Path("/sys/fs/cgroup/memory")


def memory_cgroup(pid: int) -> str | None:
    """The cgroup v1 memory controller's path of process `pid` (the container's, after `podman init`)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return None


class OomWatch:
    def __init__(self, pid: int):
        self.efd: int | None = None
        cgroup = memory_cgroup(pid) if pid > 0 else None
        self.dir = MEMORY_V1 / (cgroup or "/nonexistent").lstrip("/")
        if cgroup is None:
            return
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            ofd = os.open(self.dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(self.dir / "cgroup.event_control", "w") as control:
                    control.write(f"{efd} {ofd}")
            finally:
                os.close(ofd)  # the kernel holds its own reference
            self.efd = efd
        except OSError:
            with contextlib.suppress(UnboundLocalError, OSError):
                os.close(efd)

    @property
    def active(self) -> bool:
        return self.efd is not None

    async def oom_killed(self, timeout: float = 10.0) -> bool | None:
        """After the container exited: True if the kernel OOM-killed in its cgroup, None if unknown."""
        if self.efd is None:
            return None
        deadline = time.monotonic() + timeout
        while self.dir.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.dir.exists():
            return None
        try:
            count = os.eventfd_read(self.efd)
        except BlockingIOError:
            count = 0
        return count >= 2

    def close(self) -> None:
        if self.efd is not None:
            os.close(self.efd)
            self.efd = None
