"""The `podman` command, run from asyncio: one function, its errors, and the configuration it is run with.

Invariant: every podman call of the runtime goes through `Podman.run`, with CONTAINERS_CONF set to the
runtime's containers.conf (runc, cgroupfs, no default ulimits: what works in a sandboxed machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from functions.errors import TransientError


class PodmanError(TransientError):
    """A podman call failed; the message has its arguments and stderr."""


def default_containers_conf() -> str:
    """The repository's images/containers.conf when there is one, else none (podman's own)."""
    path = Path(__file__).resolve().parents[3] / "images" / "containers.conf"
    return str(path) if path.is_file() else ""


class Podman:
    def __init__(self, binary: str = "podman", containers_conf: str = "", cwd: Path | None = None):
        self.binary = shutil.which(binary) or binary
        # conmon 2.1 on cgroup v1 writes its `oom` marker file into the working directory: keep it out of the checkout.
        self.cwd = cwd
        self.env = dict(os.environ)
        if containers_conf:
            self.env["CONTAINERS_CONF"] = containers_conf

    async def run(self, *args: str, check: bool = True, timeout: float | None = 300) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            self.binary, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env, cwd=self.cwd,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PodmanError(f"podman {' '.join(args[:3])} ...: no answer in {timeout}s") from None
        except asyncio.CancelledError:  # e.g. a `podman wait` given up for a stop: leave no podman behind
            proc.kill()
            raise
        code = proc.returncode or 0
        if check and code != 0:
            raise PodmanError(f"podman {' '.join(args[:4])} ... exited {code}: {err.decode(errors='replace').strip()[-600:]}")
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    async def inspect(self, kind: str, name: str) -> dict | None:
        """`podman <kind> inspect NAME` as a dict; None when there is no such object."""
        code, out, _ = await self.run(kind, "inspect", name, check=False)
        if code != 0:
            return None
        data = json.loads(out or "null")
        return (data[0] if isinstance(data, list) and data else data) or None
