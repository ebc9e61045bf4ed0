"""`python -m agent template`: a pre-imported agent that forks one child per task (the local runtime's warm start).

The local runtime starts one template and asks it, over the template's stdin
and stdout (JSON lines), to launch `run` (and `restore`) processes. A child
forked from it skips the interpreter's start and the imports (most of a cold
agent's 0.5-0.7 s to its first model call).

Invariants
- The template imports what `run` and `restore` import, freezes the collector,
  and then holds nothing a child could inherit by mistake: no thread, no
  connection, no file besides its channel (stdin, stdout), stderr, and one
  pidfd per running child. It never writes anything but protocol lines to
  stdout.
- A child is set up as `Children.start` sets up an exec'd process: its own
  session (so its pid is its process group), SIGTERM when its parent (this
  template) dies, stdin from /dev/null, stdout and stderr appended to the log
  file it is given, the working directory and the environment (os.environ
  replaced) it is given, default signal dispositions (SIGINT and SIGPIPE as a
  fresh interpreter has them), every other inherited descriptor closed; then
  `python -m agent <command>`'s `main`, and `os._exit` with its code.
- Parent-death chain: the runtime starts the template with a parent-death
  SIGTERM, the template's default SIGTERM action ends it, and each child gets
  SIGTERM when the template ends; a child of a runtime that died therefore
  gets SIGTERM, as an exec'd one does (a grandchild cannot ask for a signal on
  its grandparent's death).
- The template reaps its children and reports each exit as `returncode`
  (negative for a signal, as `subprocess` does). End of stdin (the runtime
  closed it or died) ends the template.

Protocol, one JSON object per line:
    runtime -> template  {"id": N, "argv": ["run", ...], "env": {...}, "cwd": "...", "log": "..."}
    template -> runtime  {"ready": true, "pid": P}                 once, after the imports
                         {"id": N, "pid": P, "start": T}         the child's pid and its start time
                                                                 (/proc/<pid>/stat, clock ticks since boot)
                         {"id": N, "error": "..."}               nothing was forked
                         {"pid": P, "returncode": R}             a child exited
Written by hand on purpose: the pieces (fork, setsid, dup2, pidfd, poll) are
the standard library's; no process-pool library forks into a new session with
a per-child environment and log file, and multiprocessing's forkserver would
bring its own pipes, threads and pickling to each child.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import traceback

from agent.procs import die_with_parent, start_time

COMMANDS = ("run", "restore")  # what a template child may run; the snapshotter stays an exec'd process
PRELOAD = (
    # Everything `run` (scripted model) and `restore` import, eagerly or lazily: with these, a finished
    # run's modules (agent.run's DEBUG_EXIT_REPORT lists them) are all in the template already.
    "agent.run",
    "agent.graph",
    "agent.checkpoint",
    "agent.models",
    "agent.tools",
    "agent.heartbeat",
    "agent.redact",
    "agent.telemetry",
    "agent.restore",
    "langgraph.checkpoint.sqlite",
    "langchain_core.tracers.context",
    "langchain_core.tracers.run_collector",
    "langchain_core.tracers.stdout",
    "yaml",
    "nats",
)


# The model providers (optional extras): a task with a real model would import them before its first
# call (~0.5 s); forked from here, it finds them loaded. Missing extras are skipped.
OPTIONAL_PRELOAD = ("langchain.chat_models", "langchain_openai", "langchain_anthropic")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


class Template:
    """The template's loop: requests on fd 0, answers on fd 1, one pidfd per child."""

    def __init__(self, channel_in: int = 0, channel_out: int = 1):
        self.channel_in, self.channel_out = channel_in, channel_out
        self.poll = select.poll()  # no descriptor of its own, unlike epoll
        self.poll.register(channel_in, select.POLLIN)
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.buffer = b""

    def serve(self) -> int:
        self.send({"ready": True, "pid": os.getpid()})
        while True:
            for fd, _events in self.poll.poll():
                if fd == self.channel_in:
                    if not self.read_requests():
                        return 0
                elif fd in self.children:
                    self.reap(fd)

    def read_requests(self) -> bool:
        chunk = os.read(self.channel_in, 1 << 16)
        if not chunk:
            return False  # the runtime closed the channel or died
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.launch(json.loads(line))
        return True

    def launch(self, request: dict) -> None:
        argv = list(request.get("argv") or ())
        if not argv or argv[0] not in COMMANDS:
            self.send({"id": request.get("id"), "error": f"the template runs {', '.join(COMMANDS)}, not {argv[:1]}"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            self.send({"id": request.get("id"), "error": f"fork failed: {exc}"})
            return
        if pid == 0:
            self.child(request, argv)  # never returns
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poll.register(pidfd, select.POLLIN)
        self.send({"id": request["id"], "pid": pid, "start": start_time(pid)})

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poll.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self.send({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})

    def child(self, request: dict, argv: list[str]) -> None:
        """In the forked child: become the process an exec would have made, then run the command."""
        code = 1
        try:
            parent = os.getppid()
            os.setsid()
            die_with_parent(signal.SIGTERM)()  # as exec'd children get it, relative to this template
            if os.getppid() != parent:  # the template died before the line above: no signal will come
                os._exit(128 + signal.SIGTERM)
            for sig in range(1, signal.NSIG):
                if sig in (signal.SIGKILL, signal.SIGSTOP):
                    continue
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass  # not a catchable signal number here
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the channel, the pidfds of its siblings, null, log
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [sys.argv[0], *argv]
            if argv[0] == "run":
                from agent.run import main
            else:
                from agent.restore import main
            code = main(argv[1:])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - a child never returns into the template's loop
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.channel_out, data) :]


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m agent template  (started by the local runtime; requests on stdin)", file=sys.stderr)
        return 2 if argv[0] not in ("-h", "--help") else 0
    if not hasattr(os, "pidfd_open"):
        print("agent template: needs Linux pidfds (os.pidfd_open)", file=sys.stderr)
        return 3
    preload()
    gc.collect()
    gc.freeze()  # what the imports made is shared with every child, copy-on-write: never walked again
    return Template().serve()
