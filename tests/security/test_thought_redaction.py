"""The model's words are untrusted text: a model that echoes a secret leaves none of it in the trace.

A real agent process (scripted model) publishes to a real nats-server; the
stream app, served over HTTP, knows no secret: only the agent's redaction of
its thought events is what is tested, before the 8 KB cut, in the live and the
replayed trace.
"""

from __future__ import annotations

import asyncio

import pytest
import yaml

from agent import contract
from agent.redact import REPLACEMENT
from agent.thought import TEXT_LIMIT
from functions.core.registry import new_record
from tests.functions.stream.support import messages_of, raw_body
from tests.security.test_redaction import KNOWN, agent_command, leaks, secret_volume

pytestmark = pytest.mark.timeout(150)

GITHUB_TOKEN = "ghp_" + "Zq8rT2mW5xK9" * 3  # a known format, built so no token sits in the source


async def test_a_model_that_echoes_a_known_secret_is_redacted_in_its_thought_events(bus, serve, tmp_path, agent_env, nats_server):
    server = await serve()  # no known-secrets file: the stream cannot redact KNOWN, the agent must
    task = "t-sec-thought"
    await bus.registry.create(task, new_record(task, task=None, spec_hash=None, now=contract.iso_utc()))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    secret_volume(tmp_path / "secrets", {"api_key": KNOWN})
    straddling = "z" * (TEXT_LIMIT - 10) + KNOWN + "w" * 50  # the secret across the cut: redacted first, or its head would pass
    script = tmp_path / "turns.yaml"
    script.write_text(yaml.safe_dump([
        {"content": f"The key is {KNOWN}; the token is {GITHUB_TOKEN}.",
         "tool_calls": [{"name": "plan", "args": {"todos": ["say"], "objective": "say"}}]},
        {"content": straddling},
        {"tool_calls": [{"name": "finish", "args": {"summary": "said"}}]},
    ]))  # fmt: skip
    agent = await asyncio.create_subprocess_exec(
        *agent_command(task, workspace, script, nats_server.url, nats_server.launch_creds(task)), env=agent_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(agent.communicate(), 100)
    assert agent.returncode == 0, err.decode()[-2000:]

    body = await raw_body(f"{server.url}/api/stream/{task}")
    said = [m.data["text"] for m in messages_of(body) if m.event == contract.EV_THOUGHT and not m.data.get("open")]
    assert said[0] == f"The key is {REPLACEMENT}; the token is {REPLACEMENT}."
    assert said[1] == "z" * (TEXT_LIMIT - 10) + REPLACEMENT + "... [50 more chars]"
    assert leaks(body, [KNOWN, GITHUB_TOKEN]) == []
