"""Running one shell command for the model: its own process group, capped output, a timeout, a kill.

Invariants
- The command leads its own process group and dies with the agent (SIGKILL on
  parent death: a command of a killed agent never completes behind its back).
- Output (stdout and stderr together) is capped while it is read: the first half
  of the cap and a rolling tail of the second half are kept, so an endless
  writer costs bounded memory and the deadline is checked between bounded reads.
  Each chunk also goes to the `sink` when one is given (agent.outputs: the whole
  output in a file, written as it is read), and the true size is counted.
- A command that outlives its timeout gets SIGTERM to its whole group, a grace
  period while its output is still read, then SIGKILL. Background children still
  holding the output after the command exits get the same, after a shorter wait.
- The command sees only the environment it is given (`scrubbed_environment`):
  nothing is inherited from the agent, proxy credentials are stripped.
- Nothing the command started outlives it. In a `Sandbox` (agent/sandbox.py) the
  PID namespace ends with the command. Without one (the pod), its process group
  gets SIGKILL when it ends, and what left the group (setsid, double fork) was
  reparented to the agent, a child subreaper, which kills and reaps it.

Hand-written rather than `subprocess.run(timeout=...)`: that one kills only the
direct child (not its group), keeps all output in memory, and blocks on EOF
while a background child holds the pipe.
"""

from __future__ import annotations

import codecs
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.procs import become_subreaper, children, die_with_parent, group_alive, kill_orphans, pid_alive, signal_group
from agent.sandbox import Sandbox, namespace_init

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

TERM_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL of a process group
NAMESPACE_SETTLE_SECONDS = 10.0  # how long the kernel may take to kill what a sandboxed command left
LINGER_GRACE_SECONDS = 1.0  # how long background children may hold the output after the command exits
_READ_CHUNK = 1 << 16
_READS_PER_TURN = 64  # bound one drain, so an endless writer cannot starve the deadline check


@dataclass(frozen=True)
class CommandResult:
    returncode: int  # negative: killed by that signal
    output: str  # capped: head, "[N bytes elided]", tail
    timed_out: bool = False
    lingering: bool = False  # background children held the output and were stopped
    total_bytes: int = 0  # the true size of the whole output
    head: str = ""  # the output's first bytes as kept (the whole output when nothing was elided)
    tail: str = ""  # its last bytes as kept; "" when nothing was elided


def strip_userinfo(url: str) -> str:
    """`http://user:pass@proxy:3128/` -> `http://proxy:3128/` (also without a scheme)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = len(rest)
    for ch in "/?#":
        idx = rest.find(ch)
        if idx != -1:
            end = min(end, idx)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{tail}"


def proxy_settings(proxy_env: Mapping[str, str]) -> dict[str, str]:
    """The proxy variables of `proxy_env`, in both spellings, without credentials."""
    out: dict[str, str] = {}
    for name in PROXY_VARIABLES:
        value = proxy_env.get(name) or proxy_env.get(name.lower())
        if not value:
            continue
        if name != "NO_PROXY":
            value = strip_userinfo(value)
        out[name] = value
        out[name.lower()] = value
    return out


def scrubbed_environment(home: Path, proxy: Mapping[str, str]) -> dict[str, str]:
    """PATH, HOME, PYTHONUSERBASE, LANG, TMPDIR, a few constants and `proxy`: nothing else."""
    local = home / ".local"
    tmpdir = home / "tmp"
    try:
        tmpdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        tmpdir = Path("/tmp")
    env = {
        "PATH": f"{local / 'bin'}:{SYSTEM_PATH}",
        "HOME": str(home),
        "PYTHONUSERBASE": str(local),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmpdir),
        "TERM": "dumb",
        "PAGER": "cat",
        "GIT_PAGER": "cat",
        "GIT_TERMINAL_PROMPT": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.update(proxy)
    return env


def shell() -> str:
    return shutil.which("bash", path=SYSTEM_PATH) or shutil.which("sh", path=SYSTEM_PATH) or "/bin/sh"


def run_command(
    command: str,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    output_cap: int,
    sandbox: Sandbox | None = None,
    sink: Callable[[bytes], None] | None = None,
) -> CommandResult:
    """Run `command` with `shell() -c`, in `sandbox` when given; every chunk of output also goes to `sink`.
    Raises OSError if it cannot be started."""
    proc, end_leftovers = _start(command, cwd, env, sandbox)
    assert proc.stdout is not None
    reader = _PipeReader(proc.stdout.fileno(), CappedOutput(output_cap), sink)
    timed_out = False
    lingering = False
    try:
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        while True:
            if reader.eof:  # wait for the exit itself, not a whole polling interval
                try:
                    proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                reader.pump(0.05)
            now = time.monotonic()
            if proc.poll() is not None:
                if reader.eof:
                    break
                exited_at = exited_at or now
                if now - exited_at >= LINGER_GRACE_SECONDS:
                    lingering = True  # background children still hold the output
                    break
            if exited_at is None and now >= deadline:
                timed_out = True
                break
        if timed_out or lingering:
            _terminate_group(proc, reader)
    finally:
        if proc.poll() is None:  # only on an unexpected exception above
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        signal_group(proc.pid, signal.SIGKILL)  # what is left in its group (nohup ... &)
        end_leftovers()
        reader.close()
        proc.stdout.close()
    head, tail = reader.buf.regions()
    return CommandResult(proc.returncode, reader.buf.text(), timed_out, lingering, reader.buf.total, head, tail)


def _start(command: str, cwd: Path, env: dict[str, str], sandbox: Sandbox | None) -> tuple[subprocess.Popen, Callable[[], None]]:
    """Start the command; returns it and what ends the processes it leaves outside its group."""
    if sandbox is None:
        become_subreaper()  # before the start: a double fork's orphan must come to us, not to PID 1
        known = set(children(os.getpid(), zombies=True))
        return _popen([shell(), "-c", command], cwd, env), lambda: kill_orphans(known)
    status_read, status_write = os.pipe()
    try:
        argv = sandbox.argv(shell(), command, env, cwd, status_fd=status_write)
        proc = _popen(argv, cwd, {"PATH": SYSTEM_PATH}, pass_fds=(status_write,))
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    return proc, lambda: _wait_namespace_gone(status_read)


def _popen(argv: list[str], cwd: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
        preexec_fn=die_with_parent(signal.SIGKILL),  # a killed agent's command never completes behind its back
    )


def _wait_namespace_gone(status_read: int) -> None:
    """Wait (bounded) until the sandbox's PID 1, and so everything in its namespace, is gone."""
    try:
        os.set_blocking(status_read, False)
        try:
            status = os.read(status_read, 1 << 16)
        except BlockingIOError:
            status = b""
    finally:
        os.close(status_read)
    init = namespace_init(status)
    if init is None:
        return
    end = time.monotonic() + NAMESPACE_SETTLE_SECONDS
    while pid_alive(init) and time.monotonic() < end:
        time.sleep(0.002)


