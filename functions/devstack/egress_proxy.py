"""The egress proxy of `dockyard dev`: the cluster's Squid configuration, reached through a Unix socket.

    sandbox (own network namespace)          this machine
    command -> 127.0.0.1:3128 -> socat  ==>  egress.sock -> socat -> Squid 127.0.0.1:P -> allowed hosts
               (agent/sandbox.py)            (bind-mounted)

Invariants:
- Squid runs the configuration `functions.core.egress.render_squid_conf` renders for the
  cluster, from the same allowlist (knative/squid/allowlist.txt): the same refusals of
  private, loopback, link-local (metadata) and API-server destinations. Only where it
  listens (a free port on 127.0.0.1), who may connect (127.0.0.1: the bridge) and that it
  keeps no pid file and logs to `<data dir>/egress/squid.log` differ.
- The sandboxes reach it only through `socket`, a Unix socket in a fresh 0700 directory
  (short path: a socket path is limited to 108 bytes), bridged to Squid's port by socat.
  A Unix socket crosses a network namespace because it is a file; bwrap binds it in.
- Squid and the bridge never outlive the process that started them (PR_SET_PDEATHSIG,
  and `stop()` on a clean exit); the socket directory is removed on stop.

Squid cannot listen on a Unix socket itself, hence the host-side socat.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from agent.procs import die_with_parent, terminate
from functions.core import egress
from functions.devstack.ports import free_port

START_TIMEOUT_SECONDS = 30.0


class EgressProxyError(Exception):
    """Squid or socat is missing or did not start; the message says what to do."""


def squid_binary() -> str | None:
    return shutil.which("squid") or next((p for p in ("/usr/sbin/squid", "/usr/local/sbin/squid") if os.path.exists(p)), None)


class EgressProxy:
    """`EgressProxy(workdir).start()`: Squid on 127.0.0.1 and its Unix socket bridge (`socket`)."""

    def __init__(self, workdir: Path, allowed: Sequence[str] | None = None, *, extra_conf: str = "", **render: object):
        self.workdir = Path(workdir)
        self.allowed = list(allowed) if allowed is not None else egress.read_allowlist()
        self.extra_conf = extra_conf  # tests only: hosts_file and the like
        self.render = render  # tests only: keyword arguments of render_squid_conf (deny_ranges, ports)
        self.port: int | None = None
        self.socket_dir: Path | None = None
        self.squid: subprocess.Popen | None = None
        self.bridge: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        if self.socket_dir is None:
            raise EgressProxyError("the egress proxy is not started")
        return self.socket_dir / "egress.sock"

    @property
    def log(self) -> Path:
        """Squid's access and cache logs, and the bridge's errors."""
        return self.workdir / "squid.log"

    def config(self, port: int) -> str:
        conf = egress.render_squid_conf(
            self.allowed,
            **{
                "port": f"127.0.0.1:{port}",
                "clients": ("127.0.0.1/32",),
                "pid_file": "none",
                "spool_dir": "none",
                "access_log": "stdio:/dev/stdout",  # both into `log`, which this process opens
                "cache_log": "/dev/stderr",
                **self.render,
            },
        )
        if os.geteuid() == 0:  # Squid will not stay root: it switches to this user
            conf += f"cache_effective_user {_unprivileged_user()}\n"
        return conf + self.extra_conf

    def start(self) -> "EgressProxy":
        binary, bridge = squid_binary(), shutil.which("socat")
        if binary is None or bridge is None:
            missing = " and ".join(name for name, found in (("squid", binary), ("socat", bridge)) if found is None)
            raise EgressProxyError(
                f"{missing} not installed: the sandboxes reach the network through them "
                "(Debian/Ubuntu: `sudo apt-get install squid socat`), or run `dockyard dev --unsafe-no-sandbox`"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.workdir / "squid.conf").write_text(self.config(self.port))
        self.socket_dir = Path(tempfile.mkdtemp(prefix="dockyard-egress-"))
        try:
            with open(self.log, "ab") as out:
                if os.geteuid() == 0:  # Squid reopens /dev/stdout after it switched users
                    entry = pwd.getpwnam(_unprivileged_user())
                    os.fchown(out.fileno(), entry.pw_uid, entry.pw_gid)
                self.squid = _spawn([binary, "-N", "-f", str(self.workdir / "squid.conf")], out, self.workdir)
                self.bridge = _spawn(["socat", f"UNIX-LISTEN:{self.socket},fork,unlink-early", f"TCP:127.0.0.1:{self.port}"], out, self.workdir)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            for name, proc in (("squid", self.squid), ("socat", self.bridge)):
                if proc is not None and proc.poll() is not None:
                    raise EgressProxyError(f"{name} exited with code {proc.returncode} at start-up; see {self.log}")
            if _accepts_tcp(self.port) and _accepts_unix(self.socket):
                return
            time.sleep(0.05)
        raise EgressProxyError(f"the egress proxy did not start within {START_TIMEOUT_SECONDS:.0f}s; see {self.log}")

    def stop(self, timeout: float = 10.0) -> None:
        for proc in (self.bridge, self.squid):
            if proc is not None:
                terminate(proc, timeout)
        self.bridge = self.squid = None
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def __enter__(self) -> "EgressProxy":
        return self.start() if self.squid is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _spawn(argv: list[str], out, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                            preexec_fn=die_with_parent(signal.SIGTERM))


def _unprivileged_user() -> str:
    for name in ("proxy", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise EgressProxyError("running as root, and no `proxy` or `nobody` user for Squid to switch to")


def _accepts_tcp(port: int | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except (OSError, TypeError):
        return False


def _accepts_unix(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False
