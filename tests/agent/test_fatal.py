"""What retrying cannot fix ends at once, fatal, in words (issue 12, item 4): a bad model name, a provider
that refuses the key, an unknown provider, a spent budget. The real agent process against a local
OpenAI-compatible server standing in for the model gateway."""

from __future__ import annotations

import json
import subprocess

import pytest

from agent import contract
from tests.agent.test_models import FakeOpenAI, gateway_of, openai_server, secrets  # noqa: F401 - a fixture
from tests.agent.test_run import EXAMPLE_TASK, agent_cmd, trace_events


def finished(stdout: str) -> dict:
    (end,) = [e for e in trace_events(stdout) if e["type"] == contract.EV_STATUS and e.get("state") == contract.STATE_FINISHED]
    return end


@pytest.mark.parametrize(("status", "reason"), [
    (404, "model openai:no-such-model is not known to its provider"),
    (401, "model openai:no-such-model rejected the credentials"),
])
def test_a_model_the_provider_refuses_is_fatal_at_once(tmp_path, agent_env, openai_server, status, reason):  # noqa: F811
    FakeOpenAI.status = status
    workspace = tmp_path / "ws"
    proc = subprocess.run(
        agent_cmd("badmodel", workspace, EXAMPLE_TASK, "openai:no-such-model", "--model-gateway", gateway_of(openai_server),
                  "--secrets-dir", str(secrets(tmp_path))),
        env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == contract.EXIT_FATAL, proc.stderr
    end = finished(proc.stdout)
    assert end["reason"].startswith(reason) and end["failure_class"] == contract.FAILURE_FATAL
    assert len(FakeOpenAI.requests) == 1  # asked once: no retry inside the run either
    result = json.loads((workspace / contract.RESULT_FILE).read_text())
    assert (result["outcome"], result["failure_class"]) == (contract.OUTCOME_FAILED, contract.FAILURE_FATAL)


def test_an_unknown_provider_is_fatal_in_words(tmp_path, agent_env):
    proc = subprocess.run(agent_cmd("badprov", tmp_path / "ws", EXAMPLE_TASK, "nosuch:model"),
                          env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == contract.EXIT_FATAL
    end = finished(proc.stdout)
    assert end["reason"].startswith("model provider 'nosuch' is not supported") and end["failure_class"] == "fatal"


def test_a_spent_budget_is_fatal_it_would_be_spent_again(tmp_path, agent_env):
    proc = subprocess.run(agent_cmd("budget", tmp_path / "ws", EXAMPLE_TASK, "scripted:example", "--max-strategic-rounds", "1"),
                          env=agent_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == contract.EXIT_DONE, proc.stderr
    end = finished(proc.stdout)
    assert (end["outcome"], end["failure_class"]) == (contract.OUTCOME_BUDGET, contract.FAILURE_FATAL)
    assert end["reason"] == "the budget of 1 strategic rounds is spent"
