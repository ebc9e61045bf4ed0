"""The Knative admission-webhook rules dockyard relies on that the CRD schemas do not carry.

Each rule is transcribed from the upstream file named beside it, at the tags pinned in
tests/manifests/versions.py (serving `knative-v1.20.0`, eventing `knative-v1.20.0`). The
CRD schemas (crd_schema.py) accept a whole PodSpec; Knative's webhook then refuses every
field its field masks do not copy, unless a feature flag of the `config-features`
ConfigMap (namespace knative-serving) lets it through. So the checker takes the flags as
input: the upstream defaults, overridden by a `config-features` that dockyard ships (if it
ever does). A rule we depend on that is off by default therefore fails the manifests test
until our manifests turn its flag on.

Sources (paths in knative/serving): pkg/apis/serving/fieldmask.go (the masks),
pkg/apis/serving/k8s_validation.go (volumes, env, ports, probes, securityContext bounds, reserved
names), pkg/apis/serving/v1/revision_validation.go (timeoutSeconds), revision_defaults.go (the
timeouts and probe defaults applied before validation), pkg/apis/serving/metadata_validation.go
(containerConcurrency), pkg/apis/config/features.go and defaults.go (the defaults of
config-features and config-defaults), pkg/networking/constants.go (reserved ports); in
knative/eventing: pkg/apis/eventing/v1/broker_validation.go and trigger_validation.go.

Invariants: every function returns the list of problems, each naming the field path; an
empty list means the webhook would admit the object. Nothing here is hand-invented: a
field not listed is one upstream's masks drop, and the list names its Go mask.
"""

from __future__ import annotations

from collections.abc import Mapping

from tests.manifests import versions

SERVING = f"knative/serving@{versions.KNATIVE_SERVING}"
EVENTING = f"knative/eventing@{versions.KNATIVE_EVENTING}"

# serving pkg/apis/config/features.go, defaultFeaturesConfig() (the values
# config/core/configmaps/features.yaml documents). Only the flags the masks below consult.
DEFAULT_FEATURES: dict[str, str] = {
    "multi-container": "enabled",
    "secure-pod-defaults": "disabled",
    "kubernetes.podspec-affinity": "disabled",
    "kubernetes.podspec-topologyspreadconstraints": "disabled",
    "kubernetes.podspec-hostaliases": "disabled",
    "kubernetes.podspec-nodeselector": "disabled",
    "kubernetes.podspec-tolerations": "disabled",
    "kubernetes.podspec-fieldref": "disabled",
    "kubernetes.podspec-runtimeclassname": "disabled",
    "kubernetes.podspec-dnspolicy": "disabled",
    "kubernetes.podspec-dnsconfig": "disabled",
    "kubernetes.podspec-securitycontext": "disabled",
    "kubernetes.podspec-shareprocessnamespace": "disabled",
    "kubernetes.podspec-hostipc": "disabled",
    "kubernetes.podspec-hostpid": "disabled",
    "kubernetes.podspec-hostnetwork": "disabled",
    "kubernetes.podspec-priorityclassname": "disabled",
    "kubernetes.podspec-schedulername": "disabled",
    "kubernetes.containerspec-addcapabilities": "disabled",
    "kubernetes.podspec-volumes-emptydir": "enabled",
    "kubernetes.podspec-volumes-image": "disabled",
    "kubernetes.podspec-volumes-hostpath": "disabled",
    "kubernetes.podspec-volumes-csi": "disabled",
    "kubernetes.podspec-init-containers": "disabled",
    "kubernetes.podspec-persistent-volume-claim": "disabled",
    "kubernetes.podspec-persistent-volume-write": "disabled",
    "kubernetes.podspec-volumes-mount-propagation": "disabled",
}

