"""What a function process imports to answer its first event, and its garbage collector after it.

One real process loads `functions/main.py` as functions-framework does
(`create_asgi_app(target, source)`, the module named `main`) with the deployed
environment (an authenticated nats-server, the `functions` user), answers one
PingSource event through the ASGI app (the bus connects, the round is claimed,
the registry listed) and reports its modules and collector state. No timing is
asserted: bench/bench_coldstart.py measures the start.

- nats-py is imported without aiohttp (`functions.core.bus.import_nats`): it
  wants aiohttp only for websocket servers, and aiohttp's import was the
  largest part of a cold start (~100 ms with bytecode). With a ws:// URL the
  websocket transport keeps aiohttp.
- Start-up runs without collections (`functions.main`): the collector must be
  on again after the first event, with start-up's objects frozen.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent import contract
from tests.conftest import REPO_ROOT, UNREACHABLE_KUBECONFIG, NatsServer, agent_environment

FIRST_EVENT = """
import asyncio, gc, json, sys

from functions_framework.aio import create_asgi_app

app = create_asgi_app("snapshot_due", sys.argv[1])
after_start = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}


async def post():
    headers = [(b"content-type", b"application/json"), (b"ce-specversion", b"1.0"), (b"ce-id", b"imports-1"),
               (b"ce-type", sys.argv[2].encode()), (b"ce-source", b"tests/imports"), (b"content-length", b"2")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


status, body = asyncio.run(post())
import nats.aio.transport

print(json.dumps({"status": status, "body": body, "modules": sorted(sys.modules), "after_start": after_start,
                  "websocket_transport": nats.aio.transport.aiohttp is not None,
                  "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}}))
"""


@pytest.fixture(scope="module", params=["local", "kubernetes"])
def first_event(request, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("function-imports")
    server = NatsServer(tmp / "nats").start()
    kubeconfig = tmp / "kubeconfig"  # a cluster nobody answers at: an empty registry must not need it
    kubeconfig.write_text(UNREACHABLE_KUBECONFIG)
    try:
        env = agent_environment({"DOCKYARD_NATS_URL": server.url, "DOCKYARD_NATS_CREDS": server.creds("functions"),
                    "DOCKYARD_RUNTIME": request.param, "DOCKYARD_DATA_DIR": str(tmp / "data"),
                    "KUBECONFIG": str(kubeconfig)})  # fmt: skip
        command = [sys.executable, "-c", FIRST_EVENT, str(REPO_ROOT / "functions" / "main.py"), contract.EVENT_PING]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    return {**json.loads(done.stdout.splitlines()[-1]), "runtime": request.param}




def test_the_first_event_runs_a_round(first_event):
    assert first_event["status"] == 200, first_event["body"]
    assert first_event["body"]["asked"] == 0 and "skipped" not in json.dumps(first_event["body"])
    assert "nats" in first_event["modules"]  # the round went through the bus


def test_a_ping_that_finds_no_task_never_imports_the_kubernetes_client(first_event):
    """`functions.main.RuntimeOnFirstUse`: the Kubernetes runtime is made by the first handler that calls it."""
    kubernetes = [m for m in first_event["modules"] if m.split(".")[0] == "kubernetes"]
    assert not kubernetes, f"the {first_event['runtime']} runtime's first ping imported {kubernetes[:5]}"


def test_the_kubernetes_runtime_is_made_on_first_use_and_then_kept():
    from functions.main import RuntimeOnFirstUse

    made = []

    class Runtime:
        async def job_uid(self, task_id):
            return f"uid-{task_id}"

    def make():
        made.append(Runtime())
        return made[-1]

    lazy = RuntimeOnFirstUse(make)
    assert made == []
    assert lazy.job_uid.__self__ is made[0]
    assert lazy.job_uid.__self__ is made[0] and len(made) == 1


def test_a_function_imports_nats_without_aiohttp(first_event):
    aiohttp = [m for m in first_event["modules"] if m.split(".")[0] == "aiohttp"]
    assert not aiohttp, f"a function process over TCP imported aiohttp (nats-py's websocket extra): {aiohttp[:5]}"
    assert not first_event["websocket_transport"]


def test_garbage_collection_runs_again_after_start(first_event):
    """Off while `main` imports and while the first event connects; on again afterwards, start-up frozen."""
    assert first_event["after_start"]["enabled"] and first_event["after_start"]["frozen"] > 0
    assert first_event["gc"]["enabled"]
    assert first_event["gc"]["frozen"] > first_event["after_start"]["frozen"]


@pytest.mark.parametrize(("url", "aiohttp"), [("nats://127.0.0.1:4222", False), ("ws://127.0.0.1:8080", True),
                                              ("nats://a:4222, wss://b:443", True)])  # fmt: skip
def test_import_nats_keeps_aiohttp_for_websocket_servers(url, aiohttp):
    code = (f"import sys; from functions.core.bus import import_nats; import_nats({url!r}); import nats.aio.transport; "
            "print('aiohttp' in sys.modules, nats.aio.transport.aiohttp is not None); import aiohttp")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]  # aiohttp stays importable afterwards
    assert done.stdout.split() == [str(aiohttp), str(aiohttp)]
