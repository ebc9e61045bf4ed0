"""Serving the stream app: open streams end at a shutdown signal (also in a real process, across a restart),
the tracker waits for NATS with a backoff (checked with a fake sleep), and the GC is tuned once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import contract
from functions.cli.sse_client import SSEMessage
from functions.core.registry import new_record
from functions.errors import Unavailable
from functions.stream import serving
from tests.conftest import REPO_ROOT, eventually_async, free_port, wait_for_port
from tests.functions.stream.support import (
    write_tokens_file,
    collect_into,
    ev,
    finished,
    log_record,
    publish,
)

pytestmark = pytest.mark.timeout(120)


# --- the shutdown signal -------------------------------------------------------------


async def test_a_shutdown_signal_runs_the_callback_then_the_servers_own_handler():
    calls = []

    def server_handler(signum, frame):  # what uvicorn installs before the lifespan starts
        calls.append(("server", signum))

    original = signal.signal(signal.SIGTERM, server_handler)
    try:
        with serving.on_shutdown_signal(lambda: calls.append(("callback", None))):
            assert signal.getsignal(signal.SIGTERM) is not server_handler
            signal.raise_signal(signal.SIGTERM)
            await eventually_async(lambda: len(calls) == 2, "both handlers ran")
        assert calls == [("server", signal.SIGTERM), ("callback", None)]  # the callback runs on the loop, just after
        assert signal.getsignal(signal.SIGTERM) is server_handler  # put back when the lifespan ends
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_a_signal_nobody_handles_is_left_alone():
    original = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with serving.on_shutdown_signal(lambda: None):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # its default action ends the process anyway
    finally:
        signal.signal(signal.SIGTERM, original)


class AppProcess:
    """The stream app in a child process: as deployed (`python -m functions.stream`) or under uvicorn's CLI."""

    COMMANDS = {
        "python -m functions.stream": lambda port: [sys.executable, "-m", "functions.stream", "--host", "127.0.0.1",
                                                    "--port", str(port), "--no-tracker"],
        "uvicorn --factory": lambda port: [sys.executable, "-m", "uvicorn", "--factory", "functions.stream.app:create_app",
                                           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
    }  # fmt: skip

    def __init__(self, how: str, nats_url: str, data_dir: Path, log_file: Path, **env):
        self.command = self.COMMANDS[how](free_port())
        self.port = int(self.command[self.command.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DOCKYARD_NATS_URL": nats_url, "DOCKYARD_DATA_DIR": str(data_dir),
                    "DOCKYARD_API_TOKENS_FILE": write_tokens_file(log_file.parent / "api-tokens"), **env}
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    def start(self) -> AppProcess:
        with open(self.log_file, "ab") as log_file:
            self.proc = subprocess.Popen(self.command, env=self.env, cwd=REPO_ROOT, stdout=log_file, stderr=log_file)
        wait_for_port(self.port, timeout=30)
        return self

    def terminate(self, timeout: float = 30) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("how", list(AppProcess.COMMANDS))
async def test_followers_get_everything_once_across_a_server_shutdown_and_restart(bus, settings, tmp_path, how, nats_server):
    log_file = tmp_path / "app.log"
    app = AppProcess(how, settings.nats_url, tmp_path / "data", log_file, DOCKYARD_STREAM_MAX_PER_IP="0",
                     DOCKYARD_NATS_CREDS=nats_server.creds("stream"), DOCKYARD_TRACKER_NATS_CREDS=nats_server.creds("tracker")).start()
    task = "t-shutdown"
    url = f"{app.url}/api/stream/{task}"
    try:
        seqs = [await publish(bus.js, task, log_record(task, "first"))]
        lists: list[list[SSEMessage]] = [[] for _ in range(3)]
        # Clients that would wait 60 s for a byte: only the server can end their responses within the stop below.
        followers = [asyncio.create_task(collect_into(url, into, read_timeout=60, max_retries=None)) for into in lists]
        await eventually_async(lambda: all(len(into) == 1 for into in lists), "every follower has the first message")
        for _ in range(20):
            seqs.append(await publish(bus.js, task, log_record(task, f"record {len(seqs)}")))

        stop = asyncio.Event()

        async def publish_until_stopped() -> None:
            while not stop.is_set():
                seqs.append(await publish(bus.js, task, log_record(task, f"record {len(seqs)}")))
                await asyncio.sleep(0.01)

        publishing = asyncio.create_task(publish_until_stopped())  # messages go on during the shutdown
        # uvicorn waits for open responses without limit: it exits within 30 s only if the streams ended at once.
        await asyncio.to_thread(app.terminate)
        stop.set()
        await publishing
        for _ in range(5):  # ... and while the app is down
            seqs.append(await publish(bus.js, task, log_record(task, f"record {len(seqs)}")))
        app.start()  # the same port
        for _ in range(5):
            seqs.append(await publish(bus.js, task, log_record(task, f"record {len(seqs)}")))
        seqs.append(await publish(bus.js, task, finished(task)))
        await asyncio.wait_for(asyncio.gather(*followers), 60)
    finally:
        app.kill()
    for into in lists:
        assert [m.id for m in into] == seqs + [None]
    output = log_file.read_text()
    assert "without completing response" not in output and "Exception in ASGI" not in output, output


# --- the tracker -------------------------------------------------------------------------


async def test_the_tracker_waits_for_nats_with_a_capped_backoff_then_tracks(bus, settings):
    delays: list[float] = []
    attempts = 0

    async def connect(s):
        nonlocal attempts
        attempts += 1
        if attempts <= 7:
            raise Unavailable("NATS at nats://nowhere is not reachable")
        return bus

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    task = "t-tracked"
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=contract.iso_utc()))
    tracker = asyncio.create_task(serving.run_tracker(settings, connect=connect, sleep=sleep))
    try:
        await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))

        async def started() -> bool:
            return (await bus.registry.get(task))["state"] == contract.STATE_STARTED

        await eventually_async(started, "the tracker recorded the started event")
    finally:
        tracker.cancel()
        await asyncio.gather(tracker, return_exceptions=True)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_quiet_gc_freezes_what_start_up_made_and_makes_young_collections_rare():
    code = (
        "import gc; from functions.stream.serving import quiet_gc, GC_THRESHOLDS; quiet_gc(); "
        "print(gc.get_threshold() == GC_THRESHOLDS, gc.get_freeze_count() > 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.split() == ["True", "True"]