# serving pkg/apis/config/defaults.go (DefaultMaxRevisionTimeoutSeconds = 10*60,
# DefaultContainerConcurrencyMaxLimit = 1000, allow-container-concurrency-zero true),
# the values config/core/configmaps/defaults.yaml documents.
DEFAULT_DEFAULTS: dict[str, str] = {
    "max-revision-timeout-seconds": "600",
    "revision-timeout-seconds": "300",
    # Unset, revision-response-start-timeout-seconds takes revision-timeout-seconds' value (defaults.go).
    "revision-response-start-timeout-seconds": "300",
    "revision-idle-timeout-seconds": "0",
    "container-concurrency-max-limit": "1000",
    "allow-container-concurrency-zero": "true",
}

# ---- field masks: serving pkg/apis/serving/fieldmask.go -----------------------------------
# PodSpecMask: always copied (automountServiceAccountToken only when false, checked below).
POD_SPEC_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks", "automountServiceAccountToken"}
# PodSpecMask: copied when the flag is not "disabled".
POD_SPEC_FLAGGED = {
    "affinity": "kubernetes.podspec-affinity",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers",
    "dnsPolicy": "kubernetes.podspec-dnspolicy",
    "dnsConfig": "kubernetes.podspec-dnsconfig",
    "hostIPC": "kubernetes.podspec-hostipc",
    "hostPID": "kubernetes.podspec-hostpid",
    "hostNetwork": "kubernetes.podspec-hostnetwork",
}
# RevisionSpec's own fields beside the inlined PodSpec (serving pkg/apis/serving/v1/revision_types.go).
REVISION_SPEC_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
# ContainerMask.
CONTAINER_FIELDS = {
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy", "livenessProbe", "ports",
    "readinessProbe", "resources", "securityContext", "startupProbe", "terminationMessagePath",
    "terminationMessagePolicy", "volumeMounts",
}  # fmt: skip
# SecurityContextMask (privileged only when false, checked below).
SECURITY_CONTEXT_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot", "allowPrivilegeEscalation", "seccompProfile", "privileged"}
# PodSecurityContextMask, with kubernetes.podspec-securitycontext on.
POD_SECURITY_CONTEXT_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "supplementalGroups", "seccompProfile"}
# VolumeSourceMask: always, and by flag.
VOLUME_SOURCES = {"secret", "configMap", "projected"}
VOLUME_SOURCES_FLAGGED = {
    "emptyDir": "kubernetes.podspec-volumes-emptydir",
    "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
    "hostPath": "kubernetes.podspec-volumes-hostpath",
    "csi": "kubernetes.podspec-volumes-csi",
    "image": "kubernetes.podspec-volumes-image",
}
# VolumeMountMask (mountPropagation by flag).
VOLUME_MOUNT_FIELDS = {"name", "readOnly", "mountPath", "subPath"}
# EnvVarSourceMask (fieldRef and resourceFieldRef when kubernetes.podspec-fieldref is not disabled).
ENV_VALUE_FROM_FIELDS = {"configMapKeyRef", "secretKeyRef"}
# VolumeProjectionMask.
PROJECTION_SOURCES = {"secret", "configMap", "serviceAccountToken", "downwardAPI"}

# ---- k8s_validation.go: names and values ------------------------------------------------
RESERVED_CONTAINER_NAMES = {"queue-proxy"}
RESERVED_ENV_VARS = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
MAX_ID = 2**31 - 1  # minUserID/maxUserID, minGroupID/maxGroupID: 0..math.MaxInt32
# reservedPorts: pkg/networking/constants.go (BackendHTTPPort 8012, BackendHTTP2Port 8013, QueueAdminPort 8022,
# AutoscalingQueueMetricsPort 9090, UserQueueMetricsPort 9091) and knative.dev/pkg ProfilingDefaultPort 8008.
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}
VALID_PORT_NAMES = {"h2c", "http1", ""}  # validPortNames
CONTAINER_PORT_FIELDS = {"containerPort", "name", "protocol"}  # ContainerPortMask (hostIP, hostPort dropped)
PROBE_FIELDS = {"initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold"}  # ProbeMask
PROBE_HANDLERS = {"httpGet", "tcpSocket", "exec", "grpc"}  # HandlerMask


