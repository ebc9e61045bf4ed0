"""Warm start: a task's agent from launch to its first model call, forked from the warm template vs exec'd
cold, interleaved in the same run.

    .venv/bin/python bench/bench_warmstart.py [--rounds 9] [--runtime-rounds 5]

(a) The agent alone, as the local runtime starts it (functions/runtime/local/processes.py): cold is
    `python -m agent run ...` exec'd with its own session and a parent-death signal
    (`asyncio.create_subprocess_exec`, as `Children._exec`); warm is a request to one
    `python -m agent template` (`WarmTemplate.spawn`), started once before the rounds: a runtime pays the
    template's imports once, not per task. Both run the scripted model (first turn a `plan`, no delay), no
    NATS, on a fresh workspace; the trace reaches the bench through a pipe on both sides (the exec'd
    agent's stdout; a FIFO as the forked agent's log file).
(b) The whole local runtime, `LocalRuntime.launch` to the same mark, warm vs `warm=False`: admission,
    restore (forked too when warm), the snapshotter (always exec'd), then the agent; the agent's log is a
    regular file here, polled every millisecond.
Marks, from the agent's trace: `status started` (its set-up is done: model loaded, graph built,
checkpoint opened; the first model call is next) and the first `todo` event, which the first model call's
`plan` turn produces as soon as the call returns. "Launch -> first model call" is launch -> that `todo`
(an upper bound; the scripted call itself takes microseconds). Rounds alternate cold and warm; medians.
Bytecode as ./scripts/setup compiles it.
Target (issue 13): (a) warm <= 150 ms, median. Exit status 1 when it is missed; (b) is printed only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.procs import die_with_parent, signal_group  # noqa: E402
from functions.runtime.local import LocalRuntime  # noqa: E402
from functions.runtime.local.processes import child_env  # noqa: E402
from functions.runtime.local.template import WarmTemplate  # noqa: E402
from tests.functions.runtime.local_stand_in import make_task  # noqa: E402

TARGET_MS = 150.0
AGENT = (sys.executable, "-m", "agent")
TURNS = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["work"], "objective": "work"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": "sleep 30"}}]},
    {"tool_calls": [{"name": "finish", "args": {"summary": "ok"}}]},
]
STARTED, FIRST_CALL = b'"state":"started"', b'"type":"todo"'


def environment() -> dict[str, str]:
    return child_env({k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")})


def run_argv(tmp: Path, scripts: Path) -> list[str]:
    (tmp / "ws").mkdir(parents=True)
    (tmp / "task.json").write_text('{"prompt": "work"}')
    return [
        "run", "--task-id", "bench", "--workspace", str(tmp / "ws"), "--task-file", str(tmp / "task.json"),
        "--model", "scripted:turns", "--scripts-dir", str(scripts), "--home", str(tmp / "home"),
        "--secrets-dir", str(tmp / "none"),
    ]  # fmt: skip


async def marks(reader: asyncio.StreamReader, began: float) -> tuple[float, float]:
    """(ms to `status started`, ms to the first model call's `todo`) from the trace on `reader`."""
    started = None
    while line := await reader.readline():
        if started is None and STARTED in line:
            started = (time.perf_counter() - began) * 1000
        if FIRST_CALL in line:
            return started or float("nan"), (time.perf_counter() - began) * 1000
    raise RuntimeError("the agent ended before its first model call")


async def cold(tmp: Path, scripts: Path, env: dict[str, str]) -> tuple[float, float]:
    argv = run_argv(tmp, scripts)
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *AGENT, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        cwd=str(tmp / "ws"), env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        return await marks(proc.stdout, began)
    finally:
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()


async def warm(template: WarmTemplate, tmp: Path, scripts: Path, env: dict[str, str]) -> tuple[float, float]:
    argv = run_argv(tmp, scripts)
    fifo = tmp / "agent.log"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # read-write: no EOF before the child opens its end
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        began = time.perf_counter()
        child = await template.spawn(argv, env, str(tmp / "ws"), str(fifo))
        try:
            return await marks(reader, began)
        finally:
            signal_group(child.pid, signal.SIGKILL)
            await child.wait()
    finally:
        transport.close()


async def through_runtime(tmp: Path, scripts: Path, warm_start: bool) -> tuple[float, float]:
    """(b): LocalRuntime.launch -> the marks in the agent's log file."""
    async def no_sink(event: dict) -> None:
        pass

    runtime = LocalRuntime(
        tmp / "data", None, (tmp / "store").as_uri(), no_sink, env=environment(), default_model="scripted:turns",
        scripts_dir=str(scripts), warm=warm_start, grace_seconds=0.2, snapshotter_grace_seconds=5,
    )  # fmt: skip
    try:
        if runtime.template is not None:
            assert await runtime.template.ready(), "the template did not start"
        log = runtime.folder("bench").log("agent")
        began = time.perf_counter()
        await runtime.launch(make_task("work", task_id="bench"))
        started = None
        while True:
            text = log.read_bytes() if log.exists() else b""
            if started is None and STARTED in text:
                started = (time.perf_counter() - began) * 1000
            if FIRST_CALL in text:
                return started or float("nan"), (time.perf_counter() - began) * 1000
            await asyncio.sleep(0.001)
    finally:
        await runtime.cancel("bench")
        await runtime.close()


def row(name: str, figures: list[tuple[float, float]]) -> tuple[float, float]:
    started = statistics.median(f[0] for f in figures)
    first = statistics.median(f[1] for f in figures)
    spread = f"{min(f[1] for f in figures):.0f}..{max(f[1] for f in figures):.0f}"
    print(f"  {name:<38} status started {started:7.1f} ms   first model call {first:7.1f} ms   (range {spread} ms)")
    return started, first


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runtime-rounds", type=int, default=5, help="rounds of (b); 0 skips it")
    args = parser.parse_args()
    env = environment()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        scripts = tmp / "scripts"
        scripts.mkdir()
        (scripts / "turns.yaml").write_text(yaml.safe_dump(TURNS))
        template = WarmTemplate(AGENT, env)
        began = time.perf_counter()
        assert await template.ready(), "the template did not start"
        print(f"template ready in {(time.perf_counter() - began) * 1000:.0f} ms (once per runtime)")
        cold_figures, warm_figures = [], []
        try:
            for n in range(args.rounds):
                cold_figures.append(await cold(tmp / f"cold-{n}", scripts, env))
                warm_figures.append(await warm(template, tmp / f"warm-{n}", scripts, env))
                print(f"round {n + 1}: first model call cold {cold_figures[-1][1]:7.1f} ms   warm {warm_figures[-1][1]:6.1f} ms")
        finally:
            await template.close()
        print("(a) the agent: launch -> first model call, median of", args.rounds)
        _, cold_ms = row("cold: exec python -m agent run", cold_figures)
        _, warm_ms = row("warm: forked from the template", warm_figures)
        ok = warm_ms <= TARGET_MS
        print(f"  ratio warm / cold {warm_ms / cold_ms:.3f} ({cold_ms / warm_ms:.1f}x faster)")
        print(f"  target: warm <= {TARGET_MS:.0f} ms   {'PASS' if ok else 'FAIL'}")

        if args.runtime_rounds:
            runtime_cold, runtime_warm = [], []
            for n in range(args.runtime_rounds):
                runtime_cold.append(await through_runtime(tmp / f"rt-cold-{n}", scripts, False))
                runtime_warm.append(await through_runtime(tmp / f"rt-warm-{n}", scripts, True))
            print("(b) the local runtime: LocalRuntime.launch -> first model call (restore, snapshotter, agent), median of", args.runtime_rounds)
            _, rc = row("cold: every child exec'd", runtime_cold)
            _, rw = row("warm: restore and agent forked", runtime_warm)
            print(f"  ratio warm / cold {rw / rc:.3f}   (no target of its own: printed only)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
