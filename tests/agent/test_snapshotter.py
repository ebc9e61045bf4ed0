"""The snapshotter process against a real nats-server, with S3 over HTTP or a file store."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import nats
import pytest

from agent import changes, contract
from agent.snapshot import list_snapshots
from agent.storage import open_store
from tests.conftest import eventually, eventually_async

TASK = "t-sidecar"
CHANGE_KEYS = {"changes_key": changes.summary_key(TASK), "changes_patch_key": changes.patch_key(TASK)}
RUN_MAIN = "import sys; from agent.snapshotter import main; sys.exit(main(sys.argv[1:]))"


def make_db(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS writes (id INTEGER PRIMARY KEY, blob BLOB)")
    conn.executemany("INSERT INTO writes (blob) VALUES (?)", ((os.urandom(500),) for _ in range(rows)))
    conn.commit()
    conn.close()


class Sidecar:
    def __init__(self, env: dict, tmp_path: Path, *args: str):
        self.log = tmp_path / "snapshotter.log"
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_MAIN, *args], env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def stderr(self) -> str:
        return self.log.read_text()

    def running(self) -> bool:
        assert self.proc.poll() is None, f"the snapshotter exited with {self.proc.returncode}:\n{self.stderr()}"
        return True

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def sidecars():
    started: list[Sidecar] = []
    yield started
    for sidecar in started:
        sidecar.kill()


@pytest.fixture
def s3_env(agent_env, s3_endpoint, s3_store_url):
    env = dict(agent_env)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env[name] = os.environ[name]
    env["DOCKYARD_S3_ENDPOINT"] = s3_endpoint
    env["DOCKYARD_SECRETS_DIR"] = "/nonexistent"
    return env


async def request(nc, subject: str, body: dict, timeout: float = 5.0) -> dict:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    return json.loads(msg.data)


async def wait_for_reply(nc, subject: str, body: dict) -> dict:
    """Ask until the snapshotter has subscribed and answers."""

    async def reply() -> dict | None:
        try:
            return await request(nc, subject, body, timeout=0.5)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None

    return await eventually_async(reply, f"an answer on {subject}")


async def next_event(queue: asyncio.Queue, timeout: float = 10.0) -> dict:
    msg = await asyncio.wait_for(queue.get(), timeout)
    return json.loads(msg.data)


async def test_snapshot_on_request_events_and_final_upload_to_s3(tmp_path, nats_server, s3_env, s3_store_url, sidecars):
    workspace = tmp_path / "ws"
    make_db(workspace / contract.checkpoint_path(TASK), rows=200)
    store = open_store(s3_store_url)
    nc = await nats_server.connect()
    events: asyncio.Queue = asyncio.Queue()
    await nc.subscribe(contract.subject_events(TASK), cb=events.put)
    sidecar = Sidecar(
        s3_env,
        tmp_path,
        *("--task-id", TASK, "--workspace", str(workspace), "--store", s3_store_url, "--nats", nats_server.url),
        *("--nats-creds", nats_server.launch_creds(TASK, "snapshotter")),
    )
    sidecars.append(sidecar)
    try:
        # Once it listens, one request (re-asking after a short timeout under load would make the
        # answer the second snapshot's, unchanged).
        await eventually_async(
            lambda: sidecar.running() and f"listening on {contract.subject_cmd(TASK)}" in sidecar.stderr(),
            "the snapshotter to listen",
            detail=sidecar.stderr,
        )
        reply = await request(nc, contract.subject_cmd(TASK), {"op": "snapshot"}, timeout=30)
        assert reply["ok"] is True and reply["uploaded"] is True and reply["size"] > 0
        assert store.list(contract.checkpoints_prefix(TASK)) == [reply["key"]]

        event = await next_event(events)
        assert event["type"] == contract.EV_SNAPSHOT and event["task_id"] == TASK
        assert (event["key"], event["size"]) == (reply["key"], reply["size"])
        assert event["uploaded"] is True and event["final"] is False
        assert event["ts"].endswith("Z")

        # Other ops belong to the agent: the snapshotter does not answer them.
        with pytest.raises(nats.errors.TimeoutError):
            await request(nc, contract.subject_cmd(TASK), {"op": "status"}, timeout=1.0)

        # Unchanged: answered with the same key, nothing new in the store.
        again = await request(nc, contract.subject_cmd(TASK), {"op": "snapshot"})
        assert again == {"ok": True, "key": reply["key"], "size": reply["size"], "uploaded": False}
        assert (await next_event(events))["uploaded"] is False

        # The agent finishes: more rows, a result, a file; then the pod stops.
        make_db(workspace / contract.checkpoint_path(TASK), rows=10)
        (workspace / contract.RESULT_FILE).write_text(json.dumps({"task_id": TASK, "outcome": "done"}))
        (workspace / "answer.txt").write_text("42")
        assert sidecar.terminate() == 0

        final = await next_event(events)
        assert final["final"] is True and final["uploaded"] is True
        assert final["archive_key"] == contract.final_archive_key(TASK)
        assert final["result_key"] == contract.final_result_key(TASK)
        assert list_snapshots(store, TASK) == [reply["key"], final["key"]]
        result = json.loads(store.get_bytes(contract.final_result_key(TASK)))
        assert result == {"task_id": TASK, "outcome": "done", **CHANGE_KEYS}
        assert final["changes_key"] == CHANGE_KEYS["changes_key"]
        listing = json.loads(store.get_bytes(result["changes_key"]))
        assert [(f["path"], f["status"]) for f in listing["files"]] == [("answer.txt", "added")]
        assert b"+42" in store.get_bytes(result["changes_patch_key"])
        with tarfile.open(fileobj=io.BytesIO(store.get_bytes(contract.final_archive_key(TASK))), mode="r:gz") as tar:
            names = tar.getnames()
        assert "answer.txt" in names and not [n for n in names if n.startswith(("checkpoints", ".dockyard"))]

        log = sidecar.stderr()
        assert f"task={TASK}" in log and s3_store_url in log
        assert "testing" not in log  # the credentials are never printed
    finally:
        await nc.close()


async def test_no_checkpoint_yet_and_final_without_database(tmp_path, nats_server, agent_env, sidecars):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "draft.txt").write_text("draft")
    store_url = (tmp_path / "store").as_uri()
    nc = await nats_server.connect()
    events: asyncio.Queue = asyncio.Queue()
    await nc.subscribe(contract.subject_events(TASK), cb=events.put)
    env = dict(agent_env, DOCKYARD_TASK_ID=TASK, DOCKYARD_WORKSPACE=str(workspace), DOCKYARD_STORE=store_url)
    env["DOCKYARD_NATS_URL"] = nats_server.url  # settings from the environment this time
    env["DOCKYARD_NATS_CREDS"] = nats_server.launch_creds(TASK, "snapshotter")
    sidecar = Sidecar(env, tmp_path)
    sidecars.append(sidecar)
    try:
        reply = await wait_for_reply(nc, contract.subject_cmd(TASK), {"op": "snapshot"})
        assert reply == {"ok": False, "error": "no checkpoint yet"}
        assert sidecar.terminate() == 0
        final = await next_event(events)
        assert final["final"] is True and final["key"] is None
        store = open_store(store_url)
        assert list_snapshots(store, TASK) == []
        assert json.loads(store.get_bytes(contract.final_result_key(TASK))) == {"task_id": TASK, "outcome": "unknown", **CHANGE_KEYS}
        assert store.exists(contract.final_archive_key(TASK))
    finally:
        await nc.close()


async def test_works_without_nats_and_connects_when_it_appears(tmp_path, nats_server, agent_env, sidecars):
    nats_server.stop()
    workspace = tmp_path / "ws"
    make_db(workspace / contract.checkpoint_path(TASK), rows=50)
    store_url = (tmp_path / "store").as_uri()
    store = open_store(store_url)
    sidecar = Sidecar(
        agent_env,
        tmp_path,
        *("--task-id", TASK, "--workspace", str(workspace), "--store", store_url),
        *("--nats", nats_server.url, "--interval", "0.2"),
        *("--nats-creds", nats_server.launch_creds(TASK, "snapshotter", create_stream=False)),
    )
    sidecars.append(sidecar)

    # Timer snapshots run while NATS is down.
    [first] = eventually(lambda: list_snapshots(store, TASK), "a timer snapshot", detail=sidecar.stderr)

    nats_server.start()
    nc = await nats_server.connect()
    try:
        # Connected, it answers. The database is unchanged: neither this snapshot nor any timer
        # snapshot since the first uploaded it again.
        reply = await wait_for_reply(nc, contract.subject_cmd(TASK), {"op": "snapshot"})
        assert (reply["ok"], reply["key"], reply["uploaded"]) == (True, first, False)
        assert list_snapshots(store, TASK) == [first]

        make_db(workspace / contract.checkpoint_path(TASK), rows=1)
        reply = await wait_for_reply(nc, contract.subject_cmd(TASK), {"op": "snapshot"})
        assert reply["ok"] is True and store.exists(reply["key"])
    finally:
        await nc.close()
    assert sidecar.terminate() == 0
    assert store.exists(contract.final_result_key(TASK))


def test_bad_settings_exit_fatal(tmp_path, agent_env):
    proc = subprocess.run(
        [sys.executable, "-c", RUN_MAIN, "--task-id", TASK, "--store", "nowhere"],
        env=agent_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == contract.EXIT_FATAL
    assert "s3://bucket[/prefix] or file:///" in proc.stderr


def test_a_broken_database_still_gets_the_final_archive(tmp_path, agent_env, sidecars):
    workspace = tmp_path / "ws"
    db = workspace / contract.checkpoint_path(TASK)
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database at all" * 100)
    (workspace / "work.txt").write_text("keep me")
    store_url = (tmp_path / "store").as_uri()
    sidecar = Sidecar(agent_env, tmp_path, "--task-id", TASK, "--workspace", str(workspace), "--store", store_url)
    sidecars.append(sidecar)
    eventually(lambda: sidecar.running() and "starting:" in sidecar.stderr(), "the snapshotter to start", detail=sidecar.stderr)

    assert sidecar.terminate() == contract.EXIT_RETRY
    store = open_store(store_url)
    assert list_snapshots(store, TASK) == []
    assert store.exists(contract.final_archive_key(TASK))
    assert json.loads(store.get_bytes(contract.final_result_key(TASK)))["outcome"] == "unknown"
    assert "final snapshot failed" in sidecar.stderr()


LEAN_IMPORTS = """
import sys
from agent.snapshotter import import_nats_lean
heavy = ("aiohttp", "boto3", "sqlite3", "tarfile")
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
import_nats_lean(sys.argv[1])
import nats.aio.transport
print("aiohttp" in sys.modules, nats.aio.transport.aiohttp is not None)
import aiohttp  # still importable afterwards
"""


@pytest.mark.parametrize(
    ("url", "expected"),
    [("nats://127.0.0.1:4222", "False False"), ("tls://a:4222,nats://b:4222", "False False"), ("ws://a:8080", "True True")],
)
def test_the_snapshotter_imports_nats_without_aiohttp_unless_websocket(agent_env, url, expected):
    """Idle, the process holds neither boto3 (file store), sqlite3, tarfile, nor aiohttp (a TCP server)."""
    proc = subprocess.run([sys.executable, "-c", LEAN_IMPORTS, url], env=agent_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected.split()