class Config:
    """The flags and defaults the webhook reads: upstream's, overridden by our ConfigMaps."""

    def __init__(self, features: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None):
        self.features = {**DEFAULT_FEATURES, **{k: str(v).lower() for k, v in (features or {}).items()}}
        self.defaults = {**DEFAULT_DEFAULTS, **(defaults or {})}

    @classmethod
    def from_documents(cls, bodies: list[dict]) -> Config:
        """The `config-features` / `config-defaults` ConfigMaps of knative-serving among `bodies`, if any."""

        def data(name: str) -> dict:
            for b in bodies:
                meta = b.get("metadata") or {}
                if b.get("kind") == "ConfigMap" and meta.get("name") == name and meta.get("namespace") == "knative-serving":
                    return b.get("data") or {}
            return {}

        return cls(data("config-features"), data("config-defaults"))

    def allowed(self, flag: str) -> bool:
        """Masks copy a field when its flag is not Disabled ("enabled" or "allowed")."""
        return self.features[flag] != "disabled"

    def enabled(self, flag: str) -> bool:
        return self.features[flag] == "enabled"


def _unknown(obj: Mapping, allowed: set[str], path: str) -> list[str]:
    # apis.CheckDisallowedFields: a set field the mask did not copy.
    return [f"{path}.{k}: must not set the field(s)" for k in sorted(obj) if k not in allowed]


def check_service(body: dict, config: Config) -> list[str]:
    """serving.knative.dev/v1 Service: its revision template's spec."""
    spec = ((body.get("spec") or {}).get("template") or {}).get("spec") or {}
    return check_revision_spec(spec, config, "spec.template.spec")


def check_revision_spec(spec: dict, config: Config, path: str) -> list[str]:
    found: list[str] = []
    allowed = POD_SPEC_FIELDS | REVISION_SPEC_FIELDS | {f for f, flag in POD_SPEC_FLAGGED.items() if config.allowed(flag)}
    # PodSpecMask: securityContext passes with podspec-securitycontext or secure-pod-defaults.
    if config.allowed("kubernetes.podspec-securitycontext") or config.allowed("secure-pod-defaults"):
        allowed.add("securityContext")
    found += _unknown(spec, allowed, path)
    if spec.get("automountServiceAccountToken") is True:  # PodSpecMask: "Only allow setting ... to false"
        found.append(f"{path}.automountServiceAccountToken: must not set the field(s)")
    if "securityContext" in spec and "securityContext" in allowed:
        found += _pod_security_context(spec["securityContext"], config, f"{path}.securityContext")

    found += _bounds(spec, config, path)

    containers = spec.get("containers") or []
    if not containers:
        found.append(f"{path}.containers: missing field(s)")
    if len(containers) > 1 and not config.enabled("multi-container"):  # validateContainers
        found.append(f"{path}: multi-container is off, but found {len(containers)} containers")
    init = spec.get("initContainers") or []
    if init and not config.enabled("kubernetes.podspec-init-containers"):  # validateInitContainers
        found.append(f"{path}: pod spec support for init-containers is off, but found {len(init)} init containers")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounted = {m.get("name") for c in [*containers, *init] for m in c.get("volumeMounts") or []}
    for i, volume in enumerate(spec.get("volumes") or []):
        found += _volume(volume, mounted, config, f"{path}.volumes[{i}]")
    for kind, group in (("containers", containers), ("initContainers", init)):
        for i, container in enumerate(group):
            found += _container(container, volumes, config, f"{path}.{kind}[{i}]", sidecar=kind == "initContainers" or (len(group) > 1 and not container.get("ports")))
    return found


def revision_timeouts(spec: dict, config: Config) -> dict[str, int | None]:
    """The timeouts a revision runs with, as serving pkg/apis/serving/v1/revision_defaults.go
    RevisionSpec.SetDefaults fills them in: timeoutSeconds (unset or 0: revision-timeout-seconds);
    idle and response-start only from a non-zero default below timeoutSeconds (None: no timer)."""
    timeout = spec.get("timeoutSeconds") or int(config.defaults["revision-timeout-seconds"])
    out: dict[str, int | None] = {"timeoutSeconds": timeout}
    for field, key in (("idleTimeoutSeconds", "revision-idle-timeout-seconds"), ("responseStartTimeoutSeconds", "revision-response-start-timeout-seconds")):
        default = int(config.defaults[key])
        out[field] = spec.get(field, default if 0 < default < timeout else None)
    return out


