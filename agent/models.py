"""Chat models behind one call: `invoke(phase, messages, tools, turn) -> AIMessage`.

- `scripted:NAME` replays a YAML/JSON list of turns from the file NAME (or
  NAME.yaml, NAME.yml, NAME.json) in the scripts directory: a bare name, never
  a path (a task must not make the agent read a file of its choosing). It picks
  turn number `turn`, the count of model turns already in the graph state, so a
  resumed run continues with the right turn. `scripted:example` is the bundled demo.
- `provider:model` (openai, anthropic, ollama, vllm, openai-compatible) goes
  through LangChain's `init_chat_model` (optional extras). Keys are read from
  files in the secrets directory, never from the environment.
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
OPENAI_COMPATIBLE = {"ollama": "http://ollama:11434/v1", "vllm": "http://vllm:8000/v1", "openai-compatible": None}


class ModelConfigError(Exception):
    """The model cannot work with this configuration: fatal, retrying will not help."""


class Model(Protocol):
    def invoke(self, phase: str, messages: list[BaseMessage], tools: list[dict], turn: int) -> AIMessage: ...


@dataclass
class ScriptedModel:
    """Replays turns `{content?, tool_calls?: [{name, args}], delay_seconds?}`."""

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
        calls = [
            {"name": call["name"], "args": call.get("args") or {}, "id": f"call_{turn}_{index}", "type": "tool_call"}
            for index, call in enumerate(spec.get("tool_calls") or [])
        ]
        return AIMessage(content=spec.get("content") or "", tool_calls=calls)


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
            if _is_auth_error(exc):
                raise ModelConfigError(f"model {self.spec} rejected the credentials: {exc}") from exc
            raise
        return reply if isinstance(reply, AIMessage) else AIMessage(content=str(reply.content))


def _is_auth_error(exc: Exception) -> bool:
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    return name in ("AuthenticationError", "PermissionDeniedError") or status in (401, 403)


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


def load_model(spec: str, *, secrets_dir: Path, scripts_dir: Path = EXAMPLES_DIR, timeout_seconds: float = 300) -> Model:
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

    api_key = _read_secret(secrets_dir, f"model/{provider}_api_key", "model/api_key")
    base_url = _read_secret(secrets_dir, "model/base_url")
    kwargs: dict = {"timeout": timeout_seconds, "max_retries": 2}
    if provider in OPENAI_COMPATIBLE:
        base_url = base_url or OPENAI_COMPATIBLE[provider]
        if not base_url:
            raise ModelConfigError(f"model {spec!r} needs a base URL in {secrets_dir}/model/base_url")
        kwargs.update(model_provider="openai", base_url=base_url, api_key=api_key or "unused")
    elif provider in ("openai", "anthropic"):
        if not api_key:
            raise ModelConfigError(f"model {spec!r} needs an API key in {secrets_dir}/model/api_key")
        kwargs.update(model_provider=provider, api_key=api_key)
        if base_url:
            kwargs["base_url"] = base_url
    else:
        raise ModelConfigError(
            f"model provider {provider!r} is not supported; use scripted, openai, anthropic, ollama, vllm or openai-compatible"
        )
    try:
        chat = init_chat_model(name, **kwargs)
    except ImportError as exc:
        raise ModelConfigError(f"model {spec!r}: {exc}; install the matching dockyard extra") from None
    return ChatModel(chat=chat, spec=spec)
