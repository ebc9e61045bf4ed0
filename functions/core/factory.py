"""Task + settings in, Kubernetes manifests out: the Job `agent-<id>`, its PVC `workspace-<id>` and,
when the launcher mints NATS credentials, its Secret `agent-<id>`.

The Job's settings (image, namespace, resources, proxy, ...) are fields of
`functions.core.settings.Settings`, the one model of every `DOCKYARD_*` variable.

Invariants
- Pure: no I/O, no cluster, no clock. The same task and settings give the same dicts,
  so the manifests can be printed (`dockyard manifests job`), validated and tested offline.
- The pod meets the Pod Security Standard "restricted": non-root UID 1000, no privilege
  escalation, every capability dropped, seccomp RuntimeDefault, read-only root filesystem;
  the only writable places are the workspace PVC and the emptyDirs `/home/agent` and `/tmp`.
- A secret is mounted only into the container that needs it (object-store credentials into
  restore and snapshotter, the model key into the `gateway` sidecar only), as files, never as env.
  The agent container mounts no model secret: it reaches the model through the gateway on the
  pod's loopback (`DOCKYARD_MODEL_GATEWAY`), which adds the key, counts the task's tokens and
  refuses calls past `limits.max_tokens` / `limits.max_cost_usd`.
- The PVC is created after the Job and owned by it (the Job's UID), so deleting the Job
  (propagation Background) or its TTL removes the workspace too.
- NATS credentials: with an account signing key in the settings (`nats_account`,
  `nats_signing_key_file`), each task's agent and snapshotter get their own NATS user
  (functions.core.nats_jwt.task_permissions: the task's own subjects only). The launcher
  mints them and puts them in the Secret `agent-<id>` (`render_nats_secret`), owned by the
  Job like the PVC; each container mounts only its own key of it and gets `--nats-creds`:
  `snapshotter.creds` the snapshotter, `gateway.creds` the gateway, and `agent.creds` the
  `nats-leaf` sidecar, never the agent container. Restore never talks to NATS and gets none.
  Without a signing key: no Secret, no flag, no leaf (the agent connects to `nats_url` itself).
- The agent container mounts no secret at all. With minted credentials it reaches NATS through
  the native sidecar `nats-leaf`: a nats-server in leaf-node mode on the pod's loopback (no
  local auth, no JetStream) whose one remote is the cluster's leafnode port
  (`nats_leaf_url`), authenticated as the task's agent user. The hub applies that user's
  permissions to everything crossing the leaf connection, so a command in the pod can act as
  its own task while the pod lives, but can never carry the credentials away.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Mapping
from urllib.parse import urlsplit

from agent import contract
from functions.core.probes import heartbeat_probe_command, sigterm_handled_probe_command
from functions.core.nats_leaf import (  # noqa: F401  (the leaf's names, as the Job's readers know them)
    NATS_LEAF_CONF_ENV,
    NATS_LEAF_MONITOR_PORT,
    NATS_LEAF_PORT,
    NATS_LEAF_URL,
    leaf_launch_command,
    leaf_probe_command,
    render_leaf_conf,
)
from functions.core import git_push
from functions.core.settings import Resources, Settings
from functions.core.task import Task, restore_parent_args

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
AGENT_USER = 1000  # the agent image's user and group

# Container names; the podFailurePolicy and `kubectl logs` refer to them.
CONTAINER_RESTORE = "restore"
CONTAINER_SNAPSHOTTER = "snapshotter"
CONTAINER_AGENT = "agent"
CONTAINER_GATEWAY = "gateway"
CONTAINER_NATS_LEAF = "nats-leaf"
# The NATS users of a task (the roles of nats_jwt.TASK_ROLES); restore has none. The agent's user is
# mounted into the `nats-leaf` sidecar, which connects as it on the agent's behalf.
NATS_ROLES = (CONTAINER_AGENT, CONTAINER_SNAPSHOTTER, CONTAINER_GATEWAY)

# Where the secrets are mounted: agent/storage.py reads <secrets>/s3/*, the gateway <secrets>/model/*.
S3_SECRETS_DIR = f"{contract.SECRETS_DIR}/s3"
MODEL_SECRETS_DIR = f"{contract.SECRETS_DIR}/model"
# <secrets>/nats/<role>.creds: inside the secrets dir, so the agent's redactor knows the values.
NATS_SECRETS_DIR = f"{contract.SECRETS_DIR}/nats"
NATS_CREDS_PLACEHOLDER = "minted at launch: a user JWT and nkey seed allowed only this task's subjects"
TASK_DIR = os.path.dirname(contract.TASK_FILE)
GATEWAY_URL = f"http://127.0.0.1:{contract.MODEL_GATEWAY_PORT}"


# --- rendering -------------------------------------------------------------------


def render(task: Task, settings: Settings, job_uid: str = PLACEHOLDER_UID, creds: Mapping[str, str] | None = None) -> list[dict]:
    """The Job, its NATS Secret (when the settings mint credentials) and its PVC, in the order they are
    created. Without `creds` the Secret holds placeholders (the launcher mints real ones)."""
    manifests = [render_job(task, settings)]
    if mints_nats_credentials(settings):
        placeholders = {role: NATS_CREDS_PLACEHOLDER for role in NATS_ROLES}
        manifests.append(render_nats_secret(task, settings, job_uid, creds if creds is not None else placeholders))
    return [*manifests, render_pvc(task, settings, job_uid)]


def mints_nats_credentials(settings: Settings) -> bool:
    """Whether each task gets its own NATS users: the settings name an account signing key
    (Settings checks that the account comes with it)."""
    return bool(settings.nats_signing_key_file)


def nats_secret_name(task_id: str) -> str:
    """The Secret with a task's NATS credentials: named after its Job."""
    return contract.job_name(task_id)


