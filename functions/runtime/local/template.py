"""The warm template, seen from the runtime: one `python -m agent template` per LocalRuntime, and its children.

The template (agent/template.py) has imported everything `run` and `restore`
need; it forks one child per request, so a child starts in milliseconds
instead of the 0.5-0.7 s an exec'd interpreter spends importing.

Invariants
- A `ForkedProcess` offers what the supervisor uses of an asyncio subprocess:
  `pid` (the leader of its own process group), `returncode` (negative for a
  signal, as asyncio's) and `wait()`. The template is the child's parent: it
  reaps the child and reports the exit status here.
- The template is started with `start_new_session` and a parent-death SIGTERM;
  its children get SIGTERM when it dies. So a child never outlives the runtime
  either: runtime dies -> template gets SIGTERM and ends -> children get SIGTERM.
- If the template dies, no child is lost silently: each one still running got
  SIGTERM from the kernel; once its process group is gone it is reported as
  ended by that SIGTERM (returncode -15, exit code 143), so the supervisor
  retries it from its checkpoint as after any crash. Its real status cannot be
  known (its parent was the template); an agent that finished in its last step
  finds its result file on the retry and exits at once.
- A launch while the template is down starts a new one; a template that cannot
  start (it exits before it is ready) is not tried again, and the caller falls
  back to exec. Both are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import signal
from collections.abc import Sequence

from agent.procs import die_with_parent, group_alive

log = logging.getLogger("dockyard.runtime.local")

READY_TIMEOUT_SECONDS = 120.0  # the template's imports; minutes on a loaded machine without bytecode
LOST_POLL_SECONDS = 0.05  # a child orphaned by the template's death is no one's child here: only looked at
CLOSE_SECONDS = 5.0


class TemplateUnavailable(Exception):
    """The template could not launch this child; the caller starts it the ordinary way."""


class ForkedProcess:
    """A child of the template: pid, returncode, wait(), as `asyncio.subprocess.Process` has them."""

    def __init__(self, pid: int, start: int | None):
        self.pid = pid
        self.start = start  # /proc/<pid>/stat start time: with the pid, the process's identity
        self.returncode: int | None = None
        self._done = asyncio.Event()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def exited(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._done.set()


class WarmTemplate:
    """One template process, started on first use (or by `warm_up`), started again after it died."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]):
        self.argv = tuple(argv)  # `python -m agent`: a request carries what follows it
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.broken = False  # it never got ready once: use exec from now on
        self._ready: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._closing = False

    def warm_up(self) -> None:
        """Start the template now, in the background, so the first launch does not wait for its imports."""
        if not self.broken and self._ready is None:
            asyncio.get_running_loop().create_task(self._started(), name="agent-template-warm-up")

    async def ready(self) -> bool:
        """Start the template if needed and wait for it: True once it takes requests, False if it cannot."""
        try:
            await self._started()
        except TemplateUnavailable:
            return False
        return True

    async def spawn(self, argv: Sequence[str], env: dict[str, str], cwd: str, log_file: str) -> ForkedProcess:
        """Fork `python -m agent <argv>` from the template; TemplateUnavailable when it cannot."""
        await self._started()
        proc = self.proc
        request_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        line = json.dumps({"id": request_id, "argv": list(argv), "env": env, "cwd": cwd, "log": log_file})
        try:
            assert proc is not None and proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()
        except (ConnectionError, AssertionError) as exc:
            self._pending.pop(request_id, None)
            raise TemplateUnavailable(f"the template's channel is closed ({exc!r})") from None
        return await answer

    async def close(self) -> None:
        """End the template (closing its stdin ends it; its remaining children get SIGTERM)."""
        self._closing = True
        if self._ready is not None and not self._ready.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ready)  # a start under way: let it finish, then end it
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), CLOSE_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    # --- the template process ------------------------------------------------

    async def _started(self) -> None:
        if self.broken or self._closing:
            raise TemplateUnavailable("the template is not in use")
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._start(self._ready), name="agent-template-start")
        await asyncio.shield(self._ready)

    async def _start(self, ready: asyncio.Future) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                "template",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=self.env,
                start_new_session=True,  # Ctrl-C in the terminal of `dockyard dev` is for dev, not for it
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
            assert self.proc.stdout is not None
            first = await asyncio.wait_for(self.proc.stdout.readline(), READY_TIMEOUT_SECONDS)
            if not json.loads(first or b"{}").get("ready"):
                raise TemplateUnavailable(f"the template exited before it was ready ({first!r})")
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, exec works
            self.broken = True
            if self.proc is not None:
                if self.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                await self.proc.wait()
            log.warning("the warm agent template did not start (%s); agents are started by exec", exc)
            ready.set_exception(exc if isinstance(exc, TemplateUnavailable) else TemplateUnavailable(str(exc)))
            ready.exception()  # retrieved: a warm-up nobody awaits must not log it again
            return
        log.info("warm agent template ready (pid %d)", self.proc.pid)
        self._reader = asyncio.get_running_loop().create_task(self._read(self.proc), name="agent-template-reader")
        ready.set_result(None)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            message = json.loads(line)
            if "returncode" in message:
                child = self._children.pop(message["pid"], None)
                if child is not None:
                    child.exited(message["returncode"])
                continue
            answer = self._pending.pop(message["id"], None)
            if "error" in message:
                if answer is not None:
                    answer.set_exception(TemplateUnavailable(message["error"]))
                continue
            child = ForkedProcess(message["pid"], message.get("start"))
            self._children[child.pid] = child
            if answer is not None:
                answer.set_result(child)
        await proc.wait()
        self._lost(proc.returncode)

    def _lost(self, returncode: int | None) -> None:
        """The template ended: the next launch starts a new one; its children are waited for by their groups."""
        self._ready = None
        self.proc = None
        for answer in self._pending.values():
            answer.set_exception(TemplateUnavailable("the template ended before it answered"))
        self._pending.clear()
        orphans, self._children = list(self._children.values()), {}
        if not self._closing or orphans:
            log.warning(
                "the warm agent template ended (returncode %s) with %d child(ren) running; they got SIGTERM%s",
                returncode, len(orphans), "" if self._closing else "; the next launch starts a new template",
            )
        for child in orphans:
            asyncio.get_running_loop().create_task(_reported_when_gone(child), name=f"agent-template-orphan-{child.pid}")


async def _reported_when_gone(child: ForkedProcess) -> None:
    """A child whose parent (the template) died: it got SIGTERM; report that once its group is gone."""
    while group_alive(child.pid):
        await asyncio.sleep(LOST_POLL_SECONDS)
    child.exited(-signal.SIGTERM)
