"""Finding 6 of issue 9, replayed end to end: nothing a client is served shows a secret.

Against a real nats-server and the stream app served over HTTP: glued keys and
the formats that used to pass (PGP private key blocks, AWS secret access keys in
context, Authorization: Basic, URL passwords with `/`) in live and replayed
traces; a known secret across the 2,000-character cut of a real agent's tool
result; known secrets in a task's prompt, summary and termination message in
`/api/tasks` and `/api/tasks/{id}` (the known values read from a Kubernetes
Secret volume, as knative/stream.yaml mounts them); the cockpit relay's answers;
and what `dockyard logs` and `dockyard tasks` print; and on `dockyard dev`, a value of
its agents' secrets directory in a prompt and a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from agent import contract
from agent.redact import REPLACEMENT
from functions.cli import redaction as cli_redaction
from functions.core.registry import new_record
from tests.conftest import eventually_async
from tests.functions.stream.support import AUTH, WRITE_TOKEN, AppServer, ev, finished, log_record, messages_of, publish, raw_body

pytestmark = pytest.mark.timeout(150)

KNOWN = "Kn0wn-model-key-25-chars!"  # 25 characters, as in the finding
assert len(KNOWN) == 25
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PGP_BODY = "lQOYBGVzZWNyZXRrZXltYXRlcmlhbA"
URL_PASSWORD = "s3cr/et:pa@ss"
# secret -> the text it is written in: finding 6's examples
FINDING_6 = {
    "sk-proj-" + "Ab3x" * 10: "token_sk-proj-" + "Ab3x" * 10,
    "sk-proj-" + "Zq9y" * 10: "https://cb.example/?next=%3Dsk-proj-" + "Zq9y" * 10,
    "AKIAIOSFODNN7EXAMPLE": "xAKIAIOSFODNN7EXAMPLEy",
    PGP_BODY: f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n{PGP_BODY}\n=Ab12\n-----END PGP PRIVATE KEY BLOCK-----",
    AWS_SECRET: f"aws_secret_access_key = {AWS_SECRET}",
    AWS_SECRET[::-1]: json.dumps({"SecretAccessKey": AWS_SECRET[::-1]}),
    "dXNlcjpodW50ZXIy": "Authorization: Basic dXNlcjpodW50ZXIy",
    URL_PASSWORD: f"git clone https://bob:{URL_PASSWORD}@git.example.com/r.git",
    KNOWN: f"the key is {KNOWN}",
}


def leaks(text: str, secrets=FINDING_6, window: int = 8) -> list[str]:
    """The secrets of which any `window` consecutive characters are in `text`."""
    return [s for s in secrets if any(s[i : i + window] in text for i in range(len(s) - window + 1))]


def secret_volume(root: Path, files: dict[str, str]) -> Path:
    """A directory laid out as the kubelet writes a projected Secret volume."""
    data = root / "..2026_12_01_00_00_00.1"
    data.mkdir(parents=True)
    for name, value in files.items():
        (data / name).write_text(value)
        (root / name).symlink_to(f"..data/{name}")
    (root / "..data").symlink_to(data.name)
    return root


@pytest.fixture
def known_dir(tmp_path) -> Path:
    return secret_volume(tmp_path / "known", {"model-api-key": KNOWN + "\n", "object-store-secret-access-key": AWS_SECRET})


async def test_glued_keys_and_the_formats_that_passed_reach_no_client(bus, serve, known_dir):
    server = await serve(known_secrets_file=str(known_dir))
    task = "t-sec-formats"
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=contract.iso_utc()))
    url = f"{server.url}/api/stream/{task}"
    live = asyncio.create_task(raw_body(url))
    await eventually_async(lambda: (f := server.feed(task)) is not None and f.waiting == 1, "the live client waits")
    text = "\n".join(FINDING_6.values())
    await publish(bus.js, task, ev(task, contract.EV_TOOL, name="execute", stage="end", result=text))
    await publish(bus.js, task, log_record(task, text))
    await publish(bus.js, task, {}, raw=f"plain text: {text}".encode())
    await publish(bus.js, task, finished(task))
    for body in (await asyncio.wait_for(live, 30), await raw_body(url)):  # live, then replayed from NATS
        assert leaks(body) == []
        assert "git clone https://bob:[REDACTED]@git.example.com/r.git" in body
        assert "Authorization: Basic [REDACTED]" in body
        assert messages_of(body)[-1].event == "end"


def agent_command(task_id: str, workspace: Path, script: Path, nats_url: str, nats_creds: str) -> list[str]:
    task_file = workspace.parent / "task.json"
    task_file.write_text(json.dumps({"prompt": "print", "limits": {"deadline_seconds": 120}}))
    return [
        sys.executable, "-m", "agent", "run", "--task-id", task_id, "--workspace", str(workspace),
        "--task-file", str(task_file), "--model", f"scripted:{script.stem}", "--scripts-dir", str(script.parent),
        "--home", str(workspace.parent / "home"),
        "--secrets-dir", str(workspace.parent / "secrets"), "--nats", nats_url, "--nats-creds", nats_creds,
    ]  # fmt: skip


async def test_a_known_secret_across_the_2000_character_cut_leaves_none_of_its_characters(
    bus, serve, tmp_path, agent_env, nats_server
):
    """The agent knows the secret; the stream does not: only redaction before the cut holds it."""
    server = await serve()  # no known-secrets file: the agent's own redaction is what is tested
    task = "t-sec-cut"
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=contract.iso_utc()))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    secret_volume(tmp_path / "secrets", {"api_key": KNOWN})
    # 1,960 characters, then the secret 8 times: whatever the tool puts before its output, one copy straddles 2,000.
    command = f"printf '%01960d' 0 | tr 0 a; for i in 1 2 3 4 5 6 7 8; do printf '%s ' '{KNOWN}'; done; printf '%0500d' 0"
    script = tmp_path / "turns.yaml"
    script.write_text(yaml.safe_dump([
        {"tool_calls": [{"name": "plan", "args": {"todos": ["print"], "objective": "print"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": command}}]},
        {"content": "printed"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "printed"}}]},
    ]))  # fmt: skip
    agent = await asyncio.create_subprocess_exec(
        *agent_command(task, workspace, script, nats_server.url, nats_server.launch_creds(task)), env=agent_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(agent.communicate(), 100)
    assert agent.returncode == 0, err.decode()[-2000:]
    body = await raw_body(f"{server.url}/api/stream/{task}")
    ends = [m.data for m in messages_of(body) if m.event == contract.EV_TOOL and m.data.get("stage") == "end"]
    assert ends and "more chars]" in ends[0]["result"], "the result was cut"
    assert ends[0]["result"].count(REPLACEMENT) >= 1
    assert leaks(body, [KNOWN]) == []


async def test_task_records_show_no_known_secret_in_prompt_summary_or_termination_message(bus, serve, known_dir):
    server = await serve(known_secrets_file=str(known_dir))
    task = "t-sec-records"
    record = new_record(task, task={"prompt": f"use {KNOWN} and {AWS_SECRET}", "model": "scripted:example"}, spec_hash="h", now=contract.iso_utc())
    record["summary"] = f"done with {KNOWN}; {FINDING_6['AKIAIOSFODNN7EXAMPLE']}"
    record["termination_message"] = f"failed: {FINDING_6[URL_PASSWORD]} token_sk-proj-{'Ab3x' * 10}"
    await bus.registry.create(task, record)
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=AUTH) as client:
        listed = await client.get("/api/tasks")
        one = await client.get(f"/api/tasks/{task}")
    assert listed.status_code == one.status_code == 200
    for body in (listed.text, one.text):
        assert leaks(body) == []
    got = one.json()
    assert got["task"]["prompt"] == f"use {REPLACEMENT} and {REPLACEMENT}"
    assert got["summary"].startswith(f"done with {REPLACEMENT}")
    assert got["termination_message"].startswith("failed: git clone https://bob:[REDACTED]@")


@pytest.fixture
async def broker():
    """A stand-in Broker whose refusals quote secrets."""
    answers: list = []

    async def ingress(request: Request):
        return answers.pop(0)

    server = await AppServer(Starlette(routes=[Route("/", ingress, methods=["POST"])])).start()
    yield server, answers
    await server.stop()


async def test_the_relay_passes_on_no_secret_from_the_broker(settings, serve, broker, known_dir):
    stand_in, answers = broker
    server = await serve(broker_url=f"{stand_in.url}/", known_secrets_file=str(known_dir))
    event = json.dumps({"specversion": "1.0", "type": contract.EVENT_TASK_SUBMITTED, "source": "tests/sec", "id": "e-1", "data": {"prompt": "hi"}})
    answers.append(JSONResponse({"error": f"model key {KNOWN} refused; {FINDING_6['AKIAIOSFODNN7EXAMPLE']}", "field": "model"}, 400))
    answers.append(PlainTextResponse(("x" * 290) + KNOWN, 404))  # the secret across the relay's 300-character cut
    answers.append(PlainTextResponse(f"upstream said {FINDING_6[PGP_BODY]}", 500))
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=AUTH) as client:
        replies = [await client.post("/api/events", content=event, headers={"Content-Type": "application/cloudevents+json"}) for _ in range(3)]
    assert [r.status_code for r in replies] == [400, 404, 503]
    for reply in replies:
        assert leaks(reply.text) == [], reply.text
    assert replies[0].json() == {"error": f"model key {REPLACEMENT} refused; x{REPLACEMENT}y", "field": "model"}


async def test_the_cli_prints_no_secret_even_from_a_server_that_does_not_know_it(bus, serve, known_dir, monkeypatch):
    from functions.cli import client as cli_client
    from functions.cli import main as cli_main

    server = await serve()  # this stream knows no values; the CLI's machine does
    monkeypatch.setenv("DOCKYARD_KNOWN_SECRETS_FILE", str(known_dir))
    cli_redaction._redaction.cache_clear()
    task = "t-sec-cli"
    record = new_record(task, task={"prompt": f"use {KNOWN}"}, spec_hash="h", now=contract.iso_utc())
    record["termination_message"] = f"failed: {KNOWN}"
    await bus.registry.create(task, record)
    await publish(bus.js, task, log_record(task, f"the key is {KNOWN} and {FINDING_6[AWS_SECRET]}"))
    await publish(bus.js, task, finished(task))
    try:
        out = io.StringIO()
        await cli_client.print_trace(server.url, task, after=None, follow=True, idle=0, out=out, token=WRITE_TOKEN)
        assert f"the key is {REPLACEMENT}" in out.getvalue() and leaks(out.getvalue()) == []
        raw = io.StringIO()
        await cli_client.print_trace(server.url, task, after=None, follow=True, idle=0, raw=True, out=raw, token=WRITE_TOKEN)
        assert leaks(raw.getvalue()) == []
        for as_json in (True, False):
            args = cli_main.build_parser().parse_args(["tasks", "--url", server.url, "--token", WRITE_TOKEN, *(["--json"] if as_json else [])])
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                await asyncio.to_thread(args.run, args)  # the CLI's blocking client, off this loop that serves
            assert task in printed.getvalue() and leaks(printed.getvalue()) == []
    finally:
        cli_redaction._redaction.cache_clear()


def test_dockyard_dev_hides_its_agents_secrets_in_task_records_and_traces(tmp_path):
    """The finding as it was seen: on `dockyard dev`, /api/tasks showed a value of the agents' secrets directory."""
    from functions.cli import client as cli_client
    from functions.cli.demo import EXAMPLE_MODEL, EXAMPLE_TASK
    from tests.conftest import eventually
    from tests.dev_process import DevServer

    data_dir = tmp_path / "data"
    (data_dir / "secrets" / "model").mkdir(parents=True)
    (data_dir / "secrets" / "model" / "api_key").write_text(KNOWN + "\n")
    dev = DevServer(data_dir).start()
    try:
        task = {**json.loads(EXAMPLE_TASK.read_text()), "model": EXAMPLE_MODEL, "task_id": "sec-dev"}
        task["prompt"] = f"{task['prompt']} (the key is {KNOWN})"
        task_id = cli_client.submit_task(dev.url, task, dev.token)
        record = eventually(
            lambda: (r := httpx.get(f"{dev.url}/api/tasks/{task_id}", headers=dev.headers, timeout=5).json()).get("finished_uids") and r,
            f"task {task_id} to finish",
        )
        listed = httpx.get(f"{dev.url}/api/tasks", headers=dev.headers, timeout=5).text
        trace = httpx.get(f"{dev.url}/api/stream/{task_id}", headers=dev.headers, timeout=30).text
    finally:
        dev.stop()
    assert record["task"]["prompt"].endswith(f"(the key is {REPLACEMENT})")
    for body in (json.dumps(record), listed, trace):
        assert leaks(body, [KNOWN]) == []