def _bounds(spec: dict, config: Config, path: str) -> list[str]:
    found = []
    # revision_validation.go validateTimeoutSeconds: 0 < timeoutSeconds <= max-revision-timeout-seconds.
    timeout = spec.get("timeoutSeconds")
    top = int(config.defaults["max-revision-timeout-seconds"])
    if timeout is not None and timeout != 0 and not 0 <= timeout <= top:
        found.append(f"{path}.timeoutSeconds: expected 0 <= {timeout} <= {top}")
    # metadata_validation.go ValidateContainerConcurrency: 0..container-concurrency-max-limit, 0 if allowed.
    cc = spec.get("containerConcurrency")
    if cc is not None:
        low = 0 if config.defaults["allow-container-concurrency-zero"] == "true" else 1
        high = int(config.defaults["container-concurrency-max-limit"])
        if not low <= cc <= high:
            found.append(f"{path}.containerConcurrency: expected {low} <= {cc} <= {high}")
    return found


def _pod_security_context(sc: dict, config: Config, path: str) -> list[str]:
    # PodSecurityContextMask: secure-pod-defaults alone lets only seccompProfile RuntimeDefault/Unconfined through.
    if config.allowed("kubernetes.podspec-securitycontext"):
        found = _unknown(sc, POD_SECURITY_CONTEXT_FIELDS, path)
    else:
        found = _unknown(sc, {"seccompProfile"}, path)
        if (sc.get("seccompProfile") or {}).get("type") not in (None, "RuntimeDefault", "Unconfined"):
            found.append(f"{path}.seccompProfile: must not set the field(s)")
    for key in ("runAsUser", "runAsGroup"):  # ValidatePodSecurityContext
        if key in sc and not 0 <= sc[key] <= MAX_ID:
            found.append(f"{path}.{key}: expected 0 <= {sc[key]} <= {MAX_ID}")
    return found


def _volume(volume: dict, mounted: set, config: Config, path: str) -> list[str]:
    found = _unknown(volume, {"name"} | VOLUME_SOURCES | set(VOLUME_SOURCES_FLAGGED), path)
    name = volume.get("name")
    if name not in mounted:  # ValidateVolumes
        found.append(f'{path}.name: volume with name "{name}" not mounted')
    sources = [k for k in volume if k != "name"]
    for source in sources:
        flag = VOLUME_SOURCES_FLAGGED.get(source)
        # validateVolume: "... support is disabled, but found ..." needs the flag Enabled.
        if flag and not config.enabled(flag):
            found.append(f"{path}.{source}: {source} volume support is disabled ({flag}), but found volume {name}")
    if len(sources) != 1:
        found.append(f"{path}: expected exactly one volume source, got {sources}")
    pvc = volume.get("persistentVolumeClaim")
    if pvc is not None and not pvc.get("readOnly") and not config.enabled("kubernetes.podspec-persistent-volume-write"):
        found.append(f"{path}.persistentVolumeClaim: Persistent volume write support is disabled, but found persistent volume claim {pvc.get('claimName')} that is not read-only")
    for i, projection in enumerate((volume.get("projected") or {}).get("sources") or []):
        found += _unknown(projection, PROJECTION_SOURCES, f"{path}.projected.sources[{i}]")
        if len(projection) != 1:
            found.append(f"{path}.projected.sources[{i}]: expected exactly one of {sorted(PROJECTION_SOURCES)}")
    return found