def nats_creds_key(role: str) -> str:
    return f"{role}.creds"


def nats_creds_path(role: str) -> str:
    """Where container `role` finds its own credentials."""
    return f"{NATS_SECRETS_DIR}/{nats_creds_key(role)}"


def render_job(task: Task, settings: Settings) -> dict:
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


def render_pvc(task: Task, settings: Settings, job_uid: str) -> dict:
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
        "metadata": _owned_metadata(contract.pvc_name(task.task_id), task, settings, job_uid),
        "spec": spec,
    }


def render_nats_secret(task: Task, settings: Settings, job_uid: str, creds: Mapping[str, str]) -> dict:
    """The Secret `agent-<id>` with the task's NATS credentials, owned by the Job whose UID is `job_uid`.
    `creds`: role -> `.creds` file text, one for each of NATS_ROLES. Immutable: minted once, never changed."""
    missing = [role for role in NATS_ROLES if not creds.get(role)]
    unknown = sorted(set(creds) - set(NATS_ROLES))
    if missing or unknown:
        raise ValueError(f"creds: need exactly the roles {', '.join(NATS_ROLES)} (missing {missing}, unknown {unknown})")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _owned_metadata(nats_secret_name(task.task_id), task, settings, job_uid),
        "type": "Opaque",
        "immutable": True,
        "data": {nats_creds_key(role): base64.b64encode(creds[role].encode()).decode() for role in NATS_ROLES},
    }


def _owned_metadata(name: str, task: Task, settings: Settings, job_uid: str) -> dict:
    """Metadata of an object the Job owns: garbage-collected with it."""
    return {
        "name": name,
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
    }


def _pod_spec(task: Task, settings: Settings) -> dict:
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
        *git_push.volumes(task, settings),  # repo.push: the git Secret, for the snapshotter only
    ]
    if mints_nats_credentials(settings):
        # One volume per role, each projecting only that role's key: a container sees its own user only.
        # Not optional: the kubelet retries the mount until the launcher has created the Secret.
        volumes += [
            {
                "name": _nats_volume(role),
                "secret": {
                    "secretName": nats_secret_name(task.task_id),
                    "defaultMode": 0o440,  # root:1000 through the pod's fsGroup, like the other secrets
                    "items": [{"key": nats_creds_key(role), "path": nats_creds_key(role)}],
                },
            }
            for role in NATS_ROLES
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
        "initContainers": [_restore(task, settings), _snapshotter(task, settings), _gateway(task, settings),
                           *([_nats_leaf(task, settings)] if mints_nats_credentials(settings) else [])],
        "containers": [_agent(task, settings)],
        "volumes": volumes,
    }


def _container(name: str, settings: Settings, args: list[str], env: list[dict], mounts: list[dict], resources: Resources) -> dict:
    return {
        "name": name,
        "image": settings.agent_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "agent"],
        "args": args,
        "env": env,
        "volumeMounts": mounts,
        "resources": {
            "requests": {"cpu": resources.cpu_request, "memory": resources.memory_request},
            "limits": {"cpu": resources.cpu_limit, "memory": resources.memory_limit},
        },
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


