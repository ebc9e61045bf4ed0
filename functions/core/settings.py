"""The settings of a functions process: read from the environment once, printed at start-up.

Invariant: nothing else in `functions` reads `DOCKYARD_*` variables; code takes
a `Settings` (or the value it needs) as an argument. `describe()` never shows
a secret (URL passwords are masked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from agent import contract
from functions.core.task import LimitsPolicy
from functions.errors import SettingsError

RUNTIMES = ("local", "kubernetes")


def _env_name(name: str) -> str:
    return f"{contract.ENV_PREFIX}{name}"


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool = False, minimum: float = 0):
    raw = env.get(_env_name(name))
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{_env_name(name)}={raw!r} is not {kind}") from None
    if value < minimum:
        raise SettingsError(f"{_env_name(name)}={raw!r} must be at least {minimum}")
    return value


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    data_dir: Path = field(default_factory=lambda: Path.home() / ".dockyard")
    store: str = ""  # s3://bucket/prefix or file:///dir; empty means <data_dir>/store
    runtime: str = "local"
    limits: LimitsPolicy = field(default_factory=LimitsPolicy)
    stream_max_age_seconds: float = contract.STREAM_MAX_AGE_SECONDS
    snapshot_stale_seconds: float = 900
    snapshot_timeout_seconds: float = 10  # how long snapshot_due waits for each agent's reply
    cancel_timeout_seconds: float = 10  # how long an agent has to ack a cancel before the runtime kills it
    command_timeout_seconds: float = 5  # how long an agent has to ack a message
    ttl_succeeded_seconds: int = 3600
    ttl_failed_seconds: int = 7 * 24 * 3600
    # The SSE stream (functions/stream.py; docs/stream.md).
    stream_max_seconds: float = 540  # a response ends cleanly by then: under Knative's 600 s request timeout
    stream_send_timeout_seconds: float = 30  # a client whose socket takes no bytes for this long is dropped
    stream_client_buffer_bytes: int = 1024 * 1024  # how far a live client may fall behind before it is cut
    stream_max_per_ip: int = 20  # concurrent streams per client address; 0: no cap
    cors_origins: tuple[str, ...] = ()  # origins allowed to read the API from a browser; empty: same origin only
    known_secrets_file: str = ""  # known secret values, one per line, redacted from everything served
    broker_url: str = ""  # where the cockpit's relay posts events in the cluster; empty: same origin (dev)

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"{_env_name('RUNTIME')}={self.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if not self.store:
            object.__setattr__(self, "store", (Path(self.data_dir).absolute() / "store").as_uri())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        base = LimitsPolicy()
        limits = LimitsPolicy(
            default_deadline_seconds=_number(env, "DEFAULT_DEADLINE_SECONDS", base.default_deadline_seconds, integer=True, minimum=1),
            max_deadline_seconds=_number(env, "MAX_DEADLINE_SECONDS", base.max_deadline_seconds, integer=True, minimum=1),
            default_retries=_number(env, "DEFAULT_RETRIES", base.default_retries, integer=True),
            max_retries=_number(env, "MAX_RETRIES", base.max_retries, integer=True),
            default_storage=env.get(_env_name("DEFAULT_STORAGE")) or base.default_storage,
            max_storage_gi=_number(env, "MAX_STORAGE_GI", base.max_storage_gi, integer=True, minimum=1),
        )
        if limits.default_deadline_seconds > limits.max_deadline_seconds:
            raise SettingsError(f"{_env_name('DEFAULT_DEADLINE_SECONDS')} is above {_env_name('MAX_DEADLINE_SECONDS')}")
        if limits.default_retries > limits.max_retries:
            raise SettingsError(f"{_env_name('DEFAULT_RETRIES')} is above {_env_name('MAX_RETRIES')}")
        defaults = cls.__dataclass_fields__
        return cls(
            nats_url=env.get(_env_name("NATS_URL")) or defaults["nats_url"].default,
            data_dir=Path(env.get(_env_name("DATA_DIR")) or Path.home() / ".dockyard").expanduser(),
            store=env.get(_env_name("STORE"), ""),
            runtime=env.get(_env_name("RUNTIME")) or defaults["runtime"].default,
            limits=limits,
            stream_max_age_seconds=_number(env, "STREAM_MAX_AGE_SECONDS", contract.STREAM_MAX_AGE_SECONDS, minimum=1),
            snapshot_stale_seconds=_number(env, "SNAPSHOT_STALE_SECONDS", defaults["snapshot_stale_seconds"].default, minimum=1),
            snapshot_timeout_seconds=_number(env, "SNAPSHOT_TIMEOUT_SECONDS", defaults["snapshot_timeout_seconds"].default, minimum=0.01),
            cancel_timeout_seconds=_number(env, "CANCEL_TIMEOUT_SECONDS", defaults["cancel_timeout_seconds"].default, minimum=0.01),
            command_timeout_seconds=_number(env, "COMMAND_TIMEOUT_SECONDS", defaults["command_timeout_seconds"].default, minimum=0.01),
            ttl_succeeded_seconds=_number(env, "TTL_SUCCEEDED_SECONDS", defaults["ttl_succeeded_seconds"].default, integer=True),
            ttl_failed_seconds=_number(env, "TTL_FAILED_SECONDS", defaults["ttl_failed_seconds"].default, integer=True),
            stream_max_seconds=_number(env, "STREAM_MAX_SECONDS", defaults["stream_max_seconds"].default, minimum=0.1),
            stream_send_timeout_seconds=_number(env, "STREAM_SEND_TIMEOUT_SECONDS", defaults["stream_send_timeout_seconds"].default, minimum=0.1),
            stream_client_buffer_bytes=_number(env, "STREAM_CLIENT_BUFFER_BYTES", defaults["stream_client_buffer_bytes"].default, integer=True, minimum=1024),
            stream_max_per_ip=_number(env, "STREAM_MAX_PER_IP", defaults["stream_max_per_ip"].default, integer=True),
            cors_origins=tuple(o.strip() for o in env.get(_env_name("CORS_ORIGINS"), "").split(",") if o.strip()),
            known_secrets_file=env.get(_env_name("KNOWN_SECRETS_FILE"), ""),
            broker_url=env.get(_env_name("BROKER_URL"), "").strip(),
        )

    def describe(self) -> str:
        """One `name = value` line per setting, secrets masked."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("nats_url", "store", "broker_url"):
                value = mask_url(value)
            lines.append(f"{f.name} = {value}")
        return "\n".join(lines)
