"""No secret reaches a client of the stream: secret formats and known values, live, replayed, in task records,
and through a real agent run; the known-secrets file is read again when it changes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from agent import contract
from agent.redact import REPLACEMENT
from functions.cli.sse_client import SSEMessage
from functions.core.registry import new_record
from functions.stream import redaction
from tests.conftest import eventually_async
from tests.functions.stream.support import (
    AUTH,
    collect,
    collect_into,
    ev,
    finished,
    log_record,
    messages_of,
    publish,
    raw_body,
)

pytestmark = pytest.mark.timeout(120)

KNOWN = "stream-only-known-value-4711"  # in the stream's known-secrets file only: the agent does not know it
QUOTED_KNOWN = 'quo"ted\\known-value'  # JSON writes it with escapes: raw-text matching would miss it
UNICODE_KNOWN = "pässwörd-known-value"  # and this one as \\u escapes
PEM_BODY = "MIIEowIBAAKCAQEA7secretKeyMaterial"
LEAKS = {  # what must never reach a client -> the text it is written in
    "sk-proj-" + "Ab3x" * 10: "OPENAI_API_KEY=sk-proj-" + "Ab3x" * 10,
    "sk-ant-api03-" + "Zz9q" * 12: "x-api-key: sk-ant-api03-" + "Zz9q" * 12,
    "ghp_" + "a1B2" * 9: "token ghp_" + "a1B2" * 9,
    "github_pat_11ABCDEFG0" + "x" * 60: "GH_TOKEN=github_pat_11ABCDEFG0" + "x" * 60,
    "AKIAIOSFODNN7EXAMPLE": "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    PEM_BODY: f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----",
    "hunter2-url-password": "git clone https://bob:hunter2-url-password@git.example.com/r.git",
    KNOWN: f"the value is {KNOWN} ok",
}
CUT_PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0cutOff"  # no END line: cut off mid-block


def assert_clean(text: str) -> None:
    for secret in [*LEAKS, QUOTED_KNOWN, json.dumps(QUOTED_KNOWN)[1:-1], UNICODE_KNOWN, "p\\u00e4ssw", "cutOff"]:
        assert secret not in text, f"{secret!r} leaked"
    assert REPLACEMENT in text


@pytest.fixture
def secrets_file(tmp_path) -> Path:
    path = tmp_path / "known-secrets"
    path.write_text(f"{KNOWN}\n{QUOTED_KNOWN}\n{UNICODE_KNOWN}\nab\n")
    return path


def waits_on_the_feed(server, task_id: str, clients: int = 1):
    """A predicate: `clients` clients of the task had everything and wait on its shared feed."""
    return lambda: (feed := server.feed(task_id)) is not None and feed.waiting == clients


async def test_secrets_never_reach_a_client_live_replayed_or_in_task_records(bus, serve, secrets_file):
    server = await serve(known_secrets_file=str(secrets_file))
    task = "t-redact"
    text = "\n".join(LEAKS.values())
    record = new_record(task, task={"prompt": f"use {KNOWN}"}, spec_hash="h", now=contract.iso_utc())
    record["termination_message"] = f"failed: {LEAKS['ghp_' + 'a1B2' * 9]} {UNICODE_KNOWN}"
    await bus.registry.create(task, record)
    url = f"{server.url}/api/stream/{task}"

    live = asyncio.create_task(raw_body(url))
    await eventually_async(waits_on_the_feed(server, task), "the live client reads through the shared feed")
    seqs = [
        await publish(bus.js, task, ev(task, contract.EV_TOOL, name="execute", stage="end", result=text)),
        await publish(bus.js, task, log_record(task, text)),
        await publish(bus.js, task, log_record(task, f"{QUOTED_KNOWN} and {UNICODE_KNOWN}")),
        await publish(bus.js, task, log_record(task, f"key: {CUT_PEM}")),
        await publish(bus.js, task, {}, raw=f"not JSON: {text}".encode()),  # a producer writing plain text
        await publish(bus.js, task, ev(task, contract.EV_RESULT, summary=f"done with {KNOWN}")),
        await publish(bus.js, task, finished(task)),
    ]
    for body in (await asyncio.wait_for(live, 30), await raw_body(url)):  # the second one replays from NATS
        assert_clean(body)
        messages = messages_of(body)
        assert [m.id for m in messages] == seqs + [None]
        assert messages[0].data["result"].startswith(f"OPENAI_API_KEY={REPLACEMENT}")  # JSON stays JSON
        assert messages[2].data["msg"] == f"{REPLACEMENT} and {REPLACEMENT}"
        assert messages[3].data["msg"] == f"key: {REPLACEMENT}"  # the cut block went, the closing quote stayed
        assert "git clone https://bob:[REDACTED]@git.example.com" in messages[4].data["text"]
    async with httpx.AsyncClient(headers=AUTH, base_url=server.url, timeout=5) as client:
        listed = (await client.get("/api/tasks")).text
        one = (await client.get(f"/api/tasks/{task}")).text
    for body in (listed, one):
        assert KNOWN not in body and UNICODE_KNOWN not in body and "ghp_" not in body and REPLACEMENT in body


async def test_the_known_secrets_file_is_read_again_when_it_changes(bus, serve, tmp_path, monkeypatch):
    monkeypatch.setattr(redaction, "SECRETS_CHECK_SECONDS", 0.0)
    path = tmp_path / "known"
    path.write_text("first-known-secret\n")
    server = await serve(known_secrets_file=str(path))
    task = "t-reload"
    url = f"{server.url}/api/stream/{task}"
    await publish(bus.js, task, log_record(task, "start"))
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(url, received))
    await eventually_async(lambda: len(received) == 1, "the follower has the first message")

    await publish(bus.js, task, log_record(task, "first-known-secret second-known-secret"))
    await eventually_async(lambda: len(received) == 2, "the follower has the second message")
    assert received[1].data["msg"] == f"{REPLACEMENT} second-known-secret"

    path.write_text("first-known-secret\nsecond-known-secret\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    await publish(bus.js, task, log_record(task, "again second-known-secret"))
    await publish(bus.js, task, finished(task))
    await asyncio.wait_for(follower, 30)
    assert received[2].data["msg"] == f"again {REPLACEMENT}"
    # A client reading the task again gets the older message redacted with the new values too.
    again = await collect(url)
    assert again[1].data["msg"] == f"{REPLACEMENT} {REPLACEMENT}"


def agent_command(task_id: str, workspace: Path, script: Path, nats_url: str, nats_creds: str) -> list[str]:
    task_file = workspace.parent / "task.json"
    task_file.write_text(json.dumps({"prompt": "show the notes", "limits": {"deadline_seconds": 120}}))
    return [
        sys.executable, "-m", "agent", "run", "--task-id", task_id, "--workspace", str(workspace),
        "--task-file", str(task_file), "--model", f"scripted:{script.name}", "--scripts-dir", str(script.parent), "--home", str(workspace.parent / "home"),
        "--secrets-dir", str(workspace.parent / "secrets"), "--nats", nats_url, "--nats-creds", nats_creds,
    ]  # fmt: skip


async def test_a_real_agent_run_leaks_no_secret_to_the_stream(bus, serve, secrets_file, tmp_path, agent_env, nats_server):
    """Secrets echoed by a tool go agent -> NATS -> stream -> client; the client never sees one.

    The agent redacts secret formats itself; the value known only to the stream
    reaches NATS in clear and is stopped by the stream.
    """
    server = await serve(known_secrets_file=str(secrets_file))
    task = "t-agent-leak"
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=contract.iso_utc()))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (tmp_path / "secrets").mkdir()
    notes = "\n".join([*LEAKS.values(), CUT_PEM])
    (workspace / "notes.txt").write_text(notes + "\n")
    script = tmp_path / "turns.yaml"
    script.write_text(yaml.safe_dump([
        {"tool_calls": [{"name": "plan", "args": {"todos": ["show"], "objective": "show the notes"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": f"cat notes.txt; echo {KNOWN}; echo 'Bearer {'x1Y2' * 6}'"}}]},
        {"content": f"the notes mention {KNOWN}"},
        {"tool_calls": [{"name": "finish", "args": {"summary": f"shown, incl. {KNOWN}"}}]},
    ]))  # fmt: skip
    url = f"{server.url}/api/stream/{task}"
    live = asyncio.create_task(raw_body(url))
    await eventually_async(waits_on_the_feed(server, task), "the live client reads through the shared feed")
    agent = await asyncio.create_subprocess_exec(
        *agent_command(task, workspace, script, nats_server.url, nats_server.launch_creds(task)), env=agent_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(agent.communicate(), 100)
    assert agent.returncode == 0, err.decode()[-2000:]

    for body in (await asyncio.wait_for(live, 30), await raw_body(url)):
        assert_clean(body)
        assert "x1Y2" * 6 not in body
        messages = messages_of(body)
        tool_ends = [m for m in messages if m.event == "tool" and m.data.get("stage") == "end"]
        assert tool_ends and REPLACEMENT in json.dumps(tool_ends[0].data)
        assert messages[-1].event == "end"
    # The stream, not the agent, stopped the known value: it is in clear on the bus.
    sub = await bus.js.subscribe(contract.subject_events(task), ordered_consumer=True)
    on_the_bus = []
    while True:  # the task is over: read its events up to the last one
        msg = await sub.next_msg(timeout=10)
        on_the_bus.append(msg.data.decode())
        if msg.metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    assert any(KNOWN in data for data in on_the_bus)