def _store_env(task: Task, settings: Settings) -> dict[str, str]:
    env = {**_base_env(task), "DOCKYARD_STORE": settings.store}
    if settings.s3_endpoint:
        env["DOCKYARD_S3_ENDPOINT"] = settings.s3_endpoint
    return env


def _mount(volume: str, path: str, read_only: bool = False) -> dict:
    return {"name": volume, "mountPath": path, **({"readOnly": True} if read_only else {})}


def _nats_volume(role: str) -> str:
    return f"nats-{role}"


def _nats_args(settings: Settings, role: str) -> list[str]:
    """`--nats URL`, and `--nats-creds FILE` when the task has its own users."""
    args = ["--nats", settings.nats_url]
    if mints_nats_credentials(settings):
        args += ["--nats-creds", nats_creds_path(role)]
    return args


def _nats_mounts(settings: Settings, role: str) -> list[dict]:
    return [_mount(_nats_volume(role), NATS_SECRETS_DIR, True)] if mints_nats_credentials(settings) else []


def _store_mounts() -> list[dict]:
    """What restore and snapshotter see: the workspace, /tmp and the object-store credentials."""
    return [_mount("workspace", contract.WORKSPACE_MOUNT), _mount("tmp", "/tmp"), _mount("s3-credentials", S3_SECRETS_DIR, True)]


def _restore(task: Task, settings: Settings) -> dict:
    args = ["restore", "--task-id", task.task_id, "--workspace", contract.WORKSPACE_MOUNT, "--store", settings.store]
    args += restore_parent_args(task, contract.TASK_FILE)  # a fork: the parent's workspace, and the task file for its prompt
    mounts = _store_mounts() + ([_mount("task", TASK_DIR, True)] if task.restores_parent else [])
    return _container(CONTAINER_RESTORE, settings, args, _env(**_store_env(task, settings)), mounts, settings.sidecar_resources)


def _snapshotter(task: Task, settings: Settings) -> dict:
    args = [
        "snapshotter",
        "--task-id", task.task_id,
        "--workspace", contract.WORKSPACE_MOUNT,
        "--store", settings.store,
        *_nats_args(settings, CONTAINER_SNAPSHOTTER),
        "--interval", str(settings.snapshot_interval_seconds),
    ]  # fmt: skip
    env = _env(**_store_env(task, settings))
    mounts = _store_mounts() + _nats_mounts(settings, CONTAINER_SNAPSHOTTER) + git_push.snapshotter_mounts(task)
    container = _container(CONTAINER_SNAPSHOTTER, settings, args + git_push.snapshotter_args(task, settings), env, mounts, settings.sidecar_resources)
    # A native sidecar: starts before the agent, runs beside it, and is stopped only after the
    # agent has exited, so its final upload sees the final workspace.
    container["restartPolicy"] = "Always"
    # The agent starts once the snapshotter handles SIGTERM: an agent that ended sooner would have it
    # stopped before it could take the final snapshot (as PID 1 it would even ignore the SIGTERM).
    container["startupProbe"] = {"exec": {"command": sigterm_handled_probe_command()}, "periodSeconds": 1,
                                 "failureThreshold": 120, "timeoutSeconds": 3}
    return container


def _agent(task: Task, settings: Settings) -> dict:
    # With minted credentials: the leaf on loopback, no credentials (the leaf holds them).
    nats = ["--nats", NATS_LEAF_URL] if mints_nats_credentials(settings) else ["--nats", settings.nats_url]
    args = [
        "run",
        "--task-id", task.task_id,
        "--workspace", contract.WORKSPACE_MOUNT,
        "--task-file", contract.TASK_FILE,
        *nats,
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
        "DOCKYARD_MODEL_GATEWAY": GATEWAY_URL,
        **_proxy_env(settings),
    }
    mounts = [
        _mount("workspace", contract.WORKSPACE_MOUNT),
        _mount("home", contract.HOME_DIR),
        _mount("tmp", "/tmp"),
        _mount("task", TASK_DIR, True),
    ]
    container = _container(CONTAINER_AGENT, settings, args, _env(**env), mounts, settings.agent_resources)
    container["livenessProbe"] = {"exec": {"command": heartbeat_probe_command(settings.heartbeat_stale_seconds)},
                                  **AGENT_LIVENESS_TIMING}
    return container


