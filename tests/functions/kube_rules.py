"""What the Kubernetes API server does to a request body before it stores it, for the kube emulator.

- Field validation (`fieldValidation=Strict|Warn|Ignore`, KEP-2885, GA in 1.27): a field the type does not
  declare is an error under Strict, a `Warning` header under Warn (the server's default), silently dropped
  under Ignore; it is never stored. The declared fields are not written here: they are the official
  `kubernetes` client's models (`openapi_types`/`attribute_map`, generated from the API's OpenAPI).
- Defaulting, as the defaulters and the Job strategy run on create (k8s.io/kubernetes
  pkg/apis/core/v1/defaults.go, pkg/apis/batch/v1/defaults.go, pkg/registry/batch/job/strategy.go):
  only the fields of the kinds the emulator serves that a client could compare against what it sent.
- Validation (422 Invalid, a Status with `details.causes`): object names and label keys/values
  (k8s.io/apimachinery pkg/util/validation), the subset of the API server's checks that a dockyard
  setting can break.

Invariant: every function is pure: it takes a body and returns a new one or a list of findings.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from kubernetes.client import models

# --- field validation -----------------------------------------------------------------------

# The model class of each kind the emulator serves.
MODELS = {"Job": "V1Job", "Pod": "V1Pod", "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Secret": "V1Secret"}


def _walk(value, type_name: str, path: str, unknown: list[str]):
    """`value` with undeclared fields removed; their paths appended to `unknown` (the decoder's spelling:
    `spec.template.spec.containers[0].foo`)."""
    if type_name.startswith("List[") and isinstance(value, list):
        inner = type_name[5:-1]
        return [_walk(item, inner, f"{path}[{i}]", unknown) for i, item in enumerate(value)]
    if type_name.startswith("Dict[") and isinstance(value, dict):
        inner = type_name[5:-1].split(", ", 1)[1]
        return {k: _walk(v, inner, f"{path}[{k}]", unknown) for k, v in value.items()}
    cls = getattr(models, type_name, None)
    if cls is None or not isinstance(value, dict):
        return value  # a scalar, an IntOrString ("object"), or a wrong type (not this module's concern)
    declared = {json: py for py, json in cls.attribute_map.items()}
    kept = {}
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in declared:
            unknown.append(where)
        else:
            kept[key] = _walk(item, cls.openapi_types[declared[key]], where, unknown)
    return kept


def prune(body: dict, kind: str) -> tuple[dict, list[str]]:
    """(the body the server stores, the paths of the fields it dropped)."""
    unknown: list[str] = []
    pruned = _walk(body, MODELS[kind], "", unknown)
    return pruned, unknown


def strict_decoding_message(kind: str, version: str, unknown: list[str]) -> str:
    """The 400 of `fieldValidation=Strict`, in the API server's words
    (`Pod in version "v1" cannot be handled as a Pod: strict decoding error: unknown field "spec.x"`)."""
    fields = ", ".join(f'unknown field "{path}"' for path in unknown)
    return f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {fields}'


def warning_header(path: str) -> str:
    """One `Warning` header value of `fieldValidation=Warn` (RFC 7234 code 299, agent "-")."""
    escaped = f'unknown field "{path}"'.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{escaped}"'


# --- defaulting -----------------------------------------------------------------------------


def _default_container(container: dict) -> None:
    # core/v1 defaults.go SetDefaults_Container: the pull policy from the tag (Always for :latest or none).
    if not container.get("imagePullPolicy"):
        image = container.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition("@")[0].rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else "latest"
        container["imagePullPolicy"] = "Always" if tag == "latest" else "IfNotPresent"
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    for port in container.get("ports") or []:
        port.setdefault("protocol", "TCP")  # SetDefaults_ContainerPort
    for env in container.get("env") or []:
        field_ref = (env.get("valueFrom") or {}).get("fieldRef")
        if field_ref is not None:
            field_ref.setdefault("apiVersion", "v1")  # SetDefaults_ObjectFieldSelector
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if isinstance(container.get(probe), dict):  # SetDefaults_Probe
            for key, value in (("timeoutSeconds", 1), ("periodSeconds", 10), ("successThreshold", 1), ("failureThreshold", 3)):
                container[probe].setdefault(key, value)


def _default_pod_spec(spec: dict) -> None:
    # core/v1 defaults.go SetDefaults_PodSpec (a template's too).
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("schedulerName", "default-scheduler")
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        _default_container(container)
    for volume in spec.get("volumes") or []:
        # SetDefaults_SecretVolumeSource / ConfigMapVolumeSource / ProjectedVolumeSource: mode 0644.
        for source in ("secret", "configMap", "projected"):
            if isinstance(volume.get(source), dict):
                volume[source].setdefault("defaultMode", 0o644)


def _default_job(job: dict) -> None:
    spec = job.setdefault("spec", {})
    # batch/v1 defaults.go SetDefaults_Job.
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("backoffLimit", 6)
    template_labels = (spec.get("template") or {}).get("metadata", {}).get("labels")
    if template_labels and not (job.get("metadata") or {}).get("labels"):
        job.setdefault("metadata", {})["labels"] = dict(template_labels)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("manualSelector", False)
    # JobPodReplacementPolicy (beta, on, since 1.29): Failed when a podFailurePolicy is set.
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    _default_pod_spec(spec.setdefault("template", {}).setdefault("spec", {}))


def _generate_job_selector(job: dict) -> None:
    # registry/batch/job/strategy.go generateSelector (manualSelector false): both job-name and both
    # controller-uid labels on the template; the selector matches batch.kubernetes.io/controller-uid.
    meta, spec = job["metadata"], job["spec"]
    if spec.get("manualSelector"):
        return
    labels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
    for key in ("job-name", "batch.kubernetes.io/job-name"):
        labels.setdefault(key, meta["name"])
    for key in ("controller-uid", "batch.kubernetes.io/controller-uid"):
        labels.setdefault(key, meta["uid"])
    selector = spec.setdefault("selector", {})
    selector.setdefault("matchLabels", {}).setdefault("batch.kubernetes.io/controller-uid", meta["uid"])


def defaulted(body: dict, kind: str) -> dict:
    """`body` as the API server stores it on create (`metadata.uid` and `name` already set)."""
    out = copy.deepcopy(body)
    if kind == "Job":
        _default_job(out)
        _generate_job_selector(out)
    elif kind == "Pod":
        _default_pod_spec(out.setdefault("spec", {}))
        out["spec"].setdefault("enableServiceLinks", True)  # SetDefaults_Pod
    elif kind == "PersistentVolumeClaim":
        out.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")  # SetDefaults_PersistentVolumeClaimSpec
    elif kind == "Secret":
        out.setdefault("type", "Opaque")  # SetDefaults_Secret
    return out


# --- validation -----------------------------------------------------------------------------

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


@dataclass(frozen=True)
class Cause:
    """One entry of a 422's `details.causes` (field.Error): reason FieldValueInvalid, its message and field."""

    field: str
    value: str
    detail: str

    @property
    def message(self) -> str:
        return f'Invalid value: "{self.value}": {self.detail}'

    def as_status_cause(self) -> dict:
        return {"reason": "FieldValueInvalid", "message": self.message, "field": self.field}


