"""`dockyard demo`: the dev stack in a child process, the bundled example task through it, then stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent import contract
from functions.cli import client

EXAMPLE_TASK = Path(__file__).resolve().parents[2] / "agent" / "examples" / "example_task.json"
EXAMPLE_MODEL = "scripted:example"
HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


def _wait_healthy(url: str, proc: subprocess.Popen, log_file: Path) -> None:
    import httpx

    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dev stack exited with code {proc.returncode}; see {log_file}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the dev stack did not answer on {url} within {HEALTH_TIMEOUT_SECONDS:.0f}s; see {log_file}")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C for the stack; it stops its agents and NATS on the way out."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_recorded(url: str, task_id: str, token: str | None, timeout: float = 30.0) -> dict:
    """The task's record once job_finished has handled the Job (it publishes after the agent's own end)."""
    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        record = client.get_json(url, f"/api/tasks/{task_id}", token)
        if record.get("finished_uids"):
            return record
        time.sleep(0.2)
    return record


def run(args) -> int:
    """`dockyard demo`: the stack in a child process, the example task through it, then stop."""
    import json

    from functions.cli import render
    from agent.procs import die_with_parent

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="dockyard-demo-")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    from functions.devstack.ports import free_port

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = data_dir / "dev.log"
    store = (data_dir / "store").as_uri()
    print(f"starting the dev stack on {url} (data dir {data_dir}, log {log_file})", flush=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "functions.cli", "dev", "--port", str(port), "--data-dir", str(data_dir), "--store", store],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=str(Path(__file__).resolve().parents[2]),
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
    try:
        _wait_healthy(url, proc, log_file)
        token = (data_dir / "api-token").read_text().strip()  # the dev token, written before the server answers
        task = json.loads(EXAMPLE_TASK.read_text())
        task["model"] = EXAMPLE_MODEL
        task_id = client.submit_task(url, task, token)
        print(f"submitted the example task as {task_id} (model {EXAMPLE_MODEL})", flush=True)
        asyncio.run(client.print_trace(url, task_id, after=None, follow=True, idle=0, token=token))
        record = _wait_recorded(url, task_id, token)
        outcome = record.get("outcome") or "unknown"
        print(f"outcome: {outcome}", flush=True)
        if record.get("final_snapshot_missing") or not record.get("finished_uids"):
            print("final snapshot: not stored (see the log)", flush=True)
        else:
            print(f"final snapshot: {render.final_snapshot_location(store, task_id)}", flush=True)
        return 0 if outcome == contract.OUTCOME_DONE else 1
    except (client.CommandError, RuntimeError) as exc:  # RuntimeError: the stack did not come up
        print(f"dockyard demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(proc)
        print(f"stopped the dev stack (data dir {data_dir})", flush=True)
