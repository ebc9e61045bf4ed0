"""The model gateway with the real SDKs, through LangChain as the agent uses them, against a fake upstream."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from langchain_core.messages import HumanMessage

from agent import contract
from agent.models import BudgetExhausted, ModelConfigError, load_model
from tests.conftest import eventually
from tests.gateway.conftest import ANTHROPIC_KEY, UPSTREAM_KEY


def agent_model(gw, tmp_path, spec: str, token: str):
    """The model exactly as the agent loads it: the gateway's URL and the task's token file."""
    secrets = tmp_path / "agent-secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / contract.GATEWAY_TOKEN_FILE).write_text(token)
    return load_model(spec, secrets_dir=secrets, gateway=gw.url)


def ask(model, text="hi"):
    return model.invoke(contract.PHASE_TACTICAL, [HumanMessage(content=text)], [], 0)


def test_openai_through_the_gateway_gets_the_key_added_and_reports_usage(gateway, upstream, tmp_path):
    token = gateway.grant("t-openai")
    reply = ask(agent_model(gateway, tmp_path, "openai:gpt-test-1", token))
    assert reply.content == "hello from upstream"
    (seen,) = upstream.requests
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the key, added by the gateway
    assert token not in str(seen["headers"])  # the task's token stays at the gateway
    (event,) = gateway.events
    assert event["type"] == contract.EV_USAGE and event["task_id"] == "t-openai" and event["model"] == "gpt-test-1"
    assert (event["input_tokens"], event["output_tokens"], event["cached_tokens"], event["tokens"]) == (11, 7, 3, 18)
    # gpt-test: 1000 $/M input, 500 cached, 2000 output: (8*1000 + 3*500 + 7*2000) / 1e6
    assert event["cost_usd"] == pytest.approx(0.0235)
    assert event["totals"]["tokens"] == 18 and event["totals"]["calls"] == 1 and event["latency_ms"] >= 0
    assert event["response_id"] == "chatcmpl-1" == reply.response_metadata.get("id")  # joins the model turn to its usage


def test_openai_streaming_passes_chunks_and_counts_the_usage_it_asked_for(gateway, upstream, tmp_path):
    token = gateway.grant("t-stream")
    model = agent_model(gateway, tmp_path, "openai:gpt-test", token)
    text = "".join(str(chunk.content) for chunk in model.chat.stream([HumanMessage(content="hi")]))
    assert text == "hello"
    assert upstream.requests[0]["body"]["stream_options"] == {"include_usage": True}  # added by the gateway
    (event,) = gateway.events
    assert event["tokens"] == 18 and event["stream"] is True and event["reported"] is True


def test_anthropic_through_the_gateway_whole_and_streamed(gateway, upstream, tmp_path):
    token = gateway.grant("t-anthropic")
    model = agent_model(gateway, tmp_path, "anthropic:claude-test", token)
    assert ask(model).text == "hello from anthropic"
    streamed = "".join(chunk.text for chunk in model.chat.stream([HumanMessage(content="hi")]))
    assert streamed == "hello from anthropic"
    assert {r["headers"]["x-api-key"] for r in upstream.requests} == {ANTHROPIC_KEY}
    assert all(token not in str(r["headers"]) for r in upstream.requests)
    last = gateway.events[-1]
    # input counts the cached part too: 8 uncached + 3 read from the cache; output from message_delta
    assert (last["input_tokens"], last["output_tokens"], last["cached_tokens"], last["stream"]) == (11, 7, 3, True)
    assert last["totals"]["calls"] == len(upstream.requests)


def test_the_responses_api_whole_and_streamed_with_the_openai_sdk(gateway, upstream):
    import openai

    token = gateway.grant("t-responses")
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0)
    assert client.responses.create(model="gpt-test", input="hi").output_text == "hello from responses"
    deltas = [e.delta for e in client.responses.create(model="gpt-test", input="hi", stream=True) if e.type == "response.output_text.delta"]
    assert deltas == ["hello from responses"]
    assert [r["path"] for r in upstream.requests] == ["/v1/responses", "/v1/responses"]
    assert {r["headers"]["authorization"] for r in upstream.requests} == {f"Bearer {UPSTREAM_KEY}"}
    assert [(e["api"], e["tokens"], e["cached_tokens"], e["stream"]) for e in gateway.events] == [("responses", 18, 3, False), ("responses", 18, 3, True)]


def test_a_stream_is_passed_on_before_the_upstream_has_finished_it(gateway, upstream):
    """No buffering: the first chunk reaches the caller while the upstream still holds the rest."""
    upstream.gate = threading.Event()
    token = gateway.grant("t-gated")
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{gateway.url}/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            assert b'"hel"' in first and not gateway.events  # the call is still open upstream
            upstream.gate.set()
            rest = b"".join(chunks)
    assert b"[DONE]" in rest
    assert gateway.events[-1]["tokens"] == 18


def test_a_caller_that_hangs_up_mid_stream_is_still_counted(gateway, upstream):
    upstream.gate = threading.Event()
    token = gateway.grant("t-hangup")
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{gateway.url}/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}) as response:
            next(response.iter_raw())
    # The caller is gone; the upstream still holds its answer. The call is counted all the same.
    eventually(lambda: gateway.events, "the usage event of the abandoned call")
    assert gateway.events[-1]["task_id"] == "t-hangup" and gateway.gateway.totals["t-hangup"].calls == 1
    upstream.gate.set()


def test_a_token_budget_refuses_the_next_call_and_names_the_limit(gateway, upstream, tmp_path):
    token = gateway.grant("t-budget", max_tokens=10)
    model = agent_model(gateway, tmp_path, "openai:gpt-test", token)
    ask(model)  # 18 tokens: under the limit when it started, so it is forwarded whole
    with pytest.raises(BudgetExhausted, match="limits.max_tokens = 10, 18 tokens used"):
        ask(model)
    assert len(upstream.requests) == 1  # the refused call never reached the provider
    refused = gateway.events[-1]
    assert refused["status"] == 402 and "limits.max_tokens" in refused["refused"]


def test_a_cost_budget_refuses_too(gateway, upstream, tmp_path):
    token = gateway.grant("t-cost", max_cost_usd=0.01)
    model = agent_model(gateway, tmp_path, "openai:gpt-test", token)
    ask(model)
    with pytest.raises(BudgetExhausted, match="limits.max_cost_usd = 0.01"):
        ask(model)


def test_totals_survive_a_restart_of_the_gateway(gateway, upstream, tmp_path):
    token = gateway.grant("t-restart", max_tokens=30)
    model = agent_model(gateway, tmp_path, "openai:gpt-test", token)
    ask(model)
    saved = tmp_path / "usage" / "t-restart.usage.json"
    eventually(lambda: saved.exists() and json.loads(saved.read_text())["tokens"] == 18, "the totals on disk")
    gateway.gateway.totals.clear()  # what a new process starts with
    ask(model)  # 18 < 30: forwarded; now 36
    with pytest.raises(BudgetExhausted, match="36 tokens used"):
        ask(model)


def test_a_token_works_for_its_own_task_only(gateway, upstream, tmp_path):
    token_a = gateway.grant("t-a")
    gateway.grant("t-b")
    forged = token_a.replace("t-a", "t-b", 1)  # task A's secret presented for task B
    for token in (forged, "sk-anything", "", "dyg.t-a.wrong"):
        with pytest.raises(ModelConfigError, match="rejected the credentials"):
            ask(agent_model(gateway, tmp_path, "openai:gpt-test", token or "x"))
    assert upstream.requests == []


def test_only_the_model_paths_are_forwarded(gateway, upstream):
    token = gateway.grant("t-paths")
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(timeout=10) as client:
        for path in ("/openai/v1/files", "/openai/v1/fine_tuning/jobs", "/anthropic/v1/chat/completions", "/nope/v1/chat/completions"):
            assert client.post(gateway.url + path, json={}, headers=headers).status_code == 404, path
        assert client.get(gateway.url + "/openai/v1/models", headers=headers).status_code == 405
    assert upstream.requests == []


def test_the_agent_refuses_a_provider_model_without_a_gateway(tmp_path):
    with pytest.raises(ModelConfigError, match="needs the model gateway"):
        load_model("openai:gpt-4o", secrets_dir=tmp_path)
