"""`dockyard dev` as a child process, exactly as a user starts it (`python -m functions.cli dev`).

Tests talk to it over HTTP only and reach into its data dir only to read a task's
`supervisor.json` and its dev token (`token`, `headers`). It runs in its own process group (dev and its embedded nats-server),
so `crash()` kills both at once while the agents, in groups of their own, get SIGTERM
from the kernel. It restarts on the same port and data dir; every start appends to one log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, agent_environment, eventually, free_port

START_SECONDS = 60.0
STOP_SECONDS = 40.0


class DevServer:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None, args: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.args = tuple(args)  # more flags of `dockyard dev`, e.g. --allow-file-repos
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = agent_environment(env)
        self.log = data_dir / "dev-test.log"
        self.proc: subprocess.Popen | None = None
        self.nats_url: str | None = None
        self._offset = 0

    def start(self) -> "DevServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "functions.cli", "dev", "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        eventually(self._healthy, f"dev to answer on {self.url}", START_SECONDS, interval=0.1, detail=self.output)
        match = re.search(r"NATS\s+(nats://\S+)", self.output())
        self.nats_url = match.group(1) if match else None
        return self

    @property
    def nats_connect_options(self) -> dict:
        """`nats.connect(dev.nats_url, **dev.nats_connect_options)`: the embedded server's admin user."""
        return {"user_credentials": str(self.data_dir / "nats-auth" / "creds" / "admin.creds")}

    @property
    def token(self) -> str:
        """The dev token, created on the first start in `<data dir>/api-token`."""
        return (self.data_dir / "api-token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def output(self) -> str:
        """What this start of dev printed."""
        return self.log.read_text()[self._offset :]

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, f"dev exited with {self.proc.returncode}:\n{self.output()}"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def crash(self) -> None:
        """SIGKILL for dev and its nats-server; the agents (own groups) get SIGTERM from the kernel."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, seconds: float = STOP_SECONDS) -> int:
        """Ctrl-C, as a person stops it; its exit code. Killed, and an error, if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"dev did not stop on SIGINT within {seconds:g}s:\n{self.output()}") from None

    def supervisor_state(self, task_id: str) -> dict:
        return json.loads((self.data_dir / "tasks" / task_id / "supervisor.json").read_text())
