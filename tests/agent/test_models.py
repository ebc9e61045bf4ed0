"""Real providers through LangChain, against a local OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from langchain_core.messages import HumanMessage

from agent import contract
from agent.graph import CONTROL_TOOLS
from agent.models import ModelConfigError, load_model

PLAN_REPLY = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "local-model",
    "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "plan", "arguments": json.dumps({"todos": ["a"], "objective": "a"})},
        }]},
    }],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
        if type(self).status != 200:
            payload = {"error": {"message": "invalid api key", "type": "invalid_request_error", "code": "invalid_api_key"}}
        else:
            payload = PLAN_REPLY
        data = json.dumps(payload).encode()
        self.send_response(type(self).status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def openai_server():
    FakeOpenAI.requests = []
    FakeOpenAI.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def gateway_of(openai_server: str) -> str:
    """The fake server stands in for the model gateway: it sees what the agent sends to it."""
    return openai_server.removesuffix("/v1")


def secrets(tmp_path, token: str = "dyg.t1.task-token-123456"):
    (tmp_path / contract.GATEWAY_TOKEN_FILE).write_text(token + "\n")
    return tmp_path


def test_a_provider_model_talks_to_the_gateway_with_the_task_token(tmp_path, openai_server):
    model = load_model("openai:local-model", secrets_dir=secrets(tmp_path), gateway=gateway_of(openai_server))
    reply = model.invoke("STRATEGIC", [HumanMessage(content="Task: x")], CONTROL_TOOLS, 0)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("plan", {"todos": ["a"], "objective": "a"})]
    sent = FakeOpenAI.requests[0]
    assert sent["path"] == "/openai/v1/chat/completions"
    assert sent["auth"] == "Bearer dyg.t1.task-token-123456"  # the task's gateway token, never a model key
    assert [t["function"]["name"] for t in sent["body"]["tools"]] == ["plan", "finish"]


def test_ollama_goes_to_its_own_gateway_path_and_a_pod_needs_no_token(tmp_path, openai_server):
    model = load_model("ollama:llama3", secrets_dir=tmp_path, gateway=gateway_of(openai_server))
    assert model.invoke("STRATEGIC", [HumanMessage(content="x")], CONTROL_TOOLS, 0).tool_calls
    assert FakeOpenAI.requests[0]["path"] == "/ollama/v1/chat/completions"
    assert FakeOpenAI.requests[0]["auth"] == "Bearer dockyard-pod"


def test_rejected_credentials_are_a_config_error(tmp_path, openai_server):
    FakeOpenAI.status = 401
    model = load_model("openai:local-model", secrets_dir=secrets(tmp_path), gateway=gateway_of(openai_server))
    with pytest.raises(ModelConfigError, match="rejected the credentials"):
        model.invoke("STRATEGIC", [HumanMessage(content="x")], CONTROL_TOOLS, 0)


# --- scripted models: a bare name in the scripts directory, never a path ---------------

TURNS = [{"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]}]


def test_scripted_models_are_looked_up_by_name_in_the_scripts_dir(tmp_path):
    from agent.models import EXAMPLES_DIR, ScriptedModel

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "gated.yaml").write_text(json.dumps(TURNS))
    (scripts / "other.json").write_text(json.dumps(TURNS))
    for spec, source in [("scripted:gated", "gated.yaml"), ("scripted:gated.yaml", "gated.yaml"), ("scripted:other", "other.json")]:
        model = load_model(spec, secrets_dir=tmp_path, scripts_dir=scripts)
        assert isinstance(model, ScriptedModel) and model.source == str(scripts / source)
    example = load_model("scripted:example", secrets_dir=tmp_path)  # the bundled demo, by default
    assert example.source == str(EXAMPLES_DIR / "example_turns.yaml")


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../victim/ws/repo/turns.yaml", "../../t-a/ws/repo/turns.yaml", "sub/turns.yaml", "..", "turns.yaml\n", "x\x00"],
)
def test_a_scripted_model_given_as_a_path_is_a_config_error(tmp_path, name):
    """The model spec comes from the task: a path would let a task run commands from a file of its choosing."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    victim = tmp_path / "victim" / "ws" / "repo"
    victim.mkdir(parents=True)
    (victim / "turns.yaml").write_text(json.dumps(TURNS))
    with pytest.raises(ModelConfigError):
        load_model(f"scripted:{name}", secrets_dir=tmp_path, scripts_dir=scripts)


def test_a_missing_script_names_the_scripts_dir(tmp_path):
    with pytest.raises(ModelConfigError, match="no file missing or missing.yaml"):
        load_model("scripted:missing", secrets_dir=tmp_path, scripts_dir=tmp_path)


def test_the_example_works_with_any_scripts_dir(tmp_path):
    from agent.models import EXAMPLES_DIR

    assert load_model("scripted:example", secrets_dir=tmp_path, scripts_dir=tmp_path).source == str(EXAMPLES_DIR / "example_turns.yaml")