class CappedOutput:
    """Keeps the first half of `cap` bytes and a rolling tail of the second half."""

    def __init__(self, cap: int):
        cap = max(cap, 2)
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_len = 0
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        if len(chunk) >= self.tail_cap:
            self.tail.clear()
            self.tail.append(bytes(chunk[-self.tail_cap :]))
            self.tail_len = self.tail_cap
            return
        self.tail.append(bytes(chunk))
        self.tail_len += len(chunk)
        while self.tail_len > self.tail_cap:
            excess = self.tail_len - self.tail_cap
            first = self.tail[0]
            if len(first) <= excess:
                self.tail.popleft()
                self.tail_len -= len(first)
            else:
                self.tail[0] = first[excess:]
                self.tail_len -= excess

    @property
    def stored(self) -> int:
        return len(self.head) + self.tail_len

    def regions(self) -> tuple[str, str]:
        """(head, tail) as text: the whole output and "" when nothing was elided; else the kept first
        bytes and last bytes, without the characters the cut split."""
        if self.total == self.stored:
            return (bytes(self.head) + b"".join(self.tail)).decode("utf-8", errors="replace"), ""
        head = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(bytes(self.head))  # drops a split last char
        tail = b"".join(self.tail)
        skip = 0
        while skip < min(3, len(tail)) and 0x80 <= tail[skip] <= 0xBF:  # continuation bytes of a split first char
            skip += 1
        return head, tail[skip:].decode("utf-8", errors="replace")

    def text(self) -> str:
        head = bytes(self.head).decode("utf-8", errors="replace")
        tail = b"".join(self.tail).decode("utf-8", errors="replace")
        elided = self.total - self.stored
        if elided > 0:
            return f"{head}\n... [{elided} bytes elided] ...\n{tail}"
        return head + tail


def cap_text(text: str, cap: int) -> str:
    """`text` cut like command output when its UTF-8 form is over `cap` bytes."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= cap:
        return text
    buf = CappedOutput(cap)
    buf.add(data)
    return buf.text()


class _PipeReader:
    """Non-blocking reads of a pipe into a capped buffer."""

    def __init__(self, fd: int, buf: CappedOutput, sink: Callable[[bytes], None] | None = None):
        self.fd = fd
        self.buf = buf
        self.sink = sink
        self.eof = False
        os.set_blocking(fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(fd, selectors.EVENT_READ)

    def pump(self, wait: float) -> None:
        """Wait up to `wait` seconds for output and read what is there (bounded)."""
        if self.eof:
            time.sleep(wait)
            return
        if not self.sel.select(wait):
            return
        for _ in range(_READS_PER_TURN):
            try:
                chunk = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                self.sel.unregister(self.fd)
                return
            self.buf.add(chunk)
            if self.sink is not None:
                self.sink(chunk)

    def close(self) -> None:
        if not self.eof:
            try:
                self.sel.unregister(self.fd)
            except (KeyError, ValueError):
                pass
        self.sel.close()


def _terminate_group(proc: subprocess.Popen, reader: _PipeReader) -> None:
    """SIGTERM the whole group, keep reading for a grace period, then SIGKILL it."""
    pgid = proc.pid  # start_new_session: the shell leads its own group
    if signal_group(pgid, signal.SIGTERM):
        end = time.monotonic() + TERM_GRACE_SECONDS
        while time.monotonic() < end:
            reader.pump(0.05)
            if proc.poll() is not None and reader.eof and not group_alive(pgid):
                break
    signal_group(pgid, signal.SIGKILL)
    proc.wait()
    # Collect what the killed processes left in the pipe; a process that left the
    # group (setsid) may keep it open, so do not wait for EOF forever.
    end = time.monotonic() + 0.5
    while not reader.eof and time.monotonic() < end:
        reader.pump(0.05)
