"""Chat models behind one call: `invoke(phase, messages, tools, turn) -> AIMessage`.

- `scripted:NAME` replays a YAML/JSON list of turns from the file NAME (or
  NAME.yaml, NAME.yml, NAME.json) in the scripts directory: a bare name, never
  a path (a task must not make the agent read a file of its choosing). It picks
  turn number `turn`, the count of model turns already in the graph state, so a
  resumed run continues with the right turn. `scripted:example` is the bundled demo.
- `provider:model` (openai, anthropic, ollama, vllm, openai-compatible) goes
  through LangChain's `init_chat_model` (optional extras) to the model gateway
  (`gateway/`), never to the provider: the agent holds no model key. The base URL
  is the gateway's `/<provider>/v1` (Anthropic: `/anthropic`, its SDK adds `/v1`),
  the API key the task's gateway token (`<secrets dir>/gateway.token`; none in a pod,
  whose sidecar is reached on the pod's loopback only).
- A call the gateway refuses because a budget of the task is spent (402,
  `x-dockyard-refusal: budget_exhausted`) raises `BudgetExhausted` with the
  gateway's message, which names the limit; the graph ends with that outcome.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from langchain_core.messages import AIMessage, BaseMessage

from agent import contract

EXAMPLES_DIR = Path(__file__).parent / "examples"
PROVIDERS = contract.MODEL_PROVIDERS  # one list: the cockpit's form checks the same
POD_TOKEN = "dockyard-pod"  # the pod's sidecar asks no token; the SDKs want some key
REFUSAL_HEADER = "x-dockyard-refusal"
GATE_SECONDS = 300  # the longest a scripted turn's gate holds its call open


class ModelConfigError(Exception):
    """The model cannot work with this configuration: fatal, retrying will not help."""


class BudgetExhausted(Exception):
    """The model gateway refused the call: a token or cost limit of the task is spent (the message names it)."""


class Model(Protocol):
    def invoke(self, phase: str, messages: list[BaseMessage], tools: list[dict], turn: int) -> AIMessage: ...


@dataclass
class ScriptedModel:
    """Replays turns `{content?, tool_calls?: [{name, args}], delay_seconds?, usage?, response_id?, gate?}`;
    `usage` (`{input_tokens, output_tokens}`) and `response_id` stand for a provider's, to try the trace's counts;
    `gate: NAME` holds the call open until a file NAME (a bare name) exists beside the script, at most
    `GATE_SECONDS`: a test decides when a model call ends, not a sleep."""

    turns: list[dict]
    source: str

    @classmethod
    def load(cls, path: Path) -> "ScriptedModel":
        try:
            text = path.read_text()
        except OSError as exc:
            raise ModelConfigError(f"scripted model file {path} cannot be read: {exc.strerror}") from None
        try:
            turns = json.loads(text) if path.suffix == ".json" else _yaml_load(text)
        except ValueError as exc:
            raise ModelConfigError(f"scripted model file {path} is not valid YAML/JSON: {exc}") from None
        if isinstance(turns, dict):
            turns = turns.get("turns")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ModelConfigError(f"scripted model file {path} must hold a list of turns {{content?, tool_calls?}}")
        for number, turn in enumerate(turns):
            if "gate" in turn and not (isinstance(turn["gate"], str) and contract.is_valid_script_name(turn["gate"])):
                raise ModelConfigError(f"{path}: turn {number}: 'gate' must be a bare file name beside the script")
            for call in turn.get("tool_calls") or []:
                if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                    raise ModelConfigError(f"{path}: turn {number}: each tool call needs a 'name' and 'args'")
        return cls(turns=turns, source=str(path))

    def invoke(self, phase: str, messages: list[BaseMessage], tools: list[dict], turn: int) -> AIMessage:
        if turn >= len(self.turns):
            raise ModelConfigError(
                f"scripted model {self.source} has {len(self.turns)} turns and the run asked for turn {turn + 1}; "
                "add turns ending with a finish call"
            )
        spec = self.turns[turn]
        if spec.get("delay_seconds"):
            time.sleep(float(spec["delay_seconds"]))
        if spec.get("gate"):
            gate, until = Path(self.source).parent / spec["gate"], time.monotonic() + GATE_SECONDS
            while not gate.exists() and time.monotonic() < until:
                time.sleep(0.05)
        calls = [
            {"name": call["name"], "args": call.get("args") or {}, "id": f"call_{turn}_{index}", "type": "tool_call"}
            for index, call in enumerate(spec.get("tool_calls") or [])
        ]
        extra: dict = {}
        usage = spec.get("usage")
        if isinstance(usage, dict):
            tokens_in, tokens_out = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            extra["usage_metadata"] = {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
        if isinstance(spec.get("response_id"), str):
            extra["response_metadata"] = {"id": spec["response_id"]}
        return AIMessage(content=spec.get("content") or "", tool_calls=calls, **extra)


def _yaml_load(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class ChatModel:
    """A LangChain chat model; the system prompt is chosen per phase by the graph."""

    chat: object
    spec: str

    def invoke(self, phase: str, messages: list[BaseMessage], tools: list[dict], turn: int) -> AIMessage:
        try:
            reply = self.chat.bind_tools(tools).invoke(messages)
        except Exception as exc:
            refusal = _budget_refusal(exc)
            if refusal:
                raise BudgetExhausted(refusal) from None
            if _is_auth_error(exc):
                raise ModelConfigError(f"model {self.spec} rejected the credentials: {exc}") from exc
            raise
        return reply if isinstance(reply, AIMessage) else AIMessage(content=str(reply.content))


def _is_auth_error(exc: Exception) -> bool:
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    return name in ("AuthenticationError", "PermissionDeniedError") or status in (401, 403)


def _budget_refusal(exc: Exception) -> str | None:
    """The gateway's message when `exc` is its budget refusal (both SDKs keep the HTTP response)."""
    response = getattr(exc, "response", None)
    if getattr(exc, "status_code", None) != 402 or response is None or response.headers.get(REFUSAL_HEADER) != "budget_exhausted":
        return None
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "a budget of the task is spent"


