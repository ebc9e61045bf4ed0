"""Every `DOCKYARD_*` variable the orchestrator reads, in one typed model: read once at start, printed, documented.

Invariants
- One field per variable, with one default and one description; the README's
  configuration table is generated from these fields (`python -m functions.core.settings
  --markdown`) and a test keeps the two equal.
- Nothing else in `functions` reads `DOCKYARD_*` variables: code takes a `Settings` (or the
  value it needs). The Kubernetes Job factory reads its fields from the same model.
- A `Settings` that exists is valid. Every rejection is a `SettingsError` naming the variable
  (`DOCKYARD_X='value': why`), never a pydantic traceback; `describe()` never shows a secret.
- Keyword construction (`Settings(data_dir=..., runtime="local")`, as tests do) never reads the
  process environment; `Settings.from_env(mapping)` reads the given mapping (default `os.environ`).

pydantic-settings' own environment source does the reading (names from `env_prefix` or a field's alias), over a
mapping instead of `os.environ`, and with one rule of ours: a blank value keeps the default, except where blank means
"none" (the egress proxy, NO_PROXY, the StorageClass).

Cost: pydantic loads only for this module in a functions process, and the functions scale to zero. On the shared
2-core machine, interleaved: `python -X importtime -c "import functions.main"` took 120 ms before this model and 184 ms
with it (minimum of 15; medians 216 and 295 ms); `bench/bench_coldstart.py --runs 9` gave 0.76-1.30x before and
1.28-1.74x with it (8 runs, 4 above the 1.5x target). A hand-written dataclass model with the same fields gave 0.89-1.47x.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent import contract
from functions.core.settings_source import Variables, settings_error
from functions.core.task import LimitsPolicy, parse_task
from functions.errors import BadInput, SettingsError

if TYPE_CHECKING:
    from functions.core.nats_jwt import Issuer

# The agent image's PATH (images/agent.Dockerfile): its venv, then the system's. The factory puts
# /home/agent/.local/bin in front so that `pip install --user` works on a read-only root; an env PATH
# replaces the image's, hence the copy.
DEFAULT_IMAGE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_LEAF_SCHEMES = ("nats-leaf", "nats", "tls", "ws", "wss")
_STORE_SCHEMES = ("s3", "file")
_HTTP_SCHEMES = ("http", "https")
_RESOURCE_PARTS = ("cpu_request", "memory_request", "cpu_limit", "memory_limit")
_RESOURCE_GROUPS = ("agent", "sidecar")
# A Kubernetes quantity: 500m, 2, 1.5, 4Gi, 1e3 (resource.Quantity's grammar, without a sign).
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError("not a Kubernetes quantity like 500m, 2 or 4Gi")
    return value


Quantity = Annotated[str, AfterValidator(_quantity)]
Name = Annotated[str, Field(min_length=1)]
CommaList = Annotated[tuple[str, ...], NoDecode]  # "a, b" in the environment, a list in a settings file


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one container (the factory renders them)."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str


def _setting(default: Any, doc: str, used_by: str, *, var: str | None = None, shown: str | None = None,
             blank: bool = False, url: tuple[str, ...] | None = None, **constraints: Any) -> Any:
    """A field: `var` when the variable is not DOCKYARD_<FIELD NAME>; `shown` is the default as the
    docs print it; `blank` when an empty value means "none" rather than "the default"."""
    return Field(
        default,
        description=doc,
        validation_alias=contract.ENV_PREFIX + var if var else None,
        json_schema_extra={"used_by": used_by, "shown": shown, "blank": blank, "url": url},
        **constraints,
    )


_LIMITS = LimitsPolicy()  # the defaults of a task's limits live with the rule that applies them
_FUNCTIONS = "functions"
_STREAM = "stream"
_JOBS = "Kubernetes runtime (the Job)"
_PODMAN = "podman runtime"


class Settings(BaseSettings):
    """The settings of a functions, stream or `dockyard dev` process (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix=contract.ENV_PREFIX,
        case_sensitive=False,  # DOCKYARD_ + the field name, upper case in the environment
        frozen=True,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        coerce_numbers_to_str=True,  # a settings file may say `cpu_limit: 2`
        allow_inf_nan=False,
    )

    # --- where things are ---------------------------------------------------------
    nats_url: str = _setting(
        "nats://nats.nats-io.svc.cluster.local:4222",
        "NATS server (JetStream) of the functions, the stream and the agents; user:password@ allowed",
        "functions, stream, agents", url=_NATS_SCHEMES)
    data_dir: Path = _setting(
        Path(".dockyard"), "scratch space: workspaces and logs of the local runtime, `dockyard dev`'s NATS and store",
        "functions (local runtime)", shown="`./.dockyard`")
    store: str = _setting(
        "", "object store of snapshots and results: `s3://bucket/prefix` (S3, MinIO) or `file:///dir`",
        "functions, agents", shown="`file://<data dir>/store`", url=_STORE_SCHEMES)
    s3_endpoint: str = _setting(
        "", "S3 endpoint for MinIO; none: AWS (or the agents' secret file `s3/endpoint`)",
        "agents, functions (S3 client)", url=_HTTP_SCHEMES)
    runtime: Literal["local", "kubernetes", "podman"] = _setting(
        "local", "where agents run: `local` (child processes), `kubernetes` (Jobs) or `podman` (each task's Job as a podman pod)", _FUNCTIONS)
    max_running: int = _setting(0, "tasks the local runtime runs at once; the rest wait in submit order (`dockyard dev --max-running`); 0: the number of cores",
                                "local runtime", ge=0)

    # --- NATS credentials (decentralized JWT: `dockyard nats-auth init`) ---------------
    nats_creds: str = _setting("", "this process's NATS user: a `.creds` file (user JWT + nkey seed); none: no credentials, or those in the URL", "functions, stream")
    tracker_nats_creds: str = _setting("", "the registry tracker's NATS user, a `.creds` file", "stream (its tracker)", shown="`DOCKYARD_NATS_CREDS`")
    nats_account: str = _setting("", "public key of the NATS account of the tasks' users (`account.pub`)", "functions (the launcher)")
    nats_signing_key_file: str = _setting("", "seed file of a signing key of that account: the launcher mints each task's own NATS users with it; "
                                          "none: tasks get no NATS credentials", "functions (the launcher)")
    nats_leaf_url: str = _setting(
        "nats-leaf://nats.nats-io.svc.cluster.local:7422",
        "the NATS server's leafnode port: with minted credentials, each agent pod's `nats-leaf` sidecar connects there "
        "as the task's agent user (the agent container holds no credentials)", "Kubernetes runtime (the Job)", url=_LEAF_SCHEMES)

    # --- a task's limits: defaults and maxima ---------------------------------------
    default_deadline_seconds: int = _setting(_LIMITS.default_deadline_seconds, "deadline of a task that sets none", "task_submitted", ge=1)
    max_deadline_seconds: int = _setting(_LIMITS.max_deadline_seconds, "the longest deadline a task may ask for", "task_submitted", ge=1)
    default_retries: int = _setting(_LIMITS.default_retries, "retries of a task that sets none", "task_submitted", ge=0)
    max_retries: int = _setting(_LIMITS.max_retries, "the most retries a task may ask for", "task_submitted", ge=0)
    default_storage: str = _setting(_LIMITS.default_storage, "workspace size of a task that sets none", "task_submitted")
    max_storage_gi: int = _setting(_LIMITS.max_storage_gi, "the largest workspace a task may ask for, in Gi", "task_submitted", ge=1)
    default_max_tokens: int = _setting(0, "token budget (`limits.max_tokens`) of a task that sets none; 0: none", "task_submitted", ge=0)
    max_max_tokens: int = _setting(_LIMITS.max_max_tokens, "the largest `limits.max_tokens` a task may ask for", "task_submitted", ge=1)
    model_prices: str = _setting("", "the model gateway's price table, USD per million tokens: `model=input/output[/cached input]`, comma-separated, "
                                 "longest model prefix wins (e.g. `gpt-4o=2.5/10/1.25,claude-sonnet-4=3/15/0.3`); unknown models cost 0",
                                 "model gateway (usage events, `limits.max_cost_usd`)")

    allow_file_repos: bool = _setting(
        False, "accept `file://` repositories (one machine only: `dockyard dev --allow-file-repos`; never with `kubernetes`)",
        "task_submitted, local runtime")
    scripts_dir: str = _setting(
        "", "directory of `scripted:NAME` model scripts (a task names a file in it, never a path)",
        "local runtime (its agents; a Job's agent uses its image's bundled examples)", shown="the bundled `agent/examples/`")

    # --- functions ------------------------------------------------------------------
    stream_max_age_seconds: float = _setting(
        contract.STREAM_MAX_AGE_SECONDS, "how long the JetStream stream keeps a task's messages", "functions, stream", ge=1)
    snapshot_stale_seconds: float = _setting(
        900, "a running task whose last good snapshot is older is reported stale", "snapshot_due", ge=1)
    snapshot_min_interval_seconds: float = _setting(
        240, "snapshot rounds closer together are skipped (a burst of pings costs one round; 0: no window); "
        "a little under the PingSource period (5 min)", "snapshot_due", ge=0)
    snapshot_timeout_seconds: float = _setting(10, "how long snapshot_due waits for each agent's reply", "snapshot_due", ge=0.01)
    cancel_timeout_seconds: float = _setting(
        10, "how long an agent has to acknowledge a cancel before the runtime stops it", "task_command", ge=0.01)
    command_timeout_seconds: float = _setting(5, "how long an agent has to acknowledge a message", "task_command", ge=0.01)
    ttl_succeeded_seconds: int = _setting(3600, "how long the record of a task that succeeded is kept", "job_finished, local runtime", ge=0)
    ttl_failed_seconds: int = _setting(
        7 * 24 * 3600, "how long the record of any other finished task is kept", "job_finished, local runtime",
        shown="`604800` (7 days)", ge=0)

    # --- the stream (docs/stream.md) -------------------------------------------------
    stream_max_seconds: float = _setting(
        540, "a response ends cleanly by then (under Knative's 600 s request timeout); the client resumes", _STREAM, ge=0.1)
    stream_send_timeout_seconds: float = _setting(
        30, "a client whose socket takes no bytes for this long is cut (it resumes from its Last-Event-ID)", _STREAM, ge=0.1)
    stream_client_buffer_bytes: int = _setting(
        1024 * 1024, "how far a live client may fall behind before it is cut", _STREAM, shown="`1048576` (1 MiB)", ge=1024)
    stream_max_per_ip: int = _setting(20, "concurrent streams per client address (429 beyond); 0: no cap", _STREAM, ge=0)
    cors_origins: CommaList = _setting(
        (), "comma-separated origins allowed to read the API from a browser (an external cockpit); none: same origin only",
        _STREAM)
    known_secrets_file: str = _setting("", "exact secret values redacted from everything served: a file (one per line) or a directory (one per file, e.g. a Secret volume)", _STREAM)
    api_tokens_file: str = _setting(
        "", "API tokens, hashed: one line per token, `name scope sha256hex`, scope read or write (`dockyard token create`); "
        "none: every API request is refused (`dockyard dev`: `<data dir>/api-tokens`)", "stream, `dockyard dev`")
    token: str = _setting(
        "", "API token the `dockyard` CLI sends (after `--token`); none: `<data dir>/api-token`, the dev token", "CLI")
    trusted_proxies: CommaList = _setting(
        (), "comma-separated proxy addresses or CIDR ranges whose X-Forwarded-For is believed (the per-address cap); none: the peer",
        _STREAM)
    broker_url: str = _setting(
        "", "where the cockpit's relay posts events (the Broker's address); none: `/` of its own origin (dev)",
        "stream (cockpit relay)", url=_HTTP_SCHEMES)

    # --- the agents' Jobs (functions/core/factory.py) ----------------------------------
    agent_image: Name = _setting("dev.local/dockyard-agent:0.1.0", "image of the agent, restore and snapshotter containers", _JOBS)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = _setting("IfNotPresent", "the containers' imagePullPolicy", _JOBS)
    image_path: Name = _setting(DEFAULT_IMAGE_PATH, "the agent image's PATH (`~/.local/bin` goes in front)", _JOBS, var="AGENT_IMAGE_PATH")
    namespace: Name = _setting(contract.AGENTS_NAMESPACE, "namespace of the Jobs and their PVCs", _JOBS, var="AGENTS_NAMESPACE")
    service_account: Name = _setting("dockyard-agent", "the pods' ServiceAccount (no token is mounted)", _JOBS, var="AGENT_SERVICE_ACCOUNT")
    egress_proxy: str = _setting(
        "http://egress-proxy.dockyard.svc.cluster.local:3128", "HTTP(S) proxy of the agent container; empty: none",
        _JOBS, blank=True, url=_HTTP_SCHEMES)
    no_proxy: CommaList = _setting(
        (".svc", ".cluster.local", "localhost", "127.0.0.1"), "hosts that bypass the proxy, comma-separated (the NATS and S3 hosts are added)",
        _JOBS, blank=True)
    storage_class: str = _setting("local-path", "StorageClass of the workspaces; empty: the cluster's default", _JOBS, blank=True)
    ttl_seconds_after_finished: int = _setting(
        24 * 3600, "a finished Job (and its PVC) is deleted this long after it finished", _JOBS, var="JOB_TTL_SECONDS", ge=0)
    termination_grace_seconds: int = _setting(
        300, "SIGTERM to SIGKILL: the agent finishes its step, then the final snapshot", _JOBS, ge=0)
    heartbeat_stale_seconds: int = _setting(180, "the liveness probe fails when the agent's heartbeat is older", _JOBS, ge=0)
    snapshot_interval_seconds: int = _setting(
        300, "periodic snapshots by the snapshotter; 0: on request only", _JOBS, var="SNAPSHOT_INTERVAL", ge=0)
    agent_cpu_request: Quantity = _setting("500m", "the agent container's CPU request", _JOBS)
    agent_memory_request: Quantity = _setting("1Gi", "the agent container's memory request", _JOBS)
    agent_cpu_limit: Quantity = _setting("2", "the agent container's CPU limit", _JOBS)
    agent_memory_limit: Quantity = _setting("4Gi", "the agent container's memory limit", _JOBS)
    sidecar_cpu_request: Quantity = _setting("50m", "CPU request of restore and snapshotter", _JOBS)
    sidecar_memory_request: Quantity = _setting("128Mi", "memory request of restore and snapshotter", _JOBS)
    sidecar_cpu_limit: Quantity = _setting("1", "CPU limit of restore and snapshotter", _JOBS)
    sidecar_memory_limit: Quantity = _setting("512Mi", "memory limit of restore and snapshotter", _JOBS)
    home_size_limit: Quantity = _setting("2Gi", "size limit of the agent's home (an emptyDir)", _JOBS)
    tmp_size_limit: Quantity = _setting("1Gi", "size limit of `/tmp` (an emptyDir)", _JOBS)
    object_store_secret: Name = _setting("dockyard-object-store", "Secret with the object store's credentials", _JOBS)
    model_secret: Name = _setting("dockyard-model", "Secret with the model's API key and base URL (optional)", _JOBS)
    git_push_secret: Name = _setting("dockyard-git-push", "Secret with the git credentials of `repo.push`, for a pushing task's snapshotter only (optional)", _JOBS)
    kueue_queue: str = _setting("", "a Kueue LocalQueue: Jobs are created suspended for Kueue to admit; none: no Kueue", _JOBS)
    default_model: str = _setting("", "model of a task that names none, e.g. `openai:gpt-4o`; none: the agent's default", _JOBS)

    # --- the podman runtime (functions/runtime/podman) ------------------------------------
    podman_host: Name = _setting("10.0.2.2", "this machine as the pods see it: loopback URLs (NATS, its leafnode port, S3, "
                                 "the egress proxy) name it in the Job", _PODMAN)
    podman_network: Name = _setting("slirp4netns:allow_host_loopback=true", "`podman pod create --network` of each task's pod", _PODMAN)
    podman_binary: Name = _setting("podman", "the podman command", _PODMAN)
    podman_containers_conf: str = _setting("", "CONTAINERS_CONF of the runtime's podman calls", _PODMAN,
                                           shown="`images/containers.conf` of this checkout when present")
    object_store_secret_dir: str = _setting("", "the object store's Secret (`DOCKYARD_OBJECT_STORE_SECRET`) as a directory, one file per "
                                            "key (`access_key_id`, `secret_access_key`, `region`, ...); none: no credentials", _PODMAN)
    model_secret_dir: str = _setting("", "the model's Secret (`DOCKYARD_MODEL_SECRET`) as a directory, one file per key; none: no model "
                                     "key in the pods (`dockyard dev`: its model gateway's key directory)", _PODMAN)
    git_credentials_dir: str = _setting("", "`repo.push`'s git credentials (files `username`, `password` or `token`, `hosts`), for the snapshotter only", "local and podman runtimes")

    # --- construction ------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings,)  # keyword construction never reads the environment; `from_env` does

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise settings_error(type(self), exc, mask_url) from None
        self._check_together()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """The settings from `DOCKYARD_*` variables in `env` (default: the process environment)."""
        return cls(**Variables(cls, os.environ if env is None else env)())

    def updated(self, values: Mapping[str, Any], source: str = "settings") -> "Settings":
        """A copy with `values` (field name -> value, as from a YAML settings file) applied and validated.
        `agent_resources`/`sidecar_resources` take a mapping of cpu_request, memory_request, cpu_limit, memory_limit.
        The store keeps its value: a new `data_dir` does not move a store already derived from the old one."""
        known = set(type(self).model_fields) | {f"{group}_resources" for group in _RESOURCE_GROUPS}
        for name in values:
            if name not in known:
                raise SettingsError(f"{source}: unknown setting {name!r}; known: {', '.join(sorted(known))}", name)
        try:
            return type(self)(**{**self.model_dump(), **values})
        except SettingsError as exc:
            names = {var: name for name, var in self.variables().items()}
            raise SettingsError(f"{source}: {names.get(exc.field, exc.field)}: {exc.message}", exc.field) from None

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        """`agent_resources=Resources(...)` or a mapping of its parts sets the four fields; a blank
        store is the `store` directory under the data dir."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for group in _RESOURCE_GROUPS:
            value = data.pop(f"{group}_resources", None)
            if value is None:
                continue
            parts = value.__dict__ if isinstance(value, Resources) else value
            if not isinstance(parts, Mapping) or not set(parts) <= set(_RESOURCE_PARTS):
                raise ValueError(f"{group}_resources must be a mapping with keys among {', '.join(_RESOURCE_PARTS)}")
            data.update({f"{group}_{part}": v for part, v in parts.items()})
        if not data.get("store"):
            data_dir = data.get("data_dir") or cls.default("data_dir")
            data["store"] = (Path(data_dir).expanduser().absolute() / "store").as_uri()
        return data

    @field_validator("data_dir")
    @classmethod
    def _home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("cors_origins", "no_proxy", "trusted_proxies", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return tuple(str(item).strip() for item in value if str(item).strip())
        return value

    @field_validator("model_prices")
    @classmethod
    def _prices(cls, value: str) -> str:
        from gateway.usage import parse_prices  # the gateway's own parser: one grammar

        parse_prices(value)
        return value

    @field_validator("default_model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value and ":" not in value:
            raise ValueError("use provider:model, e.g. openai:gpt-4o")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in _HTTP_SCHEMES or not parts.hostname or parts.path or parts.query):
                raise ValueError(f"{origin!r} is not an origin like https://cockpit.example:8443 (no path, no trailing slash)")
        return value

    @field_validator("nats_url", "nats_leaf_url", "store", "s3_endpoint", "egress_proxy", "broker_url")
    @classmethod
    def _url(cls, value: str, info) -> str:
        schemes = cls.model_fields[info.field_name].json_schema_extra["url"]
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ValueError(f"use a URL starting with {' or '.join(s + '://' for s in schemes)}")
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ValueError("a file store needs an absolute path: file:///dir")
        elif not parts.hostname:
            raise ValueError("the URL names no host")
        return value

    def _check_together(self) -> None:
        """Checks across fields: a task that sets no limits gets valid ones."""
        var = type(self).variable
        if self.default_deadline_seconds > self.max_deadline_seconds:
            raise SettingsError(
                f"{var('default_deadline_seconds')}={self.default_deadline_seconds} is above "
                f"{var('max_deadline_seconds')}={self.max_deadline_seconds}", var("default_deadline_seconds"))
        if self.default_retries > self.max_retries:
            raise SettingsError(
                f"{var('default_retries')}={self.default_retries} is above {var('max_retries')}={self.max_retries}",
                var("default_retries"))
        if self.default_max_tokens > self.max_max_tokens:
            raise SettingsError(f"{var('default_max_tokens')}={self.default_max_tokens} is above {var('max_max_tokens')}={self.max_max_tokens}",
                                var("default_max_tokens"))
        if self.allow_file_repos and self.runtime == "kubernetes":
            raise SettingsError(
                f"{var('allow_file_repos')}=true: file:// repositories are for one machine (`dockyard dev`), "
                "never with the kubernetes runtime", var("allow_file_repos"))
        if bool(self.nats_account) != bool(self.nats_signing_key_file):
            missing = "nats_signing_key_file" if self.nats_account else "nats_account"
            raise SettingsError(f"{var(missing)}: set both {var('nats_account')} and {var('nats_signing_key_file')}, or neither", var(missing))
        try:  # the storage rule lives with the task's validation: apply it to the default
            parse_task({"prompt": "-"}, source="settings", event_id="-", policy=self.limits)
        except BadInput as exc:
            raise SettingsError(f"{var('default_storage')}={self.default_storage!r}: {exc.message}", var("default_storage")) from None

    # --- views ---------------------------------------------------------------------------
    @property
    def limits(self) -> LimitsPolicy:
        return LimitsPolicy(
            default_deadline_seconds=self.default_deadline_seconds,
            max_deadline_seconds=self.max_deadline_seconds,
            default_retries=self.default_retries,
            max_retries=self.max_retries,
            default_storage=self.default_storage,
            max_storage_gi=self.max_storage_gi,
            default_max_tokens=self.default_max_tokens or None,
            max_max_tokens=self.max_max_tokens,
        )

    @property
    def agent_resources(self) -> Resources:
        return Resources(*(getattr(self, f"agent_{part}") for part in _RESOURCE_PARTS))

    @property
    def sidecar_resources(self) -> Resources:
        return Resources(*(getattr(self, f"sidecar_{part}") for part in _RESOURCE_PARTS))

    def nats_issuer(self) -> "Issuer | None":
        """What mints each task's NATS users, when `nats_account` and `nats_signing_key_file` are set.
        Raises SettingsError naming the variable when the key cannot sign."""
        if not self.nats_signing_key_file:
            return None
        from functions.core.nats_jwt import CredentialsSetupError, Issuer

        try:
            return Issuer.load(self.nats_account, self.nats_signing_key_file)
        except CredentialsSetupError as exc:
            var = type(self).variable("nats_signing_key_file")
            raise SettingsError(f"{var}: {exc}", var) from None

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable of field `name`."""
        alias = cls.model_fields[name].validation_alias
        return alias if isinstance(alias, str) else contract.ENV_PREFIX + name.upper()

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field name -> environment variable, for every setting."""
        return {name: cls.variable(name) for name in cls.model_fields}

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.model_fields[name].default

    def describe(self) -> str:
        """One `name = value` line per setting, URL passwords and the CLI's token masked (no other secret is a setting)."""
        lines = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if field.json_schema_extra["url"] and value:
                value = mask_url(value)
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif name == "token" and value:  # the CLI's API token: the one secret that is a setting
                value = "***"
            lines.append(f"{name} = {value}")
        return "\n".join(lines)


# --- the README's configuration table ------------------------------------------------------
TABLE_BEGIN = "<!-- settings:begin (generated by `python -m functions.core.settings --markdown`) -->"
TABLE_END = "<!-- settings:end -->"


def markdown_table() -> str:
    """The configuration table of the README, between its markers."""
    rows = [TABLE_BEGIN, "| variable | default | used by | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra
        default = field.default
        if extra["shown"]:
            shown = extra["shown"]
        elif default in ("", ()):
            shown = "none"
        else:
            shown = f"`{','.join(default) if isinstance(default, tuple) else default}`"
        rows.append(f"| `{Settings.variable(name)}` | {shown} | {extra['used_by']} | {field.description} |")
    rows.append(TABLE_END)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """`python -m functions.core.settings`: the settings from the environment, or `--markdown`: the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--markdown"]:
        print(markdown_table())
        return 0
    if argv:
        print("usage: python -m functions.core.settings [--markdown]", file=sys.stderr)
        return 2
    try:
        print(Settings.from_env().describe())
    except SettingsError as exc:
        print(f"settings: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
