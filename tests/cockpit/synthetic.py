"""Trace events shaped exactly like the agent's (issue 12's contracts A and C), published to a real NATS.

The cockpit tests and `bench/bench_cockpit.py` use these where a scripted model cannot easily
reach a state (a 2,000-call trace, a failed clone's outcome, a task stopped and resumed). The
stream app serves whatever was published on `events.agent.<id>`, exactly as it serves an agent's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from agent import contract


def ts(offset: float = 0.0) -> str:
    return contract.iso_utc(time.time() + offset)


def tool_call(task_id: str, n: int, *, ok: bool = True, name: str = "execute", output: str | None = None) -> list[dict]:
    """The start and end events of one tool call, the end with head, tail and the true size (contract A)."""
    call_id = f"call_{n:05d}"
    command = f"make step-{n}"
    whole = output if output is not None else f"step {n} output line\n" * 3
    end = {
        "type": contract.EV_TOOL, "task_id": task_id, "ts": ts(), "stage": "end", "name": name, "call_id": call_id,
        "ok": ok, "seconds": 0.2, "result": whole[:2000], "output_bytes": len(whole.encode()),
        "output_head": whole, "output_tail": "", "output_file": f".dockyard/outputs/{call_id}.log",
    }  # fmt: skip
    if not ok:
        end["error"] = f"exit code 2\nstep {n} failed"
    start = {"type": contract.EV_TOOL, "task_id": task_id, "ts": ts(), "stage": "start", "name": name, "call_id": call_id, "args": {"command": command}}
    return [start, end]


def phase(task_id: str, name: str, objective: str = "work") -> dict:
    return {"type": contract.EV_PHASE, "task_id": task_id, "ts": ts(), "phase": name, "objective": objective}


def status(task_id: str, state: str, **extra) -> dict:
    return {"type": contract.EV_STATUS, "task_id": task_id, "ts": ts(), "state": state, **extra}


def long_trace(task_id: str, calls: int, *, errors_every: int = 0, phases: int = 4) -> list[dict]:
    """A running task's trace: started, then `phases` phases sharing `calls` tool calls (no terminal status)."""
    events = [status(task_id, contract.STATE_STARTED, model="scripted:synthetic")]
    per_phase = max(1, calls // phases)
    for n in range(calls):
        if n % per_phase == 0:
            events.append(phase(task_id, contract.PHASE_STRATEGIC if n == 0 else contract.PHASE_TACTICAL, f"part {n // per_phase + 1}"))
        ok = not (errors_every and n % errors_every == errors_every - 1)
        events.extend(tool_call(task_id, n, ok=ok))
    return events


async def _publish(nats_url: str, options: dict, task_id: str, events: list[dict]) -> None:
    import nats

    nc = await nats.connect(nats_url, **options)
    try:
        js = nc.jetstream()
        for event in events:
            await js.publish(contract.subject_events(task_id), json.dumps(event).encode())
    finally:
        await nc.close()


def publish(dev, task_id: str, events: list[dict]) -> None:
    """Publish on the task's events subject of `dev`'s NATS, acked one by one, in order."""
    # nats-py needs an event loop of its own: Playwright's sync API holds this thread's.
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_publish(dev.nats_url, dev.nats_connect_options, task_id, events))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(120)
    if worker.is_alive():
        raise TimeoutError(f"publishing {len(events)} events for {task_id} took over 120 s")
    if failure:
        raise failure[0]
