"""Task + settings in, Kubernetes manifests out: the Job `agent-<id>` and its PVC `workspace-<id>`.

Invariants
- Pure: no I/O, no cluster, no clock. The same task and settings give the same dicts,
  so the manifests can be printed (`dockyard manifests job`), validated and tested offline.
- The pod meets the Pod Security Standard "restricted": non-root UID 1000, no privilege
  escalation, every capability dropped, seccomp RuntimeDefault, read-only root filesystem;
  the only writable places are the workspace PVC and the emptyDirs `/home/agent` and `/tmp`.
- A secret is mounted only into the container that needs it (object-store credentials into
  restore and snapshotter, the model key into the agent), as files, never as env.
- The PVC is created after the Job and owned by it (the Job's UID), so deleting the Job
  (propagation Background) or its TTL removes the workspace too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping
from urllib.parse import urlsplit

from agent import contract
from functions.core.settings import mask_url
from functions.errors import SettingsError
from functions.core.task import Task

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
AGENT_USER = 1000  # the agent image's user and group

# The agent image's PATH (python:3.x-slim); /home/agent/.local/bin goes in front so that
# `pip install --user` works on a read-only root. An env PATH replaces the image's, hence the copy.
DEFAULT_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Container names; the podFailurePolicy and `kubectl logs` refer to them.
CONTAINER_RESTORE = "restore"
CONTAINER_SNAPSHOTTER = "snapshotter"
CONTAINER_AGENT = "agent"

# Where the secrets are mounted: agent/storage.py reads <secrets>/s3/*, agent/models.py <secrets>/model/*.
S3_SECRETS_DIR = f"{contract.SECRETS_DIR}/s3"
MODEL_SECRETS_DIR = f"{contract.SECRETS_DIR}/model"
TASK_DIR = os.path.dirname(contract.TASK_FILE)


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one container."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str

    def render(self) -> dict:
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


@dataclass(frozen=True)
class JobSettings:
    """How a task becomes a Job. Every field has a `DOCKYARD_*` variable (see `ENV`)."""

    agent_image: str = "dev.local/dockyard-agent:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    image_path: str = DEFAULT_IMAGE_PATH
    namespace: str = contract.AGENTS_NAMESPACE
    service_account: str = "dockyard-agent"
    nats_url: str = "nats://nats.nats.svc.cluster.local:4222"
    store_url: str = "s3://dockyard/tasks"
    s3_endpoint: str = ""  # empty: the endpoint comes from the secret file s3/endpoint
    egress_proxy: str = "http://egress-proxy.dockyard.svc.cluster.local:3128"  # empty: no proxy
    no_proxy: tuple[str, ...] = (".svc", ".cluster.local", "localhost", "127.0.0.1")  # + NATS and store hosts
    storage_class: str = "local-path"  # empty: the cluster's default StorageClass
    ttl_seconds_after_finished: int = 24 * 3600
    termination_grace_seconds: int = 300  # SIGTERM lets the agent finish its step, then the final snapshot
    heartbeat_stale_seconds: int = 180  # the liveness probe fails when the heartbeat is older
    snapshot_interval_seconds: int = 300  # periodic snapshots by the snapshotter; 0 = on request only
    agent_resources: Resources = field(default_factory=lambda: Resources("500m", "1Gi", "2", "4Gi"))
    sidecar_resources: Resources = field(default_factory=lambda: Resources("50m", "128Mi", "1", "512Mi"))
    home_size_limit: str = "2Gi"
    tmp_size_limit: str = "1Gi"
    object_store_secret: str = "dockyard-object-store"
    model_secret: str = "dockyard-model"
    kueue_queue: str = ""  # non-empty: the Job is created suspended, for Kueue to admit
    default_model: str = ""  # used when a task names no model

    def __post_init__(self):
        if self.image_pull_policy not in PULL_POLICIES:
            raise SettingsError(f"image_pull_policy {self.image_pull_policy!r}: use one of {', '.join(PULL_POLICIES)}")
        for name in ("agent_image", "namespace", "service_account", "nats_url", "store_url", "object_store_secret", "model_secret"):
            if not getattr(self, name):
                raise SettingsError(f"{name} ({ENV[name]}) must not be empty")
        for name in ("ttl_seconds_after_finished", "termination_grace_seconds", "heartbeat_stale_seconds", "snapshot_interval_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"{name} ({ENV[name]}) must be a whole number >= 0, got {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "JobSettings":
        """The settings from `DOCKYARD_*` variables. Unset keeps the default; so does empty, except
        where empty means "none" (S3 endpoint, egress proxy, NO_PROXY, storage class, Kueue queue, model)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = env.get(var)
            if raw is not None and (raw.strip() or name in _MAY_BE_EMPTY):
                values[name] = raw.strip()
        for group in ("agent", "sidecar"):
            prefix = f"{contract.ENV_PREFIX}{group.upper()}_"
            parts = {part: env[prefix + part.upper()].strip() for part in _RESOURCE_PARTS if env.get(prefix + part.upper(), "").strip()}
            if parts:
                values[f"{group}_resources"] = parts
        return cls().updated(values, source="environment")

    def updated(self, values: Mapping[str, Any], source: str = "settings") -> "JobSettings":
        """A copy with `values` (field name -> value, as from YAML or the environment) applied."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise SettingsError(f"{source}: unknown Job setting {name!r}; known: {', '.join(sorted(known))}")
            changes[name] = _convert(name, value, getattr(self, name), source)
        return replace(self, **changes)

    def describe(self) -> str:
        """One `name = value` line per setting; URL passwords masked (secrets are referenced by name)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            lines.append(f"{f.name} = {mask_url(value) if f.name in _URLS and value else value}")
        return "\n".join(lines)