def _label_value(value: str) -> list[str]:
    # apimachinery util/validation IsValidLabelValue.
    found = []
    if len(value) > 63:
        found.append("must be no more than 63 characters")
    if not _LABEL_VALUE.fullmatch(value):
        found.append(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
            "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        )
    return found


def _label_key(key: str) -> list[str]:
    # IsQualifiedName: an optional DNS-subdomain prefix and a name of at most 63 characters.
    prefix, _, name = key.rpartition("/")
    found = []
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        found.append("prefix part must be a DNS-1123 subdomain")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        found.append("name part must consist of alphanumeric characters, '-', '_' or '.', at most 63 characters")
    return found


def _labels(labels: dict | None, field: str) -> list[Cause]:
    # ValidateLabels reports each problem at the map's path, with the offending key or value.
    causes = []
    for key, value in (labels or {}).items():
        causes += [Cause(field, key, d) for d in _label_key(key)]
        causes += [Cause(field, str(value), d) for d in _label_value(str(value))]
    return causes


def invalid(body: dict, kind: str) -> list[Cause]:
    """The validation errors of a (defaulted) body, in the order the API server reports them."""
    meta = body.get("metadata") or {}
    name = meta.get("name", "")
    causes = []
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        causes.append(Cause("metadata.name", name, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                                                    "characters, '-' or '.', and must start and end with an alphanumeric character"))  # fmt: skip
    causes += _labels(meta.get("labels"), "metadata.labels")
    if kind == "Job":
        template = (body.get("spec") or {}).get("template") or {}
        causes += _labels((template.get("metadata") or {}).get("labels"), "spec.template.labels")
        if (template.get("spec") or {}).get("restartPolicy") not in ("Never", "OnFailure"):
            # batch validation: a Job's pods may not restart Always.
            causes.append(Cause("spec.template.spec.restartPolicy", str((template.get("spec") or {}).get("restartPolicy")),
                                'supported values: "OnFailure", "Never"'))  # fmt: skip
    return list(dict.fromkeys(causes))  # field.ErrorList.ToAggregate drops duplicates


def invalid_message(kind: str, group: str, name: str, causes: list[Cause]) -> str:
    """`Job.batch "x" is invalid: spec.template.labels: Invalid value: ...` (brackets around several)."""
    qualified = f"{kind}.{group}" if group else kind
    errors = [f"{c.field}: {c.message}" for c in causes]
    joined = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    return f'{qualified} "{name}" is invalid: {joined}'
