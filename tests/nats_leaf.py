"""The agent pod's `nats-leaf` sidecar as a real process: the very command and configuration text the factory
renders for the Job, with the test's ports and the hub's `launch_creds(task, "agent")` in place of the pod's.

The hub is a `tests.conftest.NatsServer(..., leafnodes=True)`: operator mode, JetStream, a leafnode port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.procs import terminate
from functions.core import factory
from functions.core.settings import Settings
from functions.core.task import parse_task
from tests.conftest import NatsServer, eventually, free_port, nats_server_binary, port_open

ACCOUNT = "A" + "D" * 55  # the factory never reads the key: any account key and path will do
NATS_SETTINGS = {"nats_account": ACCOUNT, "nats_signing_key_file": "/var/secrets/nats/signing-key.nk"}


def rendered_leaf(task_id: str, settings: Settings) -> dict:
    """The `nats-leaf` container of the Job the factory renders for `task_id`."""
    task = parse_task({"prompt": "p", "task_id": task_id}, source="test", event_id="e1")
    spec = factory.render_job(task, settings)["spec"]["template"]["spec"]
    (leaf,) = [c for c in spec["initContainers"] if c["name"] == factory.CONTAINER_NATS_LEAF]
    return leaf


class NatsLeaf:
    """A leaf node of `hub` for task `task_id`, started as the sidecar starts: `python -I -S -c <launcher>` with
    the configuration in NATS_LEAF_CONF, exec'ing nats-server. Clients connect to `url` without credentials."""

    def __init__(self, hub: NatsServer, task_id: str, log_dir: Path, *, creds: str | None = None):
        self.hub, self.task_id = hub, task_id
        self.port, self.monitor_port = free_port(), free_port()
        self.creds = creds or hub.launch_creds(task_id, "agent")
        settings = Settings(**NATS_SETTINGS, nats_leaf_url=hub.leafnode_url)
        container = rendered_leaf(task_id, settings)
        rendered = {e["name"]: e["value"] for e in container["env"]}[factory.NATS_LEAF_CONF_ENV]
        # The pod's text, exactly: the same function with the pod's creds path and ports gives it.
        assert rendered == factory.render_leaf_conf(hub.leafnode_url, factory.nats_creds_path("agent"))
        self.conf = factory.render_leaf_conf(hub.leafnode_url, self.creds, self.port, self.monitor_port)
        self.command = [sys.executable if container["command"][0] == "python" else container["command"][0], *container["command"][1:]]
        self.log_file = log_dir / f"leaf-{task_id}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsLeaf":
        env = {"PATH": f"{Path(nats_server_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               factory.NATS_LEAF_CONF_ENV: self.conf}
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        eventually(self._listening, f"the leaf listening on {self.port}", detail=self.log)
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the leaf exited with {self.proc.returncode}:\n{self.log()}")
        return port_open(self.port)

    def probe(self) -> bool:
        """The sidecar's startupProbe, run for real against this leaf's monitoring port."""
        command = factory.leaf_probe_command(self.monitor_port)
        return subprocess.run([sys.executable, *command[1:]], capture_output=True).returncode == 0

    def wait_connected(self) -> None:
        eventually(self.probe, "the leaf connected to the hub (its startupProbe passing)", detail=self.log)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc, 5)
        self.proc = None