def _read_secret(secrets_dir: Path, *names: str) -> str | None:
    for name in names:
        path = secrets_dir / name
        if path.is_file():
            return path.read_text().strip() or None
    return None


def script_path(name: str, scripts_dir: Path) -> Path:
    """The file of `scripted:NAME` in `scripts_dir`; a name that is a path is a ModelConfigError."""
    if not contract.is_valid_script_name(name):
        raise ModelConfigError(
            f"scripted model {name!r} is not a bare name: name a file in the scripts directory {scripts_dir} "
            "(e.g. scripted:example), never a path")
    candidates = [name] if "." in name else [name, f"{name}.yaml", f"{name}.yml", f"{name}.json"]
    for candidate in candidates:
        if (scripts_dir / candidate).is_file():
            return scripts_dir / candidate
    if name == "example":  # the bundled demo works whatever the scripts directory
        return EXAMPLES_DIR / "example_turns.yaml"
    raise ModelConfigError(f"scripted model {name!r}: no file {' or '.join(candidates)} in the scripts directory {scripts_dir}")


def load_model(spec: str, *, secrets_dir: Path, scripts_dir: Path = EXAMPLES_DIR, timeout_seconds: float = 300,
               gateway: str | None = None) -> Model:
    """The model of `spec`; LangChain models talk to the model gateway at `gateway` (its base URL)."""
    provider, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelConfigError(f"model {spec!r} must look like 'provider:model', e.g. 'scripted:example' or 'openai:gpt-4o'")
    if contract.has_control_chars(spec):
        raise ModelConfigError("the model spec contains control characters")
    if provider == contract.SCRIPTED_PROVIDER:
        return ScriptedModel.load(script_path(name, scripts_dir))

    try:
        from langchain.chat_models import init_chat_model
    except ImportError:
        raise ModelConfigError(
            f"model {spec!r} needs the LangChain provider extras: install dockyard[openai] or dockyard[anthropic]"
        ) from None

    if provider not in PROVIDERS:
        raise ModelConfigError(
            f"model provider {provider!r} is not supported; use scripted, {', '.join(PROVIDERS)}"
        )
    if not gateway:
        raise ModelConfigError(
            f"model {spec!r} needs the model gateway (the agent holds no model key): run the agent with "
            "--model-gateway URL (dockyard dev and the Job pass it)")
    token = _read_secret(secrets_dir, contract.GATEWAY_TOKEN_FILE) or POD_TOKEN
    gateway = gateway.rstrip("/")
    kwargs: dict = {"timeout": timeout_seconds, "max_retries": 2, "api_key": token}
    if provider == "anthropic":
        kwargs.update(model_provider="anthropic", base_url=f"{gateway}/anthropic")
    else:
        kwargs.update(model_provider="openai", base_url=f"{gateway}/{provider}/v1")
    try:
        chat = init_chat_model(name, **kwargs)
    except ImportError as exc:
        raise ModelConfigError(f"model {spec!r}: {exc}; install the matching dockyard extra") from None
    return ChatModel(chat=chat, spec=spec)
