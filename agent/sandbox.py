"""Where the agent's commands run: a bubblewrap sandbox (`dockyard dev`) or the container (the pod).

Modes (`python -m agent run --sandbox MODE`, DOCKYARD_SANDBOX):

    bwrap        every command (and git clone) in its own bubblewrap sandbox: `dockyard dev`
    container    the container is the boundary (the pod, the default): commands run in a
                 process group, orphans are caught by the agent as child subreaper
    unsafe-host  `dockyard dev --unsafe-no-sandbox`: as `container`, on the user's machine,
                 with a warning at every task start

Invariants of a `bwrap` sandbox (`Sandbox.argv`):
- Files: the system directories read-only (/usr and its /bin, /lib... links, a list of
  /etc entries a toolchain needs); writable only the task's workspace and home (bound at
  their own paths) and a private tmpfs /tmp; the workspace's `.dockyard/` (the agent's
  checkpoint and result) read-only. Nothing else of the host: not the data dir, other
  tasks, the secrets, the user's home, the agent's code or virtualenv.
- Namespaces: new user (where bwrap may make one), PID, IPC, UTS, network and cgroup;
  every capability dropped; `--new-session` (no TIOCSTI on a terminal); `--die-with-parent`.
  bwrap is PID 1 of the namespace and exits with the command, so the kernel kills every
  process the command left (nohup, setsid, double fork) the moment it ends or is killed.
- Environment: `--clearenv`, then exactly the variables given (the scrubbed environment).
- Network: only loopback. With an egress socket (the dev stack's Squid, see
  functions/devstack/egress_proxy.py) bound in at EGRESS_SOCKET, a socat started first
  forwards 127.0.0.1:3128 in the namespace to it, and HTTP(S)_PROXY point there. This is
  how Anthropic's sandbox-runtime bridges its proxy into a network namespace. socat,
  not a Python forwarder: it starts in ~1 ms against ~20 ms for an interpreter
  (bench/bench_sandbox.py), and it is a well-kept Debian package.

The argv is built here by hand because bwrap has no configuration file format; every
flag is documented in bwrap(1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODE_BWRAP = "bwrap"
MODE_CONTAINER = "container"
MODE_UNSAFE_HOST = "unsafe-host"
MODES = (MODE_BWRAP, MODE_CONTAINER, MODE_UNSAFE_HOST)

EGRESS_SOCKET = "/run/dockyard/egress.sock"  # inside the sandbox
PROXY_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
AGENT_STATE_DIR = ".dockyard"  # contract.STATE_DIR: the agent's own files in the workspace

INSTALL_HINT = (
    "install bubblewrap and socat (Debian/Ubuntu: `sudo apt-get install bubblewrap socat`; "
    "Fedora: `sudo dnf install bubblewrap socat`), or run `dockyard dev --unsafe-no-sandbox` "
    "to run the agents' commands on this machine as you, unconfined"
)
UNSAFE_WARNING = (
    "UNSAFE: no sandbox (dockyard dev --unsafe-no-sandbox): this task's commands run on this machine as "
    "this user and can read its files, its processes and the network"
)

# Directories that hold the system's programs and libraries: bound read-only, or recreated
# as the symlinks they are on merged-/usr systems.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What of /etc programs read: certificates, users (for `id`, git), name service and
# dynamic linker configuration, Debian's alternatives, interpreters' site configuration.
ETC_ENTRIES = (
    "alternatives", "ca-certificates", "ca-certificates.conf", "ssl", "pki", "crypto-policies",
    "passwd", "group", "hosts", "host.conf", "nsswitch.conf", "gai.conf", "services", "protocols",
    "localtime", "timezone", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "mime.types", "magic",
    "gitconfig", "python3", "inputrc", "bash.bashrc", "profile", "os-release", "debian_version",
)

_NAMESPACES = (
    "--unshare-user-try", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
    "--unshare-cgroup-try", "--hostname", "sandbox",
)
_PROCESS = ("--die-with-parent", "--new-session", "--cap-drop", "ALL")

# Runs first inside the sandbox: the forwarder to the egress socket; a wait until it listens
# (or has exited), reading /proc/net/tcp with builtins only; then the command in place of
# this shell, so the command's exit is the sandbox's exit.
_FORWARDER_PRELUDE = (
    f"socat TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:{EGRESS_SOCKET} & "
    "while kill -0 $! 2>/dev/null; do read -r -d '' t </proc/net/tcp; "
    f"[[ $t == *' 0100007F:{PROXY_PORT:04X} 00000000:0000 0A'* ]] && break; done; "
    'exec "$0" -c "$1"'
)


class SandboxUnavailable(RuntimeError):
    """bwrap (or socat) is missing or cannot make its namespaces here; the message says how to fix it."""


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


@dataclass(frozen=True)
class Sandbox:
    """The bubblewrap sandbox of one task: its workspace and home writable, nothing else of the host."""

    workspace: Path
    home: Path
    egress_socket: Path | None = None  # the host side of the proxy bridge; None: no network at all
    read_only: tuple[Path, ...] = field(default=())  # more host paths to show read-only (a file:// repository)
    bwrap: str = "bwrap"

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` with the proxy variables pointing at the forwarder inside (or removed without an egress)."""
        out = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        if self.egress_socket is not None:
            for name in ("HTTP_PROXY", "HTTPS_PROXY"):
                out[name] = out[name.lower()] = PROXY_URL
            out["NO_PROXY"] = out["no_proxy"] = "localhost,127.0.0.1,::1"
        return out

    def argv(self, shell: str, command: str, env: Mapping[str, str], cwd: Path, status_fd: int | None = None) -> list[str]:
        """The bwrap command line that runs `shell -c command` in `cwd` with exactly `env`.
        `status_fd`: where bwrap writes its JSON status, the namespace's PID 1 first (`namespace_init`)."""
        args = [self.bwrap, *_NAMESPACES, *_PROCESS, *self._mounts(), "--chdir", str(cwd), "--clearenv"]
        if status_fd is not None:
            args += ["--json-status-fd", str(status_fd)]
        for name, value in self.environment(env).items():
            args += ["--setenv", name, value]
        if self.egress_socket is None:
            return [*args, "--", shell, "-c", command]
        return [*args, "--", shell, "-c", _FORWARDER_PRELUDE, shell, command]

    def _mounts(self) -> list[str]:
        args: list[str] = []
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for name in ETC_ENTRIES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run"]
        for path in self.read_only:
            args += ["--ro-bind", str(path), str(path)]
        workspace, home = self.workspace.resolve(), self.home.resolve()
        args += ["--bind", str(workspace), str(workspace), "--bind", str(home), str(home)]
        args += ["--ro-bind-try", str(workspace / AGENT_STATE_DIR), str(workspace / AGENT_STATE_DIR)]
        if self.egress_socket is not None:
            args += ["--ro-bind", str(self.egress_socket), EGRESS_SOCKET]
        return args