_URLS = ("nats_url", "store_url", "s3_endpoint", "egress_proxy")
_RESOURCE_PARTS = ("cpu_request", "memory_request", "cpu_limit", "memory_limit")
_MAY_BE_EMPTY = ("s3_endpoint", "egress_proxy", "storage_class", "kueue_queue", "default_model", "no_proxy")

# Field -> environment variable. The two Resources fields are read part by part from
# DOCKYARD_{AGENT,SIDECAR}_{CPU,MEMORY}_{REQUEST,LIMIT}, e.g. DOCKYARD_AGENT_MEMORY_LIMIT=8Gi.
ENV = {
    "agent_image": "DOCKYARD_AGENT_IMAGE",
    "image_pull_policy": "DOCKYARD_IMAGE_PULL_POLICY",
    "image_path": "DOCKYARD_AGENT_IMAGE_PATH",
    "namespace": "DOCKYARD_AGENTS_NAMESPACE",
    "service_account": "DOCKYARD_AGENT_SERVICE_ACCOUNT",
    "nats_url": "DOCKYARD_NATS_URL",
    "store_url": "DOCKYARD_STORE",
    "s3_endpoint": "DOCKYARD_S3_ENDPOINT",
    "egress_proxy": "DOCKYARD_EGRESS_PROXY",
    "no_proxy": "DOCKYARD_NO_PROXY",
    "storage_class": "DOCKYARD_STORAGE_CLASS",
    "ttl_seconds_after_finished": "DOCKYARD_JOB_TTL_SECONDS",
    "termination_grace_seconds": "DOCKYARD_TERMINATION_GRACE_SECONDS",
    "heartbeat_stale_seconds": "DOCKYARD_HEARTBEAT_STALE_SECONDS",
    "snapshot_interval_seconds": "DOCKYARD_SNAPSHOT_INTERVAL",
    "home_size_limit": "DOCKYARD_HOME_SIZE_LIMIT",
    "tmp_size_limit": "DOCKYARD_TMP_SIZE_LIMIT",
    "object_store_secret": "DOCKYARD_OBJECT_STORE_SECRET",
    "model_secret": "DOCKYARD_MODEL_SECRET",
    "kueue_queue": "DOCKYARD_KUEUE_QUEUE",
    "default_model": "DOCKYARD_DEFAULT_MODEL",
}