def _container(c: dict, volumes: dict, config: Config, path: str, *, sidecar: bool) -> list[str]:
    found = _unknown(c, CONTAINER_FIELDS, path)
    if c.get("name") in RESERVED_CONTAINER_NAMES:
        found.append(f'{path}.name: "{c["name"]}" is a reserved container name')
    if not c.get("image"):
        found.append(f"{path}.image: missing field(s)")
    # getReservedEnvVarsPerContainerType: sidecars and init containers may set PORT.
    reserved = RESERVED_ENV_VARS - {"PORT"} if sidecar else RESERVED_ENV_VARS
    for i, env in enumerate(c.get("env") or []):
        if env.get("name") in reserved:
            found.append(f'{path}.env[{i}].name: "{env["name"]}" is a reserved environment variable')
        value_from = env.get("valueFrom")
        if value_from is not None:
            allowed = ENV_VALUE_FROM_FIELDS | ({"fieldRef", "resourceFieldRef"} if config.allowed("kubernetes.podspec-fieldref") else set())
            found += _unknown(value_from, allowed, f"{path}.env[{i}].valueFrom")
    if c.get("securityContext") is not None:
        found += _security_context(c["securityContext"], config, f"{path}.securityContext")
    found += _ports(c.get("ports") or [], f"{path}.ports", init=path.split(".")[-1].startswith("initContainers"))
    port_name = ((c.get("ports") or [{}])[0].get("name")) or "http"  # validateContainersPorts: unnamed is "http"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if isinstance(c.get(probe), dict):
            found += _probe(c[probe], port_name, f"{path}.{probe}", user=not sidecar, readiness=probe == "readinessProbe")
    mount_fields = VOLUME_MOUNT_FIELDS | ({"mountPropagation"} if config.allowed("kubernetes.podspec-volumes-mount-propagation") else set())
    for i, mount in enumerate(c.get("volumeMounts") or []):
        found += _unknown(mount, mount_fields, f"{path}.volumeMounts[{i}]")
        if mount.get("name") not in volumes:  # validateVolumeMounts
            found.append(f"{path}.volumeMounts[{i}].name: volumeMount has no matching volume")
    return found


def _security_context(sc: dict, config: Config, path: str) -> list[str]:
    found = _unknown(sc, SECURITY_CONTEXT_FIELDS, path)
    if sc.get("privileged") is True:  # SecurityContextMask: "Only allow setting Privileged to false"
        found.append(f"{path}.privileged: must not set the field(s)")
    for key in ("runAsUser", "runAsGroup"):  # validateSecurityContext
        if key in sc and not 0 <= sc[key] <= MAX_ID:
            found.append(f"{path}.{key}: expected 0 <= {sc[key]} <= {MAX_ID}")
    return found + _capabilities(sc.get("capabilities"), config, f"{path}.capabilities")


def _ports(ports: list[dict], path: str, *, init: bool) -> list[str]:
    # validateContainerPorts (the serving container: its first port) / validateInitContainerPorts (each).
    found = []
    for i, port in enumerate(ports if init else ports[:1]):
        where = f"{path}[{i}]"
        found += _unknown(port, CONTAINER_PORT_FIELDS, where)
        number = port.get("containerPort", 0)
        if number in RESERVED_PORTS:
            found.append(f"{where}.containerPort: {number} is a reserved port")
        if not 0 <= number <= 65535:
            found.append(f"{where}.containerPort: expected 0 <= {number} <= 65535")
        if not init and port.get("protocol", "TCP") != "TCP":
            found.append(f"{where}.protocol: invalid value: {port['protocol']}")
        if not init and port.get("name", "") not in VALID_PORT_NAMES:
            found.append(f"{where}: Port name {port['name']} is not allowed")
    return found


