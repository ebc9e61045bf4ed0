"""What the LocalRuntime tests share: a stand-in for `python -m agent`, a job-event sink, helpers.

The stand-in takes the agent's command line (`run|restore|snapshotter --flag value ...`)
and behaves as its task prompt says, e.g. `exit:1,1,0` (exit 1, then 1, then 0 on the
third attempt), `sleep:30` (until SIGTERM, then exit 143 like the agent) or `gate`
(until the test writes `go` into the workspace).
The fixtures `stand_in` and `clock` are in this folder's conftest.py.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from agent import contract
from functions.core.task import Task, parse_task
from functions.runtime.local import LocalRuntime
from functions.runtime.local.state import SupervisorState
from tests.conftest import eventually_async
from tests.functions.runtime.fake_clock import FakeClock

STAND_IN = textwrap.dedent(
    '''
    import json, os, signal, sys, time
    from pathlib import Path

    command = sys.argv[1]
    args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    ws = Path(args["--workspace"])

    def note(name, text):
        with open(ws / name, "a") as fh:
            fh.write(text + "\\n")

    if command == "restore":
        note("restore.log", str(time.time()))
        sys.exit(int(os.environ.get("STANDIN_RESTORE_EXIT", "0")))

    if command == "snapshotter":
        def final(*_):
            note("snapshotter.log", "final")
            if os.environ.get("STANDIN_FINAL_UPLOAD"):
                from agent.storage import open_store
                open_store(args["--store"]).put_bytes(f"jobs/{args['--task-id']}/final/result.json", b"{}")
            sys.exit(0)
        signal.signal(signal.SIGTERM, final)
        note("snapshotter.log", "start")
        while True:
            time.sleep(1)

    task = json.loads(Path(args["--task-file"]).read_text())
    kind, _, arg = task["prompt"].partition(":")
    runs = ws / "runs.log"
    n = len(runs.read_text().splitlines()) if runs.exists() else 0

    def started():  # written once the signal handling is in place: a test may signal it next
        note("runs.log", f"{time.time()} {os.getpid()} {args.get('--model', '-')}")

    def done(outcome="done"):
        (ws / ".dockyard").mkdir(exist_ok=True)
        (ws / ".dockyard" / "result.json").write_text(json.dumps({"outcome": outcome, "summary": f"stand-in {outcome}"}))
        sys.exit(0)

    def until_sigterm(seconds):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        started()
        time.sleep(seconds)

    if kind == "exit":
        started()
        codes = [int(c) for c in arg.split(",")]
        code = codes[min(n, len(codes) - 1)]
        print(f"stand-in attempt {n + 1} exits with {code}", file=sys.stderr, flush=True)
        if code == 0:
            done()
        sys.exit(code)
    if kind == "sleep":
        until_sigterm(float(arg))
        done()
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        started()
        time.sleep(float(arg))
    if kind == "gate":  # works until the test writes `go` into its workspace (SIGTERM: exit 143)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        started()
        while not (ws / "go").exists():
            time.sleep(0.02)
        done()
    if kind == "resume":  # the first run works until stopped; the next one "resumes" and finishes
        if n == 0:
            until_sigterm(60)
        started()
        done()
    sys.exit(2)
    '''
)


class Sink:
    """Collects the job events the runtime emits; can fail the first deliveries."""

    def __init__(self, fail_first: int = 0):
        self.events: list[dict] = []
        self.fail_first = fail_first
        self.calls = 0
        self.on_event = None

    async def __call__(self, event: dict) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError("broker not ready")
        if self.on_event:
            self.on_event(event)
        self.events.append(event)


def make_task(prompt: str, task_id: str = "t-1", model: str | None = None, **limits) -> Task:
    limits = {"deadline_seconds": 60, "retries": 3, **limits}
    data = {"task_id": task_id, "prompt": prompt, "limits": limits, **({"model": model} if model else {})}
    return parse_task(data, source="test", event_id="1")


def runtime_for(tmp_path, stand_in, sink, clock=None, nats_url=None, **kw) -> LocalRuntime:
    kw = {"backoff_seconds": 2.0, "grace_seconds": 1.0, "snapshotter_grace_seconds": 5.0, **kw}
    env = {**os.environ, **kw.pop("env", {})}
    return LocalRuntime(
        tmp_path / "data", nats_url, (tmp_path / "store").as_uri(), sink, agent_cmd=stand_in, env=env, clock=clock, **kw
    )


def state_of(runtime: LocalRuntime, task_id: str = "t-1") -> SupervisorState:
    """The task's Job status as persisted in its folder (what a restart continues from)."""
    state = runtime.folders.load(task_id)
    assert state is not None, f"no task {task_id}"
    return state


async def wait_finished(runtime: LocalRuntime, sink: Sink, task_id: str = "t-1") -> SupervisorState:
    """Wait until the task is finished and its job event delivered; its final state."""

    def finished():
        state = runtime.folders.load(task_id)
        return state if state is not None and state.finished and state.event_sent else None

    state = await eventually_async(finished, f"task {task_id} finished and its job event delivered")
    assert any(e["data"]["metadata"]["name"] == contract.job_name(task_id) for e in sink.events)
    return state


async def wait_backoff(runtime: LocalRuntime, clock: FakeClock, failures: int, seconds: float, task_id: str = "t-1") -> None:
    """Wait until the task waits `seconds` on the clock after its `failures`-th failed attempt."""

    def backing_off():
        state = runtime.folders.load(task_id)
        return (
            state is not None
            and (state.state, state.failures) == (contract.STATE_RETRYING, failures)
            and seconds in clock.pending()
        )

    await eventually_async(backing_off, f"a {seconds}s backoff after failure {failures} of task {task_id}")


def workspace(runtime: LocalRuntime, task_id: str = "t-1") -> Path:
    return runtime.folder(task_id).workspace


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def condition(event: dict) -> dict:
    (cond,) = event["data"]["status"]["conditions"]
    return cond
