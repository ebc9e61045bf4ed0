"""The rendered Job, as podman arguments: `plan()` is the one place a Kubernetes object becomes a podman pod.

Invariants
- Everything a container gets (image, command, args, env, mounts, securityContext, memory and CPU
  limits, probes) is read from the Job that `functions.core.factory.render` made for the cluster;
  nothing is described a second time here. A change in the factory reaches the podman pod.
- Pure: no podman, no files. The runtime (pod.py) writes `PodPlan.files` and runs the arguments.
- What podman cannot express is listed in `GAPS` (docs/DESIGN.md, "Podman runtime", prints it) and
  otherwise refused: a Job feature this function does not know raises `Untranslatable`, naming it.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal

from functions.runtime.local.pod import JobSpec

# What the podman pod does not do as the cluster's pod does (and why that is acceptable under `dockyard dev`).
GAPS = (
    "NetworkPolicy: none. The pod's network is slirp4netns with the host's loopback as the podman host address; "
    "any address the host reaches is reachable (the egress proxy is used by the agent's tools through the proxy variables only).",
    "Resource requests: ignored (no scheduler); limits are enforced (`--memory`, `--cpus`).",
    "emptyDir: a tmpfs per container (size from sizeLimit, mode 1777), not one shared by the pod's containers "
    "(ours share nothing through an emptyDir).",
    "fsGroup: Secret files are written root:<fsGroup> with the Secret's defaultMode, the workspace volume is "
    "chowned to runAsUser:fsGroup once; fsGroupChangePolicy has nothing to do.",
    "seccompProfile RuntimeDefault: podman's default seccomp profile (close to containerd's RuntimeDefault).",
    "Downward API: the annotation is written as a file at launch; it never changes afterwards (nor does it in the cluster).",
    "Startup probes: `podman exec` of the probe's command every periodSeconds, up to failureThreshold times.",
    "Liveness probe: `podman exec` of its command every periodSeconds after initialDelaySeconds; after "
    "failureThreshold failures the container is stopped with the probe's terminationGracePeriodSeconds.",
    "serviceAccountName, automountServiceAccountToken, enableServiceLinks: nothing to mount, no API server.",
    "OOMKilled: podman's State.OOMKilled, or, where conmon misses it (cgroup v1), the kernel's OOM notification "
    "on the container's memory cgroup (cgroup.event_control).",
    "imagePullPolicy: IfNotPresent is `--pull missing`; images come from the local store (scripts/build-images).",
    "Native sidecars (restartPolicy Always) are not restarted when they exit during an attempt; the attempt goes on without them.",
    "ttlSecondsAfterFinished: the pod and the workspace volume go with the local runtime's TTL janitor "
    "(DOCKYARD_TTL_SUCCEEDED_SECONDS / DOCKYARD_TTL_FAILED_SECONDS, once the final snapshot is stored).",
    "podFailurePolicy onPodConditions (DisruptionTarget: Ignore): nothing evicts a podman pod; only the FailJob exit-code rules apply.",
    "suspend and the Kueue label: the local runtime's admission queue (DOCKYARD_MAX_RUNNING) holds the task instead.",
)

MANAGED_LABEL = "dockyard.dev/runtime"  # on every pod, container and volume the podman runtime makes
JOB_UID_LABEL = "dockyard.dev/job-uid"  # whose they are: the Job's uid (the PVC's owner), one per launch
KNOWN_CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "volumeMounts", "resources", "securityContext",
    "terminationMessagePolicy", "restartPolicy", "startupProbe", "livenessProbe",
}  # fmt: skip
_PULL = {"Always": "always", "IfNotPresent": "missing", "Never": "never"}
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


class Untranslatable(ValueError):
    """The Job asks for something the podman runtime does not translate; the message names it."""


@dataclass(frozen=True)
class Probe:
    command: list[str]
    period_seconds: float
    failure_threshold: int
    timeout_seconds: float
    initial_delay_seconds: float = 0
    termination_grace_seconds: float | None = None


@dataclass(frozen=True)
class ContainerPlan:
    """One container: `podman create` + `args` makes it (the image and its command are at the end)."""

    name: str  # the Job's container name
    kind: str  # "init" (runs to completion), "sidecar" (native sidecar: restartPolicy Always) or "main"
    args: list[str]
    startup_probe: Probe | None = None
    liveness_probe: Probe | None = None


@dataclass(frozen=True)
class FilePlan:
    """A file the runtime writes before the pod starts: `<files dir>/<volume>/<path>`, owned root:<gid>."""

    volume: str
    path: str
    data: bytes
    mode: int
    gid: int


@dataclass(frozen=True)
class PodPlan:
    pod: str  # the pod's name (the Job's)
    pod_args: list[str]  # `podman pod create` + these
    volume: str  # the workspace's named volume (the PVC's name)
    volume_args: list[str]  # `podman volume create` + these
    owner: tuple[int, int]  # who owns the workspace and the files (runAsUser, fsGroup)
    files: list[FilePlan]
    containers: list[ContainerPlan]
    spec: JobSpec
    labels: dict[str, str] = field(default_factory=dict)


def plan(manifests: list[dict], secrets: dict[str, dict[str, bytes]], *, workspace_dir: str, files_dir: str,
         network: str, runtime_label: str = "podman") -> PodPlan:
    """The podman pod of the Job in `manifests` (factory.render's output: the Job, its Secret if any, its PVC).
    `secrets`: the Secrets the Job mounts that are not in `manifests`, by name (key -> value), e.g. the
    object store's credentials; `workspace_dir`: the host directory behind the workspace volume;
    `files_dir`: where the runtime writes the Secret and downward-API files; `network`: `podman pod create
    --network`'s value."""
    by_kind = {m["kind"]: m for m in manifests if m["kind"] != "Secret"}
    job, pvc = by_kind["Job"], by_kind["PersistentVolumeClaim"]
    rendered = {m["metadata"]["name"]: {k: base64.b64decode(v) for k, v in m.get("data", {}).items()}
                for m in manifests if m["kind"] == "Secret"}  # fmt: skip
    all_secrets = {**secrets, **rendered}
    template = job["spec"]["template"]
    pod_spec = template["spec"]
    if pod_spec.get("restartPolicy") != "Never":
        raise Untranslatable(f"restartPolicy {pod_spec.get('restartPolicy')!r}: only Never is translated")
    security = pod_spec.get("securityContext") or {}
    uid, gid = int(security.get("runAsUser", 0)), int(security.get("runAsGroup", 0))
    fs_group = int(security.get("fsGroup", gid))
    name = job["metadata"]["name"]
    owner_uid = pvc["metadata"]["ownerReferences"][0]["uid"]
    labels = {**template["metadata"].get("labels", {}), MANAGED_LABEL: runtime_label, JOB_UID_LABEL: owner_uid}

    volumes, files = {}, []
    for volume in pod_spec["volumes"]:
        vname = volume["name"]
        if "persistentVolumeClaim" in volume:
            if volume["persistentVolumeClaim"]["claimName"] != pvc["metadata"]["name"]:
                raise Untranslatable(f"volume {vname}: only the Job's own PVC is translated")
            volumes[vname] = ("volume", pvc["metadata"]["name"], None)
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            volumes[vname] = ("tmpfs", None, _bytes(size) if size else None)
        elif "secret" in volume:
            files += _secret_files(volume, all_secrets, fs_group)
            volumes[vname] = ("files", f"{files_dir}/{vname}", None)
        elif "downwardAPI" in volume:
            for item in volume["downwardAPI"]["items"]:
                files.append(FilePlan(vname, item["path"], _field(template, item["fieldRef"]["fieldPath"]).encode(),
                                      volume["downwardAPI"].get("defaultMode", 0o644), fs_group))
            volumes[vname] = ("files", f"{files_dir}/{vname}", None)
        else:
            raise Untranslatable(f"volume {vname}: kind {sorted(set(volume) - {'name'})} is not translated")

    containers = [_container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init", name, security,
                             fs_group, volumes, labels) for c in pod_spec.get("initContainers", [])]
    containers += [_container(c, "main", name, security, fs_group, volumes, labels) for c in pod_spec["containers"]]
    pod_args = ["--name", name, "--network", network, *_labels(labels)]
    volume_args = ["--opt", "type=none", "--opt", "o=bind", "--opt", f"device={workspace_dir}", *_labels(labels),
                   pvc["metadata"]["name"]]  # fmt: skip
    return PodPlan(name, pod_args, pvc["metadata"]["name"], volume_args, (uid, fs_group), files, containers,
                   JobSpec.from_job(job), labels)