def _probe(probe: dict, port_name: str, path: str, *, user: bool, readiness: bool) -> list[str]:
    # validateProbe: one handler; the serving container's probe port, if named, is its port's name (an
    # unnamed or numeric one is rewritten by Knative); a sidecar's must be given.
    found = _unknown(probe, PROBE_FIELDS | PROBE_HANDLERS, path)
    handlers = [h for h in PROBE_HANDLERS if h in probe]
    if not handlers and user and readiness:
        handlers = ["tcpSocket"]  # revision_defaults.go applyUserContainerDefaultReadinessProbe
    if len(handlers) != 1:
        found.append(f"{path}: expected exactly one of {sorted(PROBE_HANDLERS)}, got {handlers}")
    for handler in ("httpGet", "tcpSocket"):
        port = (probe.get(handler) or {}).get("port") if handler in probe else None
        if handler in probe and user and isinstance(port, str) and port != port_name:
            found.append(f"{path}.{handler}.port: Probe port must match container port")
        if handler in probe and not user and not port:
            found.append(f"{path}.{handler}.port: Probe port must be specified")
    if readiness:
        # validateReadinessProbe: periodSeconds 0 is Knative's aggressive probe, which takes no
        # failureThreshold or timeoutSeconds; otherwise both must be at least 1.
        # With periodSeconds set, revision_defaults.go applyReadinessProbeDefaults first fills an unset or
        # zero failureThreshold (3) and timeoutSeconds (1), so only a negative one is refused.
        if probe.get("periodSeconds", 0) == 0:
            found += [f"{path}.{k}: {k} is disallowed when periodSeconds is zero" for k in ("failureThreshold", "timeoutSeconds") if probe.get(k)]
        else:
            found += [f"{path}.{k}: expected 1 <= {probe[k]}" for k in ("timeoutSeconds", "failureThreshold") if probe.get(k, 0) < 0]
    return found


def _capabilities(caps: dict | None, config: Config, path: str) -> list[str]:
    # CapabilitiesMask: drop always; add with containerspec-addcapabilities Enabled, or exactly
    # [NET_BIND_SERVICE] under secure-pod-defaults (Enabled or AllowRootBounded).
    if caps is None:
        return []
    found = _unknown(caps, {"drop", "add"}, path)
    add = caps.get("add")
    if add and not config.enabled("kubernetes.containerspec-addcapabilities"):
        if not (config.features["secure-pod-defaults"] in ("enabled", "allowrootbounded") and add == ["NET_BIND_SERVICE"]):
            found.append(f"{path}.add: must not set the field(s)")
    return found


# ---- eventing pkg/apis/eventing/v1 --------------------------------------------------------
BROKER_CLASS = "eventing.knative.dev/broker.class"  # broker_validation.go BrokerClassAnnotationKey


def check_broker(body: dict, original: dict | None = None) -> list[str]:
    """broker_validation.go Broker.Validate / CheckImmutableFields."""
    found = []
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    if not annotations.get(BROKER_CLASS):
        found.append(f"metadata.annotations.{BROKER_CLASS}: missing field(s)")
    if original is not None:
        # "Only Delivery options are mutable."
        old = {k: v for k, v in (original.get("spec") or {}).items() if k != "delivery"}
        new = {k: v for k, v in (body.get("spec") or {}).items() if k != "delivery"}
        if old != new:
            found.append("spec: Immutable fields changed (-old +new)")
        elif ((original.get("metadata") or {}).get("annotations") or {}).get(BROKER_CLASS) != annotations.get(BROKER_CLASS):
            found.append("annotations: Immutable annotations changed (-old +new)")
    return found


def check_trigger(body: dict, original: dict | None = None) -> list[str]:
    """trigger_validation.go TriggerSpec.Validate / Trigger.CheckImmutableFields."""
    found = []
    spec = body.get("spec") or {}
    if bool(spec.get("broker")) == bool(spec.get("brokerRef")):
        found.append("spec: expected exactly one, got both or neither: broker, brokerRef")
    if original is not None and (original.get("spec") or {}).get("broker") != spec.get("broker"):
        found.append("spec.broker: Immutable fields changed (-old +new)")
    return found


def check(body: dict, config: Config, original: dict | None = None) -> list[str]:
    """The webhook's verdict on one object (an update when `original` is given); other kinds pass."""
    kind = (body.get("apiVersion"), body.get("kind"))
    if kind == ("serving.knative.dev/v1", "Service"):
        return check_service(body, config)
    if kind == ("eventing.knative.dev/v1", "Broker"):
        return check_broker(body, original)
    if kind == ("eventing.knative.dev/v1", "Trigger"):
        return check_trigger(body, original)
    return []
