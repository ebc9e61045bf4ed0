"""The exec probes of the agent pod's containers: small Python programs, since Python is the one tool
the images surely have (`-I -S` keep them fast). Each runs for real in tests/functions/core/test_factory.py."""

from __future__ import annotations

from agent import contract


def sigterm_handled_probe_command(pid: int = 1) -> list[str]:
    """Passes once process `pid` (the container's entrypoint) catches SIGTERM: bit 15-1 of SigCgt in its
    /proc status. The snapshotter installs its handler first thing in its event loop (agent/snapshotter.py)."""
    code = (
        f"import sys; s=open('/proc/{pid}/status').read(); "
        "sys.exit(0 if int(s.split('SigCgt:')[1].split()[0], 16) >> 14 & 1 else 1)"
    )
    return ["python", "-I", "-S", "-c", code]


def heartbeat_probe_command(stale_seconds: int) -> list[str]:
    """Fails when the heartbeat file is older than `stale_seconds`. No file yet (the agent has not
    reached its loop) passes. Python is the one tool the agent image surely has; -I -S keep it fast."""
    path = f"{contract.WORKSPACE_MOUNT}/{contract.HEARTBEAT_FILE}"
    code = (
        f"import os,sys,time; p={path!r}; "
        f"sys.exit(0 if not os.path.exists(p) or time.time()-os.path.getmtime(p)<{stale_seconds} else 1)"
    )
    return ["python", "-I", "-S", "-c", code]
