"""Pod Security Standards, "baseline" and "restricted", checked rule by rule.

The checker below follows the published profiles
(kubernetes.io/docs/concepts/security/pod-security-standards, as of Kubernetes
1.34): each rule names its restricted fields and allowed values. A rule applies
to every container of the pod: containers, initContainers (native sidecars
included: they are initContainers with restartPolicy Always) and
ephemeralContainers. "restricted" includes every "baseline" rule.

Every agent pod the factory renders must pass "restricted" (the namespace
enforces it); so must the egress proxy and the Knative Services' containers.
A deliberately broken pod fails each rule, and the checker names it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from tests.manifests import documents, find, pod_template, rendered_manifests

BASELINE = "baseline"
RESTRICTED = "restricted"

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"

# Rule names, as the checker reports them.
HOST_PROCESS = "HostProcess"
HOST_NAMESPACES = "Host Namespaces"
PRIVILEGED = "Privileged Containers"
CAPABILITIES_BASELINE = "Capabilities (baseline)"
HOST_PATH = "HostPath Volumes"
HOST_PORTS = "Host Ports"
HOST_PROBES = "Host Probes / Lifecycle Hooks"
APPARMOR = "AppArmor"
SELINUX = "SELinux"
PROC_MOUNT = "/proc Mount Type"
SECCOMP_BASELINE = "Seccomp (baseline)"
SYSCTLS = "Sysctls"
VOLUME_TYPES = "Volume Types"
PRIVILEGE_ESCALATION = "Privilege Escalation"
RUN_AS_NON_ROOT = "Running as Non-root"
RUN_AS_USER = "Running as Non-root user"
SECCOMP_RESTRICTED = "Seccomp (restricted)"
CAPABILITIES_RESTRICTED = "Capabilities (restricted)"

# As in the admission controller, the restricted form of a rule replaces its baseline form.
SUPERSEDED = {
    SECCOMP_BASELINE: SECCOMP_RESTRICTED,
    CAPABILITIES_BASELINE: CAPABILITIES_RESTRICTED,
    HOST_PATH: VOLUME_TYPES,
}


@dataclass(frozen=True)
class Violation:
    rule: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.where}: {self.detail}"


def _containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for i, container in enumerate(spec.get(field) or []):
            yield f"spec.{field}[{i}]({container.get('name', '?')})", container


def _handlers(container: dict) -> Iterator[tuple[str, dict]]:
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if container.get(probe):
            yield probe, container[probe]
    for hook in ("postStart", "preStop"):
        handler = (container.get("lifecycle") or {}).get(hook)
        if handler:
            yield f"lifecycle.{hook}", handler


def check_baseline(pod: dict) -> list[Violation]:
    """`pod` is {metadata, spec}. The baseline profile: no known privilege escalation."""
    found: list[Violation] = []

    def bad(rule: str, where: str, detail: str) -> None:
        found.append(Violation(rule, where, detail))

    _baseline_pod(pod.get("metadata") or {}, pod["spec"], bad)
    for where, container in _containers(pod["spec"]):
        _baseline_container(where, container, bad)
    return found


def _baseline_pod(metadata: dict, spec: dict, bad: Callable[[str, str, str], None]) -> None:
    pod_sc = spec.get("securityContext") or {}
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        bad(HOST_PROCESS, "spec.securityContext.windowsOptions.hostProcess", "must be unset or false")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad(HOST_NAMESPACES, f"spec.{field}", "must be unset or false")
    for i, volume in enumerate(spec.get("volumes") or []):
        if "hostPath" in volume:
            bad(HOST_PATH, f"spec.volumes[{i}]({volume.get('name')})", "hostPath volumes are forbidden")
    if (pod_sc.get("appArmorProfile") or {}).get("type") not in (None, *APPARMOR_TYPES):
        bad(APPARMOR, "spec.securityContext.appArmorProfile.type", f"must be one of {sorted(APPARMOR_TYPES)}")
    for key, value in (metadata.get("annotations") or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/"):
            bad(APPARMOR, f"metadata.annotations[{key}]", "must be runtime/default or localhost/*")
    _check_selinux(pod_sc.get("seLinuxOptions"), "spec.securityContext.seLinuxOptions", bad)
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        bad(SECCOMP_BASELINE, "spec.securityContext.seccompProfile.type", "must not be Unconfined")
    for i, sysctl in enumerate(pod_sc.get("sysctls") or []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad(SYSCTLS, f"spec.securityContext.sysctls[{i}]", f"{sysctl.get('name')} is not a safe sysctl")


def _baseline_container(where: str, container: dict, bad: Callable[[str, str, str], None]) -> None:
    sc = container.get("securityContext") or {}
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        bad(HOST_PROCESS, f"{where}.securityContext.windowsOptions.hostProcess", "must be unset or false")
    if sc.get("privileged"):
        bad(PRIVILEGED, f"{where}.securityContext.privileged", "must be unset or false")
    extra = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
    if extra:
        bad(CAPABILITIES_BASELINE, f"{where}.securityContext.capabilities.add", f"{sorted(extra)} are not allowed")
    for j, port in enumerate(container.get("ports") or []):
        if port.get("hostPort"):
            bad(HOST_PORTS, f"{where}.ports[{j}].hostPort", "must be unset or 0")
    for name, handler in _handlers(container):
        for kind in ("httpGet", "tcpSocket"):
            if (handler.get(kind) or {}).get("host"):
                bad(HOST_PROBES, f"{where}.{name}.{kind}.host", "must be unset or empty")
    if (sc.get("appArmorProfile") or {}).get("type") not in (None, *APPARMOR_TYPES):
        bad(APPARMOR, f"{where}.securityContext.appArmorProfile.type", f"must be one of {sorted(APPARMOR_TYPES)}")
    _check_selinux(sc.get("seLinuxOptions"), f"{where}.securityContext.seLinuxOptions", bad)
    if sc.get("procMount") not in (None, "Default"):
        bad(PROC_MOUNT, f"{where}.securityContext.procMount", "must be unset or Default")
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        bad(SECCOMP_BASELINE, f"{where}.securityContext.seccompProfile.type", "must not be Unconfined")


def _check_selinux(options: dict | None, where: str, bad: Callable[[str, str, str], None]) -> None:
    options = options or {}
    if options.get("type", "") not in SELINUX_TYPES:
        bad(SELINUX, f"{where}.type", f"must be one of {sorted(t for t in SELINUX_TYPES if t)}")
    for field in ("user", "role"):
        if options.get(field):
            bad(SELINUX, f"{where}.{field}", "must be unset or empty")


def check_restricted(pod: dict) -> list[Violation]:
    """The restricted profile: baseline, plus the current pod hardening practice."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    found = [v for v in check_baseline(pod) if v.rule not in SUPERSEDED]

    def bad(rule: str, where: str, detail: str) -> None:
        found.append(Violation(rule, where, detail))

    for i, volume in enumerate(spec.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad(VOLUME_TYPES, f"spec.volumes[{i}]({volume.get('name')})", f"{sorted(kinds)} is not an allowed volume type")
    if pod_sc.get("runAsNonRoot") is False:
        bad(RUN_AS_NON_ROOT, "spec.securityContext.runAsNonRoot", "must be true")
    if pod_sc.get("runAsUser") == 0:
        bad(RUN_AS_USER, "spec.securityContext.runAsUser", "must not be 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_TYPES:
        bad(SECCOMP_RESTRICTED, "spec.securityContext.seccompProfile.type", f"must be one of {sorted(SECCOMP_TYPES)}")

    windows = (spec.get("os") or {}).get("name") == "windows"
    for where, container in _containers(spec):
        _restricted_container(where, container, pod_sc, windows, bad)
    return found


def _restricted_container(where: str, container: dict, pod_sc: dict, windows: bool, bad: Callable[[str, str, str], None]) -> None:
    sc = container.get("securityContext") or {}
    if not windows and sc.get("allowPrivilegeEscalation") is not False:
        bad(PRIVILEGE_ESCALATION, f"{where}.securityContext.allowPrivilegeEscalation", "must be false")
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if non_root is not True:
        bad(RUN_AS_NON_ROOT, f"{where}.securityContext.runAsNonRoot", "must be true here or on the pod")
    if sc.get("runAsUser") == 0:
        bad(RUN_AS_USER, f"{where}.securityContext.runAsUser", "must not be 0")
    if windows:
        return
    seccomp = (sc.get("seccompProfile") or {}).get("type", (pod_sc.get("seccompProfile") or {}).get("type"))
    if seccomp not in SECCOMP_TYPES:
        bad(SECCOMP_RESTRICTED, f"{where}.securityContext.seccompProfile.type",
            f"must be one of {sorted(SECCOMP_TYPES)} here or on the pod")  # fmt: skip
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        bad(CAPABILITIES_RESTRICTED, f"{where}.securityContext.capabilities.drop", "must include ALL")
    added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
    if added:
        bad(CAPABILITIES_RESTRICTED, f"{where}.securityContext.capabilities.add",
            f"only NET_BIND_SERVICE may be added, not {sorted(added)}")  # fmt: skip


def check(pod: dict, level: str = RESTRICTED) -> list[Violation]:
    return check_restricted(pod) if level == RESTRICTED else check_baseline(pod)


# --- the pods dockyard runs ------------------------------------------------------

AGENT_PODS = [
    pytest.param(pod_template(manifests[0]), id=name) for name, manifests in rendered_manifests().items()
]
DOCS = documents()
PLATFORM_PODS = [
    pytest.param(pod_template(d.body), id=d.id)
    for d in find(DOCS, "Deployment", "apps") + find(DOCS, "Service", "serving.knative.dev")
]


@pytest.mark.parametrize("pod", AGENT_PODS)
def test_every_rendered_agent_pod_is_restricted(pod):
    violations = check(pod, RESTRICTED)
    assert not violations, "\n".join(map(str, violations))


def test_the_agent_pod_has_a_native_sidecar_and_it_is_checked():
    """The snapshotter is an initContainer with restartPolicy Always: the rules must reach it."""
    pod = copy.deepcopy(AGENT_PODS[0].values[0])
    sidecars = [c for c in pod["spec"].get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    assert sidecars, "expected the snapshotter as a native sidecar"
    sidecars[0]["securityContext"]["privileged"] = True
    assert PRIVILEGED in {v.rule for v in check(pod)}


@pytest.mark.parametrize("pod", PLATFORM_PODS)
def test_platform_pods_are_restricted(pod):
    """The egress proxy, the function and stream Services (Knative adds queue-proxy, which it configures)."""
    violations = check(pod, RESTRICTED)
    assert not violations, "\n".join(map(str, violations))


# --- one broken pod per rule -------------------------------------------------------


def compliant_pod() -> dict:
    """A minimal restricted pod with an init container, a native sidecar and a container."""

    def container(name: str, **extra) -> dict:
        return {
            "name": name,
            "image": "example/app:1",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
            },
            **extra,
        }

    return {
        "metadata": {"name": "example", "annotations": {}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [container("init"), container("sidecar", restartPolicy="Always")],
            "containers": [container("main", ports=[{"containerPort": 8080}], readinessProbe={"httpGet": {"path": "/", "port": 8080}})],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        },
    }


def _pod(pod):
    return pod["spec"]


def _main(pod):
    return pod["spec"]["containers"][0]


def _init(pod):
    return pod["spec"]["initContainers"][0]


def _sidecar(pod):
    return pod["spec"]["initContainers"][1]


def _sc(container):
    return container.setdefault("securityContext", {})


def _unset_everywhere(key: str):
    """A mutation removing `key` from the pod's and every container's securityContext."""

    def mutate(pod):
        pod["spec"].get("securityContext", {}).pop(key, None)
        for _, container in _containers(pod["spec"]):
            _sc(container).pop(key, None)

    return mutate


# (rule, level at which it is violated, mutation). Baseline rules also fail restricted.
MUTATIONS = {
    "hostProcess on the pod": (HOST_PROCESS, BASELINE, lambda p: _pod(p).setdefault("securityContext", {}).update(windowsOptions={"hostProcess": True})),
    "hostProcess in the sidecar": (HOST_PROCESS, BASELINE, lambda p: _sc(_sidecar(p)).update(windowsOptions={"hostProcess": True})),
    "hostNetwork": (HOST_NAMESPACES, BASELINE, lambda p: _pod(p).update(hostNetwork=True)),
    "hostPID": (HOST_NAMESPACES, BASELINE, lambda p: _pod(p).update(hostPID=True)),
    "hostIPC": (HOST_NAMESPACES, BASELINE, lambda p: _pod(p).update(hostIPC=True)),
    "privileged container": (PRIVILEGED, BASELINE, lambda p: _sc(_main(p)).update(privileged=True)),
    "privileged init container": (PRIVILEGED, BASELINE, lambda p: _sc(_init(p)).update(privileged=True)),
    "privileged sidecar": (PRIVILEGED, BASELINE, lambda p: _sc(_sidecar(p)).update(privileged=True)),
    "capability SYS_ADMIN": (CAPABILITIES_BASELINE, BASELINE, lambda p: _sc(_main(p))["capabilities"].update(add=["SYS_ADMIN"])),
    "hostPath volume": (HOST_PATH, BASELINE, lambda p: _pod(p)["volumes"].append({"name": "host", "hostPath": {"path": "/"}})),
    "host port": (HOST_PORTS, BASELINE, lambda p: _main(p)["ports"][0].update(hostPort=8080)),
    "probe host": (HOST_PROBES, BASELINE, lambda p: _main(p)["readinessProbe"]["httpGet"].update(host="169.254.169.254")),
    "AppArmor unconfined on the pod": (APPARMOR, BASELINE, lambda p: _pod(p)["securityContext"].update(appArmorProfile={"type": "Unconfined"})),
    "AppArmor unconfined in a container": (APPARMOR, BASELINE, lambda p: _sc(_init(p)).update(appArmorProfile={"type": "Unconfined"})),
    "AppArmor annotation": (APPARMOR, BASELINE, lambda p: p["metadata"]["annotations"].update({APPARMOR_ANNOTATION + "main": "unconfined"})),
    "SELinux type": (SELINUX, BASELINE, lambda p: _sc(_main(p)).update(seLinuxOptions={"type": "spc_t"})),
    "SELinux user": (SELINUX, BASELINE, lambda p: _pod(p)["securityContext"].update(seLinuxOptions={"user": "system_u"})),
    "/proc unmasked": (PROC_MOUNT, BASELINE, lambda p: _sc(_main(p)).update(procMount="Unmasked")),
    "seccomp unconfined": (SECCOMP_BASELINE, BASELINE, lambda p: _sc(_sidecar(p)).update(seccompProfile={"type": "Unconfined"})),
    "unsafe sysctl": (SYSCTLS, BASELINE, lambda p: _pod(p)["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
    "nfs volume": (VOLUME_TYPES, RESTRICTED, lambda p: _pod(p)["volumes"].append({"name": "nfs", "nfs": {"server": "nfs", "path": "/"}})),
    "privilege escalation allowed": (PRIVILEGE_ESCALATION, RESTRICTED, lambda p: _sc(_main(p)).update(allowPrivilegeEscalation=True)),
    "privilege escalation unset": (PRIVILEGE_ESCALATION, RESTRICTED, lambda p: _sc(_init(p)).pop("allowPrivilegeEscalation")),
    "runAsNonRoot unset": (RUN_AS_NON_ROOT, RESTRICTED, _unset_everywhere("runAsNonRoot")),
    "runAsNonRoot false in a container": (RUN_AS_NON_ROOT, RESTRICTED, lambda p: _sc(_sidecar(p)).update(runAsNonRoot=False)),
    "runAsUser 0 on the pod": (RUN_AS_USER, RESTRICTED, lambda p: _pod(p)["securityContext"].update(runAsUser=0)),
    "runAsUser 0 in a container": (RUN_AS_USER, RESTRICTED, lambda p: _sc(_main(p)).update(runAsUser=0)),
    "seccomp unset": (SECCOMP_RESTRICTED, RESTRICTED, _unset_everywhere("seccompProfile")),
    "capabilities not dropped": (CAPABILITIES_RESTRICTED, RESTRICTED, lambda p: _sc(_init(p))["capabilities"].update(drop=["NET_RAW"])),
    "capability CHOWN added": (CAPABILITIES_RESTRICTED, RESTRICTED, lambda p: _sc(_main(p))["capabilities"].update(add=["CHOWN"])),
}  # fmt: skip


def test_the_compliant_pod_passes():
    assert check(compliant_pod(), RESTRICTED) == []


def test_seccomp_may_be_set_on_every_container_instead_of_the_pod():
    pod = compliant_pod()
    del pod["spec"]["securityContext"]["seccompProfile"]
    for _, container in _containers(pod["spec"]):
        _sc(container)["seccompProfile"] = {"type": "RuntimeDefault"}
    assert check(pod) == []
    _sc(_sidecar(pod)).pop("seccompProfile")
    assert {v.rule for v in check(pod)} == {SECCOMP_RESTRICTED}


def test_net_bind_service_may_be_added():
    pod = compliant_pod()
    _sc(_main(pod))["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert check(pod) == []


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_pod_fails_the_rule(mutation):
    rule, level, mutate = MUTATIONS[mutation]
    pod = compliant_pod()
    mutate(pod)
    restricted = {v.rule for v in check(pod, RESTRICTED)}
    baseline = {v.rule for v in check(pod, BASELINE)}
    expected = SUPERSEDED.get(rule, rule)
    assert restricted == {expected}, f"{mutation}: restricted reports {restricted}, expected only {expected!r}"
    assert baseline == ({rule} if level == BASELINE else set()), f"{mutation}: baseline reports {baseline}"


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_agent_pod_fails_the_rule(mutation):
    """The same mutations on a rendered agent pod (where its shape allows them)."""
    rule, _, mutate = MUTATIONS[mutation]
    pod = copy.deepcopy(AGENT_PODS[0].values[0])
    spec = pod["spec"]
    spec["containers"][0].setdefault("ports", [{"containerPort": 8080}])
    spec["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}}
    pod["metadata"].setdefault("annotations", {})
    mutate(pod)
    assert SUPERSEDED.get(rule, rule) in {v.rule for v in check(pod)}, f"{mutation} went unnoticed on the agent pod"