AGENT_LIVENESS_TIMING = {
    # The first checks may still see the last pod's heartbeat on the PVC: a restarted agent
    # has initialDelay + 2 periods to write a fresh one.
    "initialDelaySeconds": 30,
    "periodSeconds": 30,
    "timeoutSeconds": 10,
    "failureThreshold": 3,
    # A hung agent gets no step to finish: stop it without the pod's long grace period.
    "terminationGracePeriodSeconds": 30,
}


def _proxy_env(settings: Settings) -> dict[str, str]:
    """HTTP(S)_PROXY to the egress proxy, and NO_PROXY (the gateway's loopback among it)."""
    if not settings.egress_proxy:
        return {}
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = settings.egress_proxy
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy_hosts(settings))
    return env


def _gateway(task: Task, settings: Settings) -> dict:
    """The model gateway, a native sidecar: the only container that mounts the model Secret. It serves the
    providers' APIs on the pod's loopback, to the agent only (no Service, no port), and reaches the provider
    through the egress proxy. It publishes usage events as its own NATS user (the task's own subjects)."""
    args = [
        "--listen", f"127.0.0.1:{contract.MODEL_GATEWAY_PORT}",
        "--secrets-dir", MODEL_SECRETS_DIR,
        "--task-id", task.task_id,
        "--nats", settings.nats_url,
    ]  # fmt: skip
    if mints_nats_credentials(settings):
        args += ["--nats-creds", nats_creds_path(CONTAINER_GATEWAY)]
    if task.limits.max_tokens is not None:
        args += ["--max-tokens", str(task.limits.max_tokens)]
    if task.limits.max_cost_usd is not None:
        args += ["--max-cost-usd", repr(task.limits.max_cost_usd)]
    if settings.model_prices:
        args += ["--prices", settings.model_prices]
    env = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **_proxy_env(settings)}
    mounts = [_mount("model-credentials", MODEL_SECRETS_DIR, True), *_nats_mounts(settings, CONTAINER_GATEWAY)]
    container = _container(CONTAINER_GATEWAY, settings, args, _env(**env), mounts, settings.sidecar_resources)
    container["command"] = ["python", "-m", "gateway"]
    container["restartPolicy"] = "Always"  # a native sidecar: up before the agent starts, stopped after it
    # The agent starts once this passes: its first model call finds the gateway listening.
    url = f"{GATEWAY_URL}/healthz"
    container["startupProbe"] = {
        "exec": {"command": ["python", "-I", "-S", "-c", f"import urllib.request as u; u.urlopen({url!r}, timeout=2)"]},
        "periodSeconds": 1,
        "failureThreshold": 60,
        "timeoutSeconds": 3,
    }
    return container


def _nats_leaf(task: Task, settings: Settings) -> dict:
    """The agent's NATS: a nats-server leaf node, a native sidecar, the only container that mounts `agent.creds`.
    The agent connects to it on loopback without credentials; everything it sends or receives crosses the leaf
    connection, which the cluster's server checks against the task's agent user (its own subjects only)."""
    conf = render_leaf_conf(settings.nats_leaf_url, nats_creds_path(CONTAINER_AGENT))
    env = {NATS_LEAF_CONF_ENV: conf, "HOME": "/tmp"}
    mounts = _nats_mounts(settings, CONTAINER_AGENT)
    container = _container(CONTAINER_NATS_LEAF, settings, [], _env(**env), mounts, settings.sidecar_resources)
    container["command"] = leaf_launch_command()
    del container["args"]
    container["restartPolicy"] = "Always"  # a native sidecar: up before the agent starts, stopped after it
    # The agent starts once the leaf is connected to the cluster: its first events find the stream's interest.
    container["startupProbe"] = {
        "exec": {"command": leaf_probe_command()},
        "periodSeconds": 1,
        "failureThreshold": 120,
        "timeoutSeconds": 3,
    }
    return container


def no_proxy_hosts(settings: Settings) -> list[str]:
    """NO_PROXY: the configured entries plus the NATS and object-store hosts and the gateway's loopback, without duplicates."""
    hosts = list(settings.no_proxy)
    if "127.0.0.1" not in hosts:
        hosts.append("127.0.0.1")
    for url in (settings.nats_url, settings.s3_endpoint):
        host = urlsplit(url).hostname if url else None
        if host and host not in hosts:
            hosts.append(host)
    return hosts
