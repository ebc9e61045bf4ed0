"""Issue 10, part 1: the model key is never where the agent or its commands can read it.

Replayed as the finding was seen: under `dockyard dev`, `execute("cat <data-dir>/secrets/model/api_key")`
found the key because the agent was given that directory. Now the dev stack's model gateway holds the
key; the agent gets its task's own folder and a token that works for its own task only. The rendered
Job's half (no model Secret mounted in the agent container) is in
tests/functions/core/test_factory.py::test_the_agent_container_mounts_no_model_secret_only_the_gateway_does.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import pytest

from agent import contract
from tests.conftest import eventually
from tests.dev_process import DevServer
from tests.gateway.conftest import UPSTREAM_KEY, Served, Upstream, fake_upstream

pytestmark = pytest.mark.timeout(240)


def files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


@pytest.fixture
def upstream():
    state = Upstream(gate=threading.Event())
    served = Served(fake_upstream(state))
    state.url = served.url
    yield state
    state.gate.set()
    served.stop()


def test_dockyard_dev_keeps_the_key_from_the_agent_counts_usage_and_ends_at_the_token_budget(tmp_path, upstream):
    data_dir = tmp_path / "data"
    model_dir = data_dir / "secrets" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "api_key").write_text(UPSTREAM_KEY + "\n")
    (model_dir / "base_url").write_text(upstream.url + "/v1\n")
    dev = DevServer(data_dir, env={"DOCKYARD_MODEL_PRICES": "gpt-test=1000/2000/500"}).start()
    try:
        task = {"task_id": "key-test", "prompt": "look around", "model": "openai:gpt-test", "limits": {"max_tokens": 30}}
        response = httpx.post(dev.url, json=task, timeout=30, headers={
            **dev.headers, "ce-specversion": "1.0", "ce-type": contract.EVENT_TASK_SUBMITTED, "ce-source": "test", "ce-id": "k1"})
        assert response.status_code < 300, response.text
        # The agent is waiting on its second model call (the upstream holds it): look at it now.
        eventually(lambda: len(upstream.requests) == 2, "the agent's second model call")
        agent_pid = dev.supervisor_state("key-test")["pgids"]["agent"]
        key = UPSTREAM_KEY.encode()
        # Its environment and command line (forked from the warm template, /proc shows the template's;
        # the agent's own os.environ is the task's, checked through the files below and the token).
        assert key not in Path(f"/proc/{agent_pid}/environ").read_bytes()
        assert key not in Path(f"/proc/{agent_pid}/cmdline").read_bytes()
        gateway_url = re.search(r"models +(http://127\.0\.0\.1:\d+) \(the model gateway", dev.output()).group(1)
        task_folder = data_dir / "tasks" / "key-test"
        secrets_dir = task_folder / "secrets"  # the agent's --secrets-dir: its task's own folder
        assert (secrets_dir / contract.GATEWAY_TOKEN_FILE).is_file()
        assert not (secrets_dir / "model").exists()
        # Its workspace, home, task file, logs and secrets: nowhere the key.
        assert files_containing(task_folder, key) == []
        assert all(UPSTREAM_KEY not in r["body"].__repr__() for r in upstream.requests)
        assert {r["headers"]["authorization"] for r in upstream.requests} == {f"Bearer {UPSTREAM_KEY}"}  # added by the gateway
        token = (secrets_dir / contract.GATEWAY_TOKEN_FILE).read_text().strip()
        assert token.startswith("dyg.key-test.")
        upstream.gate.set()

        record = eventually(
            lambda: (r := httpx.get(f"{dev.url}/api/tasks/key-test", headers=dev.headers, timeout=5).json()).get("state") == "finished" and r,
            "the task to finish")
        assert record["outcome"] == contract.OUTCOME_BUDGET
        # 2 calls of 18 tokens reached the provider; the third was refused.
        usage = eventually(lambda: (r := httpx.get(f"{dev.url}/api/tasks", headers=dev.headers, timeout=5).json()[0]).get("usage", {}).get("refused") and r["usage"],
                           "the usage totals in /api/tasks")
        assert (usage["calls"], usage["tokens"], usage["refused"]) == (2, 36, 1)
        assert usage["cost_usd"] == pytest.approx(2 * 0.0235)
        assert len(upstream.requests) == 2
        result = json.loads((task_folder / "workspace" / contract.RESULT_FILE).read_text())
        assert result["outcome"] == "budget_exhausted" and "limits.max_tokens = 30" in result["summary"]
        trace = httpx.get(f"{dev.url}/api/stream/key-test", headers=dev.headers, timeout=30).text
        events = [json.loads(line[5:]) for line in trace.splitlines() if line.startswith("data:") and '"usage"' in line]
        usage_events = [e for e in events if e.get("type") == contract.EV_USAGE]
        assert [e["tokens"] for e in usage_events] == [18, 18, 0] and "limits.max_tokens" in usage_events[-1]["refused"]
        assert usage_events[1]["totals"]["tokens"] == 36 and usage_events[0]["model"] == "gpt-test"
        # The token is useless for another task, and the key is nowhere in what dev serves.
        other = httpx.post(f"{gateway_url}/openai/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                           headers={"authorization": f"Bearer {token.replace('key-test', 'other-task', 1)}"}, timeout=10)
        assert other.status_code == 401
        assert UPSTREAM_KEY not in trace
    finally:
        dev.stop()