def _convert(name: str, value: Any, current: Any, source: str) -> Any:
    """`value` in the type of the field (whose current value is `current`)."""
    if isinstance(current, Resources):
        if not isinstance(value, Mapping) or not set(value) <= set(_RESOURCE_PARTS):
            raise SettingsError(f"{source}: {name} must be a mapping with keys among {', '.join(_RESOURCE_PARTS)}")
        return replace(current, **{k: str(v) for k, v in value.items()})
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise SettingsError(f"{source}: {name} must be a list or a comma-separated string")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if isinstance(current, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{source}: {name} ({ENV[name]}) must be a whole number, got {value!r}") from None
    if not isinstance(value, (str, int, float)):
        raise SettingsError(f"{source}: {name} must be a string, got {value!r}")
    return str(value)


# --- rendering -------------------------------------------------------------------


def render(task: Task, settings: JobSettings, job_uid: str = PLACEHOLDER_UID) -> list[dict]:
    """The Job and its PVC, in the order they are created."""
    return [render_job(task, settings), render_pvc(task, settings, job_uid)]


def render_job(task: Task, settings: JobSettings) -> dict:
    """The Job `agent-<id>`."""
    labels = contract.agent_labels(task.task_id)
    job_labels = dict(labels)
    if settings.kueue_queue:
        job_labels[contract.KUEUE_QUEUE_LABEL] = settings.kueue_queue
    annotations = {contract.ANNOTATION_TASK: task.to_json()}
    spec: dict[str, Any] = {
        "backoffLimit": task.limits.retries,
        "activeDeadlineSeconds": task.limits.deadline_seconds,
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "podFailurePolicy": {
            "rules": [
                # Fatal configuration and cancellation: retrying cannot help.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_AGENT,
                        "operator": "In",
                        "values": list(contract.NO_RETRY_EXIT_CODES),
                    },
                },
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER_RESTORE, "operator": "In", "values": [contract.EXIT_FATAL]},
                },
                # Evictions, preemption, node drains: not the task's fault, not counted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": dict(labels),
                # The downward API reads the pod's annotations, so the task goes on the pod too.
                "annotations": {**annotations, "kubectl.kubernetes.io/default-container": CONTAINER_AGENT},
            },
            "spec": _pod_spec(task, settings),
        },
    }
    if settings.kueue_queue:
        spec["suspend"] = True  # Kueue unsuspends the Job once it admits it
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": contract.job_name(task.task_id),
            "namespace": settings.namespace,
            "labels": job_labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


