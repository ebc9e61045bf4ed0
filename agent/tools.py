"""The agent's work tools: `execute`, `read_file`, `write_file`, `list_dir`.

The agent runs whatever the model writes, so these tools are the fence. The
invariants every tool keeps (the first and the last are kept by the modules
named):

* Tools never escape the workspace (`agent.workspace`): every path the model
  gives is resolved, symlinks included, and must lie inside the workspace; the
  working directory of `execute` is the workspace root.
* Tools never crash the agent. `WorkTools.call` never raises: a refused path,
  a missing file, binary content, a bad argument, a timeout or a non-zero exit
  all come back as `ToolResult(ok=False, output=<message the model can act on>)`.
* Tools never see secrets (`agent.execute`): a command runs with an
  environment built from scratch, and is killed with its whole process group
  when it outlives its timeout; its output is capped while it is read.
* Each call's full output is kept (`agent.outputs`) when the tools have an
  `OutputStore` and the call an id: the command's output as it is read, the
  other tools' answers as they are. The `ToolResult` says its true size, its
  first and last bytes as kept, and the file.
* With a `Sandbox` (`agent.sandbox`, under `dockyard dev`) every command, and
  git clone through `wrap`, runs in bubblewrap: it sees the workspace and home,
  nothing else of the host, and reaches the network only through the proxy.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.execute import (
    SYSTEM_PATH,
    cap_text,
    proxy_settings,
    run_command,
    scrubbed_environment,
    strip_userinfo,
)
from agent.outputs import OutputFile, OutputStore
from agent.sandbox import Sandbox, wrap_argv
from agent.workspace import PathRefused, Workspace

__all__ = ["SYSTEM_PATH", "ToolResult", "WorkTools", "strip_userinfo"]


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str  # what the model sees (a long command output cut in the middle)
    # For the trace, not the model (so left out of equality): the whole output as it was kept.
    output_bytes: int | None = field(default=None, compare=False)  # its true size; None: `output` is all of it
    output_head: str = field(default="", compare=False)  # its first bytes as kept (all of it when the tail is "")
    output_tail: str = field(default="", compare=False)  # its last bytes as kept; "" when the head holds it all
    output_file: str | None = field(default=None, compare=False)  # relative to the workspace, when it was kept
    output_cut: bool = field(default=False, compare=False)  # the file holds only its first bytes (the task's bound)


def _with_file(result: ToolResult, out: OutputFile | None) -> ToolResult:
    if out is None or not out.kept:
        return result
    return replace(result, output_file=out.relative, output_cut=out.cut)


class ToolError(Exception):
    """A failure the model should see as a tool error (ok=False)."""


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
        sandbox: Sandbox | None = None,
        outputs: OutputStore | None = None,
    ):
        self.workspace = Path(workspace)
        self.ws = Workspace(self.workspace)
        self.root = self.ws.root
        self.home = Path(home).absolute()
        self.output_cap = max(int(output_cap), 64)
        self.max_timeout = max(int(max_timeout), 1)
        self.default_timeout = min(max(int(default_timeout), 1), self.max_timeout)
        self.read_cap = int(read_cap)
        self.list_cap = int(list_cap)
        self.proxy_env = proxy_settings(proxy_env or {})
        self.sandbox = sandbox
        self.outputs = outputs
        self._tools: dict[str, tuple[Callable[..., ToolResult], dict[str, Any]]] = {
            "execute": (self._execute, self._execute_params()),
            "read_file": (self._read_file, self._path_params("File to read.")),
            "write_file": (self._write_file, self._write_params()),
            "list_dir": (self._list_dir, self._path_params("Directory to list (default: the workspace root).", False)),
        }

    # --- public API ----------------------------------------------------------
    def call(self, name: str, args: Mapping[str, Any] | None, call_id: str | None = None) -> ToolResult:
        """Run tool `name` with `args`. Never raises: every failure is ok=False with a message.
        With a `call_id` (and an `OutputStore`) the call's full output is kept under that id."""
        result = self._call(name, args, call_id)
        if result.output_bytes is not None:  # a command's output: kept while it was read
            return result
        data = result.output.encode("utf-8", errors="replace")
        result = replace(result, output_bytes=len(data), output_head=result.output)
        keep = self.outputs is not None and call_id is not None
        return _with_file(result, self.outputs.save(call_id, result.output) if keep else None)

    def _call(self, name: str, args: Mapping[str, Any] | None, call_id: str | None) -> ToolResult:
        try:
            entry = self._tools.get(name) if isinstance(name, str) else None
            if entry is None:
                return ToolResult(False, f"unknown tool {name!r}; available tools: {', '.join(self._tools)}")
            fn, params = entry
            kwargs = self._validate(name, params, {} if args is None else args)
            if name == "execute":
                return self._execute(**kwargs, call_id=call_id)
            return fn(**kwargs)
        except (ToolError, PathRefused) as exc:
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

    # --- file tools ----------------------------------------------------------
    def _read_file(self, path: str) -> ToolResult:
        if not path:
            raise ToolError("read_file: argument 'path' must not be empty")
        target = self.ws.resolve(path)
        shown = self.ws.display(target)
        fd = self._open_for_read(path, target, shown)
        try:
            data = self._read_regular(fd, shown)
        finally:
            os.close(fd)
        return ToolResult(True, self._as_text(data, shown))

    def _open_for_read(self, path: str, target: Path, shown: str) -> int:
        """Open without following a final symlink (swapped in after `resolve`) and without blocking on a FIFO."""
        try:
            return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ToolError(f"file not found: {shown}") from None
        except IsADirectoryError:
            raise ToolError(f"{shown} is a directory: use list_dir") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.ws.outside(path) from None
            raise ToolError(f"cannot open {shown}: {exc.strerror or exc}") from None

    def _read_regular(self, fd: int, shown: str) -> bytes:
        """The content of a regular file, refused when over `read_cap` (checked on the open file, not the path)."""
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
        remaining = self.read_cap + 1  # one byte more: a file that grew past the cap is noticed
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > self.read_cap:
            raise ToolError(f"{shown} is over the {self.read_cap}-byte read limit: use execute with head/sed/grep")
        return data

    @staticmethod
    def _as_text(data: bytes, shown: str) -> str:
        """UTF-8 text, or a message pointing the model to tools for binary and other encodings."""
        if b"\x00" in data:
            raise ToolError(
                f"{shown} is a binary file ({len(data)} bytes) and is not shown: use execute (file, xxd, od) to inspect it"
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ToolError(
                f"{shown} is not valid UTF-8 text (bad byte at offset {exc.start}): "
                f"use execute (file, iconv, xxd) to inspect it"
            ) from None

    def _write_file(self, path: str, content: str) -> ToolResult:
        if not path:
            raise ToolError("write_file: argument 'path' must not be empty")
        target = self.ws.resolve_for_write(path)
        shown = self.ws.display(target)
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
        if not self.ws.still_inside(parent):
            raise self.ws.outside(path)
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
        target = self.ws.resolve(path or ".")
        shown = self.ws.display(target)
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
        return ToolResult(True, cap_text(text, self.output_cap))

    # --- execute -------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """The scrubbed environment every command runs with (git clone uses it too)."""
        env = scrubbed_environment(self.home, self.proxy_env)
        return env if self.sandbox is None else self.sandbox.environment(env)

    def wrap(
        self, argv: list[str], cwd: Path, env: Mapping[str, str] | None = None, read_only: tuple[Path, ...] = ()
    ) -> tuple[list[str], dict[str, str]]:
        """`argv` as this task's commands run (in the sandbox, if any) and the environment to start it with.
        `env`: the command's environment (default `environment()`); `read_only`: host paths the sandbox
        shows read-only (a file:// repository to clone)."""
        env = dict(self.environment() if env is None else env)
        if self.sandbox is None:
            return list(argv), env
        return wrap_argv(replace(self.sandbox, read_only=read_only), argv, env, cwd), {"PATH": SYSTEM_PATH}

    def _execute(self, command: str, timeout_seconds: int | None = None, call_id: str | None = None) -> ToolResult:
        if not command.strip():
            raise ToolError("execute: argument 'command' must not be empty")
        if "\x00" in command:
            raise ToolError("execute: argument 'command' contains a NUL byte")
        timeout = self.default_timeout if timeout_seconds is None else timeout_seconds
        timeout = min(max(int(timeout), 1), self.max_timeout)
        if not self.root.is_dir():
            raise ToolError(f"execute: the workspace {self.root} does not exist")
        out = self.outputs.open(call_id) if self.outputs is not None and call_id is not None else None
        try:
            result = run_command(
                command, self.root, self.environment(), timeout, self.output_cap, self.sandbox,
                sink=out.write if out is not None else None,
            )
        except OSError as exc:
            raise ToolError(f"execute: cannot start the shell: {exc}") from None
        finally:
            if out is not None:
                out.close()
        full = {"output_bytes": result.total_bytes, "output_head": result.head, "output_tail": result.tail}
        if result.timed_out:
            return _with_file(ToolResult(
                False,
                f"timed out after {timeout} s: the command and its process group were killed "
                f"(pass a larger timeout_seconds, max {self.max_timeout}, for long commands)\n{result.output}",
                **full,
            ), out)
        code = result.returncode
        if code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            head = f"exit code {code} (killed by {signame})"
        else:
            head = f"exit code {code}"
        if result.lingering:
            head += " (background processes still attached to the output were stopped)"
        return _with_file(ToolResult(code == 0, f"{head}\n{result.output}", **full), out)