def namespace_init(status: bytes) -> int | None:
    """The host PID of the sandbox's PID 1, from bwrap's JSON status. bwrap reports the command's
    exit before that process has finished killing the rest of the namespace: it is gone only
    once everything the command started is."""
    import json

    for line in status.decode(errors="replace").splitlines():
        try:
            pid = json.loads(line).get("child-pid")
        except (ValueError, AttributeError):
            continue
        if isinstance(pid, int):
            return pid
    return None


def check(egress: bool = True, timeout: float = 20.0) -> str:
    """Raise SandboxUnavailable unless bwrap (and socat, for `egress`) can run a sandbox here.
    Returns the bwrap path. Runs one real sandbox, so a kernel without user namespaces is caught."""
    binary = bwrap_binary()
    if binary is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    if egress and shutil.which("socat") is None:
        raise SandboxUnavailable(f"socat is not installed (it bridges the egress proxy into the sandbox): {INSTALL_HINT}")
    probe = Path(os.environ.get("TMPDIR") or "/tmp")
    sandbox = Sandbox(workspace=probe, home=probe, bwrap=binary)
    argv = sandbox.argv("/bin/sh", "exit 0", {"PATH": "/usr/bin:/bin"}, Path("/"))
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap cannot run here ({exc}): {INSTALL_HINT}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[:300] or f"exit code {done.returncode}"
        raise SandboxUnavailable(
            f"bubblewrap cannot make its namespaces here ({why}); user namespaces may be disabled "
            f"(sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces, or an AppArmor policy): {INSTALL_HINT}"
        )
    return binary


def wrap_argv(sandbox: Sandbox | None, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> list[str]:
    """`argv` (a plain program, e.g. git) inside `sandbox`, or unchanged without one."""
    if sandbox is None:
        return list(argv)
    import shlex

    return sandbox.argv("/bin/bash", shlex.join(argv), env, cwd)
