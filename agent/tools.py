"""The agent's work tools: `execute`, `read_file`, `write_file`, `list_dir`.

The agent runs whatever the model writes, so these tools are the fence. The
invariant every function here keeps:

* Tools never escape the workspace. Every path the model gives (and the
  working directory of `execute`) is resolved, symlinks included, and must lie
  inside the workspace; `..` escapes, absolute paths elsewhere and symlinks
  pointing out are refused. (A shell command can still read what the container
  lets it read: the container itself is the outer fence, see knative/.)
* Tools never crash the agent. `WorkTools.call` never raises: a refused path,
  a missing file, binary content, a bad argument, a timeout or a non-zero exit
  all come back as `ToolResult(ok=False, output=<message the model can act on>)`.
  Output is capped while it is read, and a command that outlives its timeout
  is killed with its whole process group (SIGTERM, then SIGKILL).
* Tools never see secrets. `execute` builds the child's environment from
  scratch (PATH, HOME, PYTHONUSERBASE, LANG, TMPDIR, proxy settings with any
  credentials stripped, a few constants); nothing is inherited from the agent's
  own environment.
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.procs import die_with_parent, group_alive, signal_group

__all__ = ["ToolResult", "WorkTools", "SYSTEM_PATH", "strip_userinfo"]

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

TERM_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL of a process group
LINGER_GRACE_SECONDS = 1.0  # how long background children may hold the output after the command exits
_READ_CHUNK = 1 << 16
_READS_PER_TURN = 64  # bound one drain, so an endless writer cannot starve the deadline check


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str


class ToolError(Exception):
    """A failure the model should see as a tool error (ok=False)."""


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


class _CappedOutput:
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

    def text(self) -> str:
        head = bytes(self.head).decode("utf-8", errors="replace")
        tail = b"".join(self.tail).decode("utf-8", errors="replace")
        elided = self.total - self.stored
        if elided > 0:
            return f"{head}\n... [{elided} bytes elided] ...\n{tail}"
        return head + tail


def _cap_text(text: str, cap: int) -> str:
    data = text.encode("utf-8", errors="replace")
    if len(data) <= cap:
        return text
    buf = _CappedOutput(cap)
    buf.add(data)
    return buf.text()


_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int, float)}
_PY_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return _PY_TYPE_NAMES.get(type(value), type(value).__name__)


class WorkTools:
    """The four tools, confined to `workspace`. Use `call(name, args)` from the agent loop."""

    def __init__(
        self,
        workspace: Path,
        home: Path,
        *,
        output_cap: int = 16_000,
        default_timeout: int = 120,
        max_timeout: int = 1800,
        proxy_env: Mapping[str, str] | None = None,
        read_cap: int = 1_000_000,
        list_cap: int = 1_000,
    ):
        self.workspace = Path(workspace)
        self.root = self.workspace.resolve()
        self.home = Path(home).absolute()
        self.output_cap = max(int(output_cap), 64)
        self.max_timeout = max(int(max_timeout), 1)
        self.default_timeout = min(max(int(default_timeout), 1), self.max_timeout)
        self.read_cap = int(read_cap)
        self.list_cap = int(list_cap)
        self.proxy_env = self._proxy_settings(proxy_env or {})
        self._tools: dict[str, tuple[Callable[..., ToolResult], dict[str, Any]]] = {
            "execute": (self._execute, self._execute_params()),
            "read_file": (self._read_file, self._path_params("File to read.")),
            "write_file": (self._write_file, self._write_params()),
            "list_dir": (self._list_dir, self._path_params("Directory to list (default: the workspace root).", False)),
        }

    # --- public API ----------------------------------------------------------
    def call(self, name: str, args: Mapping[str, Any] | None) -> ToolResult:
        """Run tool `name` with `args`. Never raises: every failure is ok=False with a message."""
        try:
            entry = self._tools.get(name) if isinstance(name, str) else None
            if entry is None:
                return ToolResult(False, f"unknown tool {name!r}; available tools: {', '.join(self._tools)}")
            fn, params = entry
            kwargs = self._validate(name, params, {} if args is None else args)
            return fn(**kwargs)
        except ToolError as exc:
            return ToolResult(False, str(exc))
        except Exception as exc:  # never crash the agent
            return ToolResult(False, f"{name} failed: {type(exc).__name__}: {exc}")

    def execute(self, command: str, timeout_seconds: int | None = None) -> str:
        args: dict[str, Any] = {"command": command}
        if timeout_seconds is not None:
            args["timeout_seconds"] = timeout_seconds
        return self.call("execute", args).output

    def read_file(self, path: str) -> str:
        return self.call("read_file", {"path": path}).output

    def write_file(self, path: str, content: str) -> str:
        return self.call("write_file", {"path": path, "content": content}).output

    def list_dir(self, path: str = ".") -> str:
        return self.call("list_dir", {"path": path}).output

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style function definitions (usable with LangChain `bind_tools`)."""
        descriptions = {
            "execute": (
                f"Run a shell command (bash -c) with the workspace root {self.root} as working directory. "
                f"Returns 'exit code N' and the combined stdout/stderr (long output is cut in the middle). "
                f"The command is killed after timeout_seconds (default {self.default_timeout}, "
                f"max {self.max_timeout}). stdin is closed; nothing is interactive. "
                f"Install Python packages with 'pip install --user'. "
                f"Background processes still attached to the output are stopped when the command ends."
            ),
            "read_file": (
                f"Read a UTF-8 text file inside the workspace ({self.root}) and return its content. "
                f"Paths are relative to the workspace root. Files over {self.read_cap} bytes and binary files "
                f"are refused: use execute with head/sed/grep for those."
            ),
            "write_file": (
                f"Write content to a file inside the workspace ({self.root}), replacing it atomically; "
                f"parent directories are created. Paths are relative to the workspace root."
            ),
            "list_dir": (
                f"List a directory inside the workspace ({self.root}): one name per line, sorted, "
                f"directories end with '/'."
            ),
        }
        return [
            {
                "type": "function",
                "function": {"name": name, "description": descriptions[name], "parameters": params},
            }
            for name, (_, params) in self._tools.items()
        ]

    # --- argument schemas and validation ------------------------------------
    def _path_params(self, description: str, required: bool = True) -> dict[str, Any]:
        prop: dict[str, Any] = {"type": "string", "description": description}
        if not required:
            prop["default"] = "."
        return {
            "type": "object",
            "properties": {"path": prop},
            "required": ["path"] if required else [],
            "additionalProperties": False,
        }

    def _write_params(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "File to write."},
                "content": {"type": "string", "description": "The complete new content of the file."},
            },
            "required": ["path", "content"],
            "additionalProperties": False,
        }

    def _execute_params(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "Shell command, run with bash -c."},
                "timeout_seconds": {
                    "type": "integer",
                    "description": f"Seconds before the command is killed (1-{self.max_timeout}).",
                    "minimum": 1,
                    "maximum": self.max_timeout,
                    "default": self.default_timeout,
                },
            },
            "required": ["command"],
            "additionalProperties": False,
        }

    def _validate(self, tool: str, params: dict[str, Any], args: Any) -> dict[str, Any]:
        if not isinstance(args, Mapping):
            raise ToolError(f"{tool}: arguments must be a JSON object, got {_type_name(args)}")
        props: dict[str, Any] = params["properties"]
        unexpected = [k for k in args if k not in props]
        if unexpected:
            raise ToolError(
                f"{tool}: unexpected argument(s) {', '.join(repr(str(k)) for k in unexpected)}; "
                f"expected: {', '.join(props)}"
            )
        missing = [k for k in params["required"] if k not in args]
        if missing:
            raise ToolError(f"{tool}: missing required argument(s) {', '.join(repr(k) for k in missing)}")
        out: dict[str, Any] = {}
        for key, value in args.items():
            want = props[key]["type"]
            if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[want]):
                article = "an" if want[0] in "aeiou" else "a"
                raise ToolError(f"{tool}: argument {key!r} must be {article} {want}, got {_type_name(value)}")
            if want == "integer":
                if value != value or value in (float("inf"), float("-inf")):
                    raise ToolError(f"{tool}: argument {key!r} must be a finite integer")
                value = int(value)
            out[key] = value
        return out

    # --- paths ---------------------------------------------------------------
    def _display(self, p: Path) -> str:
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return str(p)
        return str(rel) if str(rel) != "." else "."

    def _check_path_arg(self, path: str) -> Path:
        if "\x00" in path:
            raise ToolError(f"path {path!r} contains a NUL byte")
        return Path(path) if os.path.isabs(path) else self.root / path

    def _outside(self, path: str) -> ToolError:
        return ToolError(
            f"path {path!r} is outside the workspace {self.root}: "
            f"use a path relative to the workspace root (symlinks may not point outside either)"
        )

    def _resolve(self, path: str) -> Path:
        """Resolve `path` (relative to the workspace, or absolute) and refuse anything outside."""
        candidate = self._check_path_arg(path)
        try:
            resolved = candidate.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # symlink loops
            raise ToolError(f"cannot resolve path {path!r}: {exc}") from None
        if not resolved.is_relative_to(self.root):
            raise self._outside(path)
        return resolved

    def _resolve_for_write(self, path: str) -> Path:
        if not path:
            raise ToolError("write_file: argument 'path' must not be empty")
        candidate = self._check_path_arg(path)
        try:
            parent = candidate.parent.resolve(strict=False)
        except (OSError, RuntimeError) as exc:
            raise ToolError(f"cannot resolve path {path!r}: {exc}") from None
        if not parent.is_relative_to(self.root):
            raise self._outside(path)
        name = candidate.name
        if name in ("", ".", ".."):
            raise ToolError(f"path {path!r} does not name a file")
        target = parent / name
        if target.is_symlink():
            # Never follow a final symlink out; one pointing inside is written through.
            try:
                target = target.resolve(strict=False)
            except (OSError, RuntimeError) as exc:
                raise ToolError(f"cannot resolve path {path!r}: {exc}") from None
            if not target.is_relative_to(self.root):
                raise self._outside(path)
        if target == self.root:
            raise ToolError(f"path {path!r} is a directory")
        return target

    # --- file tools ----------------------------------------------------------
    def _read_file(self, path: str) -> ToolResult:
        if not path:
            raise ToolError("read_file: argument 'path' must not be empty")
        target = self._resolve(path)
        shown = self._display(target)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ToolError(f"file not found: {shown}") from None
        except IsADirectoryError:
            raise ToolError(f"{shown} is a directory: use list_dir") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._outside(path) from None
            raise ToolError(f"cannot open {shown}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ToolError(f"{shown} is a directory: use list_dir")
            if not stat.S_ISREG(st.st_mode):
                raise ToolError(f"{shown} is not a regular file")
            if st.st_size > self.read_cap:
                raise ToolError(
                    f"{shown} is {st.st_size} bytes, over the {self.read_cap}-byte read limit: "
                    f"use execute with head, tail, sed -n or grep to read parts of it"
                )
            chunks = []
            remaining = self.read_cap + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
        if len(data) > self.read_cap:
            raise ToolError(f"{shown} is over the {self.read_cap}-byte read limit: use execute with head/sed/grep")
        if b"\x00" in data:
            raise ToolError(
                f"{shown} is a binary file ({len(data)} bytes) and is not shown: use execute (file, xxd, od) to inspect it"
            )
        try:
            return ToolResult(True, data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ToolError(
                f"{shown} is not valid UTF-8 text (bad byte at offset {exc.start}): "
                f"use execute (file, iconv, xxd) to inspect it"
            ) from None

    def _write_file(self, path: str, content: str) -> ToolResult:
        target = self._resolve_for_write(path)
        shown = self._display(target)
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ToolError(f"write_file: content is not encodable as UTF-8: {exc}") from None
        if target.is_dir():
            raise ToolError(f"{shown} is a directory")
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ToolError(f"cannot create the directory for {shown}: a path component is a file") from None
        except OSError as exc:
            raise ToolError(f"cannot create the directory for {shown}: {exc.strerror or exc}") from None
        # mkdir may have raced with a symlink swap; check once more before writing.
        if not parent.resolve(strict=False).is_relative_to(self.root):
            raise self._outside(path)
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        tmp_fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(tmp_fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, target)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
        return ToolResult(True, f"wrote {len(data)} bytes to {shown}")

    def _list_dir(self, path: str = ".") -> ToolResult:
        target = self._resolve(path or ".")
        shown = self._display(target)
        if not target.exists():
            raise ToolError(f"directory not found: {shown}")
        if not target.is_dir():
            raise ToolError(f"{shown} is not a directory: use read_file")
        try:
            with os.scandir(target) as it:
                entries = []
                for entry in it:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    entries.append(entry.name + ("/" if is_dir else ""))
        except OSError as exc:
            raise ToolError(f"cannot list {shown}: {exc.strerror or exc}") from None
        if not entries:
            return ToolResult(True, f"(empty directory: {shown})")
        entries.sort()
        shown_entries = entries[: self.list_cap]
        text = "\n".join(shown_entries)
        if len(entries) > len(shown_entries):
            text += f"\n... and {len(entries) - len(shown_entries)} more entries (use execute with ls or find)"
        return ToolResult(True, _cap_text(text, self.output_cap))

    # --- execute -------------------------------------------------------------
    @staticmethod
    def _proxy_settings(proxy_env: Mapping[str, str]) -> dict[str, str]:
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

    def environment(self) -> dict[str, str]:
        """The scrubbed environment every command runs with (git clone uses it too)."""
        local = self.home / ".local"
        tmpdir = self.home / "tmp"
        try:
            tmpdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            tmpdir = Path("/tmp")
        env = {
            "PATH": f"{local / 'bin'}:{SYSTEM_PATH}",
            "HOME": str(self.home),
            "PYTHONUSERBASE": str(local),
            "LANG": "C.UTF-8",
            "TMPDIR": str(tmpdir),
            "TERM": "dumb",
            "PAGER": "cat",
            "GIT_PAGER": "cat",
            "GIT_TERMINAL_PROMPT": "0",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        env.update(self.proxy_env)
        return env

    @staticmethod
    def _shell() -> str:
        return shutil.which("bash", path=SYSTEM_PATH) or shutil.which("sh", path=SYSTEM_PATH) or "/bin/sh"

    def _execute(self, command: str, timeout_seconds: int | None = None) -> ToolResult:
        if not command.strip():
            raise ToolError("execute: argument 'command' must not be empty")
        if "\x00" in command:
            raise ToolError("execute: argument 'command' contains a NUL byte")
        timeout = self.default_timeout if timeout_seconds is None else timeout_seconds
        timeout = min(max(int(timeout), 1), self.max_timeout)
        if not self.root.is_dir():
            raise ToolError(f"execute: the workspace {self.root} does not exist")
        try:
            proc = subprocess.Popen(
                [self._shell(), "-c", command],
                cwd=self.root,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=die_with_parent(signal.SIGKILL),  # a killed agent's command never completes behind its back
            )
        except OSError as exc:
            raise ToolError(f"execute: cannot start the shell: {exc}") from None
        assert proc.stdout is not None
        reader = _PipeReader(proc.stdout.fileno(), _CappedOutput(self.output_cap))
        timed_out = False
        lingering = False
        try:
            deadline = time.monotonic() + timeout
            exited_at: float | None = None
            while True:
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
            reader.close()
            proc.stdout.close()
        output = reader.buf.text()
        if timed_out:
            return ToolResult(
                False,
                f"timed out after {timeout} s: the command and its process group were killed "
                f"(pass a larger timeout_seconds, max {self.max_timeout}, for long commands)\n{output}",
            )
        code = proc.returncode
        if code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            head = f"exit code {code} (killed by {signame})"
        else:
            head = f"exit code {code}"
        if lingering:
            head += " (background processes still attached to the output were stopped)"
        return ToolResult(code == 0, f"{head}\n{output}")


class _PipeReader:
    """Non-blocking reads of a pipe into a capped buffer."""

    def __init__(self, fd: int, buf: _CappedOutput):
        self.fd = fd
        self.buf = buf
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
