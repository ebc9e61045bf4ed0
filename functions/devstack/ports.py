"""A free TCP port for a local server: `dockyard demo`'s dev stack, and the tests' servers.

Invariant: the port was free when `free_port` returned; nothing reserves it, so
another process may take it before the caller binds. A server that can pick its
own port does so instead (the embedded nats-server runs with `-p -1` and reports
its port); this is for servers whose port must be named up front.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listened on a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