def render_pvc(task: Task, settings: JobSettings, job_uid: str) -> dict:
    """The workspace `workspace-<id>`, owned by the Job whose UID is `job_uid`."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": task.limits.storage}},
    }
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": contract.pvc_name(task.task_id),
            "namespace": settings.namespace,
            "labels": contract.agent_labels(task.task_id),
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": contract.job_name(task.task_id),
                    "uid": job_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def _pod_spec(task: Task, settings: JobSettings) -> dict:
    volumes = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": contract.pvc_name(task.task_id)}},
        {"name": "home", "emptyDir": {"sizeLimit": settings.home_size_limit}},
        {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}},
        {
            "name": "task",
            "downwardAPI": {
                "items": [
                    {
                        "path": os.path.basename(contract.TASK_FILE),
                        "fieldRef": {"fieldPath": f"metadata.annotations['{contract.ANNOTATION_TASK}']"},
                    }
                ]
            },
        },
        {"name": "s3-credentials", "secret": {"secretName": settings.object_store_secret, "defaultMode": 0o440}},
        # Optional: a scripted model or a keyless local endpoint needs no secret.
        {"name": "model-credentials", "secret": {"secretName": settings.model_secret, "defaultMode": 0o440, "optional": True}},
    ]
    return {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": AGENT_USER,
            "runAsGroup": AGENT_USER,
            "fsGroup": AGENT_USER,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [_restore(task, settings), _snapshotter(task, settings)],
        "containers": [_agent(task, settings)],
        "volumes": volumes,
    }


def _container(name: str, settings: JobSettings, args: list[str], env: list[dict], mounts: list[dict], resources: Resources) -> dict:
    return {
        "name": name,
        "image": settings.agent_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "agent"],
        "args": args,
        "env": env,
        "volumeMounts": mounts,
        "resources": resources.render(),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _env(**values: str) -> list[dict]:
    return [{"name": name, "value": value} for name, value in values.items()]


def _base_env(task: Task) -> dict[str, str]:
    return {
        "DOCKYARD_TASK_ID": task.task_id,
        "DOCKYARD_WORKSPACE": contract.WORKSPACE_MOUNT,
        "HOME": contract.HOME_DIR,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the root filesystem is read-only
    }


def _store_env(task: Task, settings: JobSettings) -> dict[str, str]:
    env = {**_base_env(task), "DOCKYARD_STORE": settings.store_url}
    if settings.s3_endpoint:
        env["DOCKYARD_S3_ENDPOINT"] = settings.s3_endpoint
    return env


def _mount(volume: str, path: str, read_only: bool = False) -> dict:
    return {"name": volume, "mountPath": path, **({"readOnly": True} if read_only else {})}


def _store_mounts() -> list[dict]:
    """What restore and snapshotter see: the workspace, /tmp and the object-store credentials."""
    return [_mount("workspace", contract.WORKSPACE_MOUNT), _mount("tmp", "/tmp"), _mount("s3-credentials", S3_SECRETS_DIR, True)]


def _restore(task: Task, settings: JobSettings) -> dict:
    args = ["restore", "--task-id", task.task_id, "--workspace", contract.WORKSPACE_MOUNT, "--store", settings.store_url]
    return _container(CONTAINER_RESTORE, settings, args, _env(**_store_env(task, settings)), _store_mounts(), settings.sidecar_resources)


def _snapshotter(task: Task, settings: JobSettings) -> dict:
    args = [
        "snapshotter",
        "--task-id", task.task_id,
        "--workspace", contract.WORKSPACE_MOUNT,
        "--store", settings.store_url,
        "--nats", settings.nats_url,
        "--interval", str(settings.snapshot_interval_seconds),
    ]  # fmt: skip
    env = _env(**_store_env(task, settings))
    container = _container(CONTAINER_SNAPSHOTTER, settings, args, env, _store_mounts(), settings.sidecar_resources)
    # A native sidecar: starts before the agent, runs beside it, and is stopped only after the
    # agent has exited, so its final upload sees the final workspace.
    container["restartPolicy"] = "Always"
    return container


def _agent(task: Task, settings: JobSettings) -> dict:
    args = [
        "run",
        "--task-id", task.task_id,
        "--workspace", contract.WORKSPACE_MOUNT,
        "--task-file", contract.TASK_FILE,
        "--nats", settings.nats_url,
        "--home", contract.HOME_DIR,
        "--secrets-dir", contract.SECRETS_DIR,
    ]  # fmt: skip
    if not task.model and settings.default_model:
        args += ["--model", settings.default_model]
    env = {
        **_base_env(task),
        "DOCKYARD_TASK_FILE": contract.TASK_FILE,
        "DOCKYARD_HOME_DIR": contract.HOME_DIR,
        "PYTHONUSERBASE": contract.PYTHONUSERBASE,
        "PATH": f"{contract.PYTHONUSERBASE}/bin:{settings.image_path}",
    }
    if settings.egress_proxy:
        no_proxy = ",".join(no_proxy_hosts(settings))
        for name in ("HTTP_PROXY", "HTTPS_PROXY"):
            env[name] = env[name.lower()] = settings.egress_proxy
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
    mounts = [
        _mount("workspace", contract.WORKSPACE_MOUNT),
        _mount("home", contract.HOME_DIR),
        _mount("tmp", "/tmp"),
        _mount("task", TASK_DIR, True),
        _mount("model-credentials", MODEL_SECRETS_DIR, True),
    ]
    container = _container(CONTAINER_AGENT, settings, args, _env(**env), mounts, settings.agent_resources)
    container["livenessProbe"] = {
        "exec": {"command": heartbeat_probe_command(settings.heartbeat_stale_seconds)},
        # The first checks may still see the last pod's heartbeat on the PVC: a restarted agent
        # has initialDelay + 2 periods to write a fresh one.
        "initialDelaySeconds": 30,
        "periodSeconds": 30,
        "timeoutSeconds": 10,
        "failureThreshold": 3,
        # A hung agent gets no step to finish: stop it without the pod's long grace period.
        "terminationGracePeriodSeconds": 30,
    }
    return container


def heartbeat_probe_command(stale_seconds: int) -> list[str]:
    """Fails when the heartbeat file is older than `stale_seconds`. No file yet (the agent has not
    reached its loop) passes. Python is the one tool the agent image surely has; -I -S keep it fast."""
    path = f"{contract.WORKSPACE_MOUNT}/{contract.HEARTBEAT_FILE}"
    code = (
        f"import os,sys,time; p={path!r}; "
        f"sys.exit(0 if not os.path.exists(p) or time.time()-os.path.getmtime(p)<{stale_seconds} else 1)"
    )
    return ["python", "-I", "-S", "-c", code]


def no_proxy_hosts(settings: JobSettings) -> list[str]:
    """NO_PROXY: the configured entries plus the NATS and object-store hosts, without duplicates."""
    hosts = list(settings.no_proxy)
    for url in (settings.nats_url, settings.s3_endpoint):
        host = urlsplit(url).hostname if url else None
        if host and host not in hosts:
            hosts.append(host)
    return hosts
