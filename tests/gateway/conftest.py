"""Servers on loopback for the gateway's tests: a fake OpenAI/Anthropic upstream that checks the key
it receives and answers with usage (whole or streamed), and the gateway in front of it."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gateway.app import Gateway, create_app
from gateway.grants import Grant, new_token, sha256, write_grant
from gateway.publish import Publisher
from gateway.usage import Price
from tests.conftest import eventually

UPSTREAM_KEY = "sk-upstream-secret-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-upstream-secret-0123456789"


@dataclass
class Upstream:
    """What the fake provider saw, and a gate that holds a stream after its first chunk."""

    url: str = ""
    requests: list[dict] = field(default_factory=list)
    gate: threading.Event | None = None
    usage: tuple[int, int, int] = (11, 7, 3)  # input, output, cached


def _sse(events: list[dict], named: bool = False) -> list[bytes]:
    out = []
    for event in events:
        prefix = f"event: {event['type']}\n" if named else ""
        out.append(f"{prefix}data: {json.dumps(event)}\n\n".encode())
    return out


def fake_upstream(state: Upstream) -> Starlette:
    return Starlette(routes=[Route("/v1/chat/completions", _chat(state), methods=["POST"]), Route("/v1/messages", _messages(state), methods=["POST"]),
                             Route("/v1/responses", _responses(state), methods=["POST"])])


def _chat(state: Upstream):
    async def chat(request: Request):
        body = await request.json()
        state.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        if request.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
            return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
        inp, out, cached = state.usage
        usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out, "prompt_tokens_details": {"cached_tokens": cached}}
        base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
        tools = [(t.get("function") or {}).get("name") for t in body.get("tools") or []]
        if "plan" in tools:  # the agent's strategic phase: plan one objective
            call = {"id": "call_1", "type": "function", "function": {"name": "plan", "arguments": json.dumps({"todos": ["look"], "objective": "look around"})}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]})
        if "execute" in tools and state.gate is not None:  # the tactical phase waits while the test looks at the agent
            await asyncio.to_thread(state.gate.wait, 60)
        if not body.get("stream"):
            message = {"role": "assistant", "content": "hello from upstream"}
            return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hel"}, "finish_reason": None}]},
                  {**chunk, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        return StreamingResponse(_gated(state, [*_sse(events), b"data: [DONE]\n\n"]), media_type="text/event-stream")

    return chat


def _messages(state: Upstream):
    async def messages(request: Request):
        body = await request.json()
        state.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        if request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return JSONResponse({"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}, 401)
        inp, out, cached = state.usage
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_reason": "end_turn",
                   "stop_sequence": None, "content": [{"type": "text", "text": "hello from anthropic"}]}
        usage = {"input_tokens": inp - cached, "output_tokens": out, "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
        if not body.get("stream"):
            return JSONResponse({**message, "usage": usage})
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events = [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello "}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "from anthropic"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": out}},
            {"type": "message_stop"},
        ]
        return StreamingResponse(_gated(state, _sse(events, named=True)), media_type="text/event-stream")

    return messages


def _responses(state: Upstream):
    async def responses(request: Request):
        body = await request.json()
        state.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        if request.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
            return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
        inp, out, cached = state.usage
        usage = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        text = {"type": "output_text", "text": "hello from responses", "annotations": []}
        done = {"id": "resp_1", "object": "response", "created_at": 0, "model": body["model"], "status": "completed",
                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}],
                "usage": usage, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if not body.get("stream"):
            return JSONResponse(done)
        events = [
            {"type": "response.created", "sequence_number": 0, "response": {**done, "status": "in_progress", "output": [], "usage": None}},
            {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "hello from responses", "logprobs": []},
            {"type": "response.completed", "sequence_number": 2, "response": done},
        ]
        return StreamingResponse(_gated(state, _sse(events, named=True)), media_type="text/event-stream")

    return responses


async def _gated(state: Upstream, parts: list[bytes]):
    yield parts[0]
    if state.gate is not None:  # the test reads the first chunk through the gateway before it lets the rest go
        await asyncio.to_thread(state.gate.wait, 30)
    for part in parts[1:]:
        yield part


class Served:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        eventually(lambda: self.server.started, "the server to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class Recorder(Publisher):
    """Keeps the usage events instead of publishing them."""

    def __init__(self):
        super().__init__(None)
        self.events: list[dict] = []

    def publish(self, task_id: str, event: dict) -> None:
        self.events.append(event)


@pytest.fixture
def upstream():
    state = Upstream()
    served = Served(fake_upstream(state))
    state.url = served.url
    yield state
    if state.gate is not None:
        state.gate.set()
    served.stop()


@dataclass
class GatewayUnderTest:
    url: str
    gateway: Gateway
    events: list[dict]
    grants_dir: Path
    secrets_dir: Path

    def grant(self, task_id: str, **limits) -> str:
        """A new token for `task_id`, written as the launcher writes it."""
        token = new_token(task_id)
        write_grant(self.grants_dir, Grant(task_id, sha256(token), **limits))
        return token


@pytest.fixture
def gateway(tmp_path, upstream):
    secrets = tmp_path / "model-secrets"
    secrets.mkdir()
    (secrets / "openai_api_key").write_text(UPSTREAM_KEY + "\n")
    (secrets / "anthropic_api_key").write_text(ANTHROPIC_KEY + "\n")
    (secrets / "base_url").write_text(upstream.url + "/v1\n")
    recorder = Recorder()
    gw = Gateway(secrets_dir=secrets, publisher=recorder, grants_dir=tmp_path / "grants", state_dir=tmp_path / "usage",
                 prices={"gpt-test": Price(1000.0, 2000.0, 500.0)})
    served = Served(create_app(gw))
    yield GatewayUnderTest(served.url, gw, recorder.events, tmp_path / "grants", secrets)
    served.stop()