def _container(c: dict, kind: str, pod: str, pod_security: dict, fs_group: int, volumes: dict, labels: dict) -> ContainerPlan:
    unknown = set(c) - KNOWN_CONTAINER_KEYS
    if unknown:
        raise Untranslatable(f"container {c['name']}: {', '.join(sorted(unknown))} not translated")
    args = ["--pod", pod, "--name", f"{pod}-{c['name']}", *_labels({**labels, "dockyard.dev/container": c["name"]})]
    args += ["--pull", _PULL[c.get("imagePullPolicy", "IfNotPresent")]]
    args += _security_args({**pod_security, **(c.get("securityContext") or {})}, fs_group)
    limits = (c.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        args += ["--memory", str(_bytes(limits["memory"])), "--memory-swap", str(_bytes(limits["memory"]))]
    if "cpu" in limits:
        args += ["--cpus", _cpus(limits["cpu"])]
    for var in c.get("env", []):
        if "value" not in var:
            raise Untranslatable(f"container {c['name']}: env {var['name']} is not a plain value")
        args += ["--env", f"{var['name']}={var['value']}"]
    for mount in c.get("volumeMounts", []):
        args += ["--mount", _mount(volumes[mount["name"]], mount["mountPath"], mount.get("readOnly", False))]
    command = c.get("command")
    if command:
        args += ["--entrypoint", json.dumps(command)]
    args += [c["image"], *c.get("args", [])]
    return ContainerPlan(c["name"], kind, args, _probe(c.get("startupProbe")), _probe(c.get("livenessProbe")))


def _security_args(sec: dict, fs_group: int) -> list[str]:
    """The securityContext (the container's over the pod's) as podman flags."""
    args = []
    if "runAsUser" in sec:
        args += ["--user", f"{sec['runAsUser']}:{sec.get('runAsGroup', sec['runAsUser'])}"]
    if "fsGroup" in sec:
        args += ["--group-add", str(fs_group)]
    if sec.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # no writable /run, /var/tmp the Job does not have
    for cap in (sec.get("capabilities") or {}).get("drop", []):
        args += ["--cap-drop", cap]
    for cap in (sec.get("capabilities") or {}).get("add", []):
        args += ["--cap-add", cap]
    if sec.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def _mount(volume: tuple, path: str, ro: bool) -> str:
    how, source, size = volume
    if how == "volume":
        return f"type=volume,src={source},dst={path}" + (",ro=true" if ro else "")
    if how == "tmpfs":
        return f"type=tmpfs,dst={path},tmpfs-mode=1777" + (f",tmpfs-size={size}" if size else "")
    return f"type=bind,src={source},dst={path}" + (",ro=true" if ro else "")


def _probe(probe: dict | None) -> Probe | None:
    if probe is None:
        return None
    if "exec" not in probe:
        raise Untranslatable(f"probe {sorted(probe)}: only exec probes are translated")
    return Probe(
        command=list(probe["exec"]["command"]),
        period_seconds=probe.get("periodSeconds", 10),
        failure_threshold=probe.get("failureThreshold", 3),
        timeout_seconds=probe.get("timeoutSeconds", 1),
        initial_delay_seconds=probe.get("initialDelaySeconds", 0),
        termination_grace_seconds=probe.get("terminationGracePeriodSeconds"),
    )


def _secret_files(volume: dict, secrets: dict[str, dict[str, bytes]], gid: int) -> list[FilePlan]:
    source = volume["secret"]
    data = secrets.get(source["secretName"])
    if data is None:
        if source.get("optional"):
            return []  # the kubelet mounts an empty directory
        raise Untranslatable(f"volume {volume['name']}: Secret {source['secretName']} is not known to the podman runtime")
    mode = source.get("defaultMode", 0o644)
    items = source.get("items") or [{"key": key, "path": key} for key in sorted(data)]
    return [FilePlan(volume["name"], item["path"], data[item["key"]], item.get("mode", mode), gid) for item in items]


def _field(template: dict, path: str) -> str:
    match = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
    if not match:
        raise Untranslatable(f"downward API field {path!r}: only metadata.annotations['...'] is translated")
    return template["metadata"]["annotations"][match.group(1)]


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|)", str(quantity))
    if not match:
        raise Untranslatable(f"quantity {quantity!r}: not a size podman takes")
    return int(Decimal(match.group(1)) * _SUFFIX[match.group(2)])


def _cpus(quantity: str) -> str:
    text = str(quantity)
    value = Decimal(text[:-1]) / 1000 if text.endswith("m") else Decimal(text)
    return format(value.normalize(), "f")


def _labels(labels: dict[str, str]) -> list[str]:
    return [arg for key, value in sorted(labels.items()) for arg in ("--label", f"{key}={value}")]
