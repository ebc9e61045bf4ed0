"""`dockyard dev`: the whole stack in one process on one port, and `dockyard demo` on top of it.

    POST /                      broker ingress (routes from the Trigger manifests in eventing/)
    GET  /api/stream/{id}       the live trace (SSE), /api/tasks, /healthz: the stream app
    functions                   task_submitted, job_finished, snapshot_due, task_command, in-process
    PingSource                  a timer posting the ping event to the broker on the manifest's schedule
    runtime                     LocalRuntime: restore, snapshotter and agent as child processes
    NATS                        an embedded nats-server (unless --nats), store under the data dir

The runtime reports a finished task the way ApiServerSource does in the
cluster: a Job object in a CloudEvent delivered through the broker, so
`job_finished` runs the same code in both places.

Invariant: on a clean stop (Ctrl-C) agents get SIGTERM, stop after their current
step and stay unfinished; the next start over the same data dir resumes them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Sequence

from agent import contract

HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


def dev_settings(data_dir: Path, nats_url: str, store: str | None = None, base_env: dict | None = None):
    """Settings as `Settings.from_env` reads them, with the command line's choices on top."""
    from functions.settings import Settings

    env = dict(os.environ if base_env is None else base_env)
    env[f"{contract.ENV_PREFIX}DATA_DIR"] = str(Path(data_dir).resolve())
    env[f"{contract.ENV_PREFIX}NATS_URL"] = nats_url
    env[f"{contract.ENV_PREFIX}RUNTIME"] = "local"
    if store:
        env[f"{contract.ENV_PREFIX}STORE"] = store
    return Settings.from_env(env)


def create_dev_app(
    settings,
    *,
    agent_cmd: Sequence[str] | None = None,
    default_model: str | None = None,
    runtime_options: dict[str, Any] | None = None,
):
    """One Starlette app: broker ingress at POST /, the stream app for everything else.

    Its lifespan connects NATS, starts the runtime (resuming unfinished tasks), the
    tracker and the ping timer, and stops them in reverse order."""
    from cloudevents.http import from_dict
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    from functions import bus, stream
    from functions.broker import Broker, PingTimer, local_targets, ping_from_manifests
    from functions.main import HANDLERS, Context
    from functions.runtime import make_runtime

    holder: dict[str, Context] = {}

    async def get_context() -> Context:
        return holder["ctx"]

    broker = Broker.from_manifests(local_targets(HANDLERS, get_context), settings.data_dir)
    ping = PingTimer(broker, ping_from_manifests())

    async def emit_job_event(event: dict) -> None:
        """The local ApiServerSource: a finished Job goes through the broker to job_finished."""
        results = await broker.deliver(from_dict(event))
        failed = [r for r in results if r.status >= 500]
        if failed:  # the runtime tries again later; 4xx answers are dead-lettered by the broker
            raise ConnectionError(f"{failed[0].route.service} answered {failed[0].status}: {failed[0].body.get('error')}")

    secrets_dir = Path(settings.data_dir) / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    runtime = make_runtime(
        settings,
        emit_job_event=emit_job_event,
        agent_cmd=agent_cmd,
        default_model=default_model,
        secrets_dir=str(secrets_dir),
        **(runtime_options or {}),
    )
    stream_app = stream.create_app(settings, run_tracker=True)

    @asynccontextmanager
    async def lifespan(app):
        async with stream_app.router.lifespan_context(stream_app):  # the tracker; closes NATS last
            connection = await bus.connect(settings)
            holder["ctx"] = Context(settings, connection, runtime)
            unfinished = [r for r in await connection.registry.list() if r.get("state") not in contract.TERMINAL_STATES]
            await runtime.resume_running(unfinished)
            ping.start()
            try:
                yield
            finally:
                await ping.stop()
                await runtime.close()

    app = Starlette(
        routes=[
            Route("/", broker.ingress, methods=["POST"]),
            Mount("", app=stream_app),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.broker = broker
    return app


def banner(url: str, settings, nats_url: str, embedded: bool) -> str:
    from functions.settings import mask_url

    return "\n".join(
        [
            f"dockyard dev on {url}",
            f"  data dir  {settings.data_dir}",
            f"  store     {mask_url(settings.store)}",
            f"  NATS      {mask_url(nats_url)}{' (embedded)' if embedded else ''}",
            f"  submit    dockyard submit 'your task' --url {url} --follow",
        ]
    )


def main(args) -> int:
    """`dockyard dev`: serve until Ctrl-C (or SIGTERM)."""
    import logging

    import uvicorn

    from functions.nats_embedded import EmbeddedNats
    from functions.stream import quiet_gc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    nats = None if args.nats else EmbeddedNats(data_dir).start()
    try:
        nats_url = args.nats or nats.url
        settings = dev_settings(data_dir, nats_url, args.store)
        app = create_dev_app(settings, default_model=args.model)
        url = f"http://{args.host}:{args.port}"
        print(banner(url, settings, nats_url, embedded=nats is not None), flush=True)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,  # open SSE streams must not hold the stop up
        )
        server = uvicorn.Server(config)
        quiet_gc()  # many open streams: see functions.stream.quiet_gc
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the stop was clean
            pass
        return 0 if server.started else 1
    finally:
        if nats is not None:
            nats.stop()


# --- dockyard demo ------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _wait_recorded(url: str, task_id: str, timeout: float = 30.0) -> dict:
    """The task's record once job_finished has handled the Job (it publishes after the agent's own end)."""
    from functions.cli import get_json

    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        record = get_json(url, f"/api/tasks/{task_id}")
        if record.get("finished_uids"):
            return record
        time.sleep(0.2)
    return record


def demo(args) -> int:
    """`dockyard demo`: the stack in a child process, the example task through it, then stop."""
    import json

    from functions import cli, render
    from functions.nats_embedded import die_with_parent

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="dockyard-demo-")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = args.port or _free_port()
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
            cwd=str(Path(__file__).resolve().parent.parent),
            preexec_fn=die_with_parent,
        )
    try:
        _wait_healthy(url, proc, log_file)
        task = json.loads(cli.EXAMPLE_TASK.read_text())
        task["model"] = cli.EXAMPLE_MODEL
        task_id = cli.submit_task(url, task)
        print(f"submitted the example task as {task_id} (model {cli.EXAMPLE_MODEL})", flush=True)
        asyncio.run(cli.print_trace(url, task_id, after=None, follow=True, idle=0))
        record = _wait_recorded(url, task_id)
        outcome = record.get("outcome") or "unknown"
        print(f"outcome: {outcome}", flush=True)
        if record.get("final_snapshot_missing") or not record.get("finished_uids"):
            print("final snapshot: not stored (see the log)", flush=True)
        else:
            print(f"final snapshot: {render.final_snapshot_location(store, task_id)}", flush=True)
        return 0 if outcome == contract.OUTCOME_DONE else 1
    except (cli.CommandError, RuntimeError) as exc:  # RuntimeError: the stack did not come up
        print(f"dockyard demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(proc)
        print(f"stopped the dev stack (data dir {data_dir})", flush=True)
