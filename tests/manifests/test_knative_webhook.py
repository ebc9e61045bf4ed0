"""Knative's webhook admits every object we ship, under the feature flags our manifests set.

The rules (tests/manifests/knative_webhook.py) come from knative/serving and knative/eventing
at the tags in versions.py. The flags are upstream's defaults unless knative/ or eventing/
ship a `config-features` ConfigMap in knative-serving: a manifest that needs a flag is a
failure here until we ship the flag. Every rule also rejects a crafted object, so the
checker can fail; and the README's advice for the immutable Broker class is checked.
"""

from __future__ import annotations

import copy
import re

import pytest

from tests.manifests import ROOT, Doc, documents, one
from tests.manifests import knative_webhook as webhook

DOCS = documents()
CONFIG = webhook.Config.from_documents([d.body for d in DOCS])
CHECKED = [d for d in DOCS if d.kind in ("Service", "Broker", "Trigger") and d.api_version.endswith(".knative.dev/v1")]


def test_the_checker_sees_our_knative_objects():
    kinds = {(d.api_version, d.kind) for d in CHECKED}
    assert kinds == {("serving.knative.dev/v1", "Service"), ("eventing.knative.dev/v1", "Broker"), ("eventing.knative.dev/v1", "Trigger")}


def test_we_ship_no_config_features_so_upstream_defaults_apply():
    """If this changes, the README must tell operators to apply it (the flags are cluster-wide)."""
    assert CONFIG.features == webhook.DEFAULT_FEATURES
    assert CONFIG.defaults == webhook.DEFAULT_DEFAULTS


@pytest.mark.parametrize("doc", CHECKED, ids=lambda d: d.id)
def test_knative_webhook_admits_what_we_ship(doc: Doc):
    assert webhook.check(doc.body, CONFIG) == []


def test_the_stream_timeout_is_knatives_ceiling():
    """knative/stream.yaml's timeoutSeconds is the longest an SSE request lives: exactly the
    default max-revision-timeout-seconds (README "stream"); more would be refused."""
    stream = one(DOCS, "Service", "serving.knative.dev", "stream").body
    assert stream["spec"]["template"]["spec"]["timeoutSeconds"] == int(CONFIG.defaults["max-revision-timeout-seconds"])


def test_the_stream_ends_its_responses_before_knative_cuts_them():
    """An SSE response is ended cleanly by the stream at DOCKYARD_STREAM_MAX_SECONDS (README "Settings"),
    before the revision's timeoutSeconds; the response-start timer Knative defaults (300 s) is met at once
    (the stream sends its headers when it opens)."""
    from functions.core.settings import Settings

    stream = one(DOCS, "Service", "serving.knative.dev", "stream").body["spec"]["template"]["spec"]
    timeouts = webhook.revision_timeouts(stream, CONFIG)
    assert timeouts == {"timeoutSeconds": 600, "idleTimeoutSeconds": None, "responseStartTimeoutSeconds": 300}
    assert Settings().stream_max_seconds < timeouts["timeoutSeconds"]


def test_the_functions_run_under_the_default_revision_timeout():
    """No function sets timeoutSeconds: each request is cut at revision-timeout-seconds (300 s)."""
    for name in ("task-submitted", "job-finished", "snapshot-due", "task-command", "dead-letter"):
        spec = one(DOCS, "Service", "serving.knative.dev", name).body["spec"]["template"]["spec"]
        assert webhook.revision_timeouts(spec, CONFIG)["timeoutSeconds"] == 300, name


def test_the_readme_asks_for_no_knative_feature_flag():
    """The flags are cluster-wide (config-features in knative-serving): if the README ever asked for one,
    this checker must read it from a ConfigMap we ship (Config.from_documents), not assume the default."""
    readme = (ROOT / "README.md").read_text()
    assert "config-features" not in readme and "kubernetes.podspec-" not in readme


# ---- each rule rejects a crafted object ---------------------------------------------------


def _service(name: str = "stream") -> dict:
    return copy.deepcopy(one(DOCS, "Service", "serving.knative.dev", name).body)


def _pod(body: dict) -> dict:
    return body["spec"]["template"]["spec"]


def _container(body: dict) -> dict:
    return _pod(body)["containers"][0]


def _refused(body: dict, config: webhook.Config = CONFIG) -> list[str]:
    found = webhook.check(body, config)
    assert found, "the webhook would admit this object"
    return found


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("securityContext", {"fsGroup": 1000}, "kubernetes.podspec-securitycontext"),
        ("nodeSelector", {"disk": "ssd"}, "kubernetes.podspec-nodeselector"),
        ("tolerations", [{"key": "k", "operator": "Exists"}], "kubernetes.podspec-tolerations"),
        ("affinity", {}, "kubernetes.podspec-affinity"),
        ("runtimeClassName", "gvisor", "kubernetes.podspec-runtimeclassname"),
        ("dnsPolicy", "None", "kubernetes.podspec-dnspolicy"),
        ("priorityClassName", "high", "kubernetes.podspec-priorityclassname"),
        ("schedulerName", "other", "kubernetes.podspec-schedulername"),
        ("hostNetwork", True, "kubernetes.podspec-hostnetwork"),
        ("shareProcessNamespace", True, "kubernetes.podspec-shareprocessnamespace"),
    ],
)
def test_a_flagged_pod_spec_field_is_refused_until_its_flag_is_on(field, value, flag):
    body = _service()
    _pod(body)[field] = value
    assert f"spec.template.spec.{field}: must not set the field(s)" in _refused(body)
    assert webhook.check(body, webhook.Config({flag: "enabled"})) == []


@pytest.mark.parametrize("field", ["restartPolicy", "activeDeadlineSeconds", "nodeName", "hostname", "terminationGracePeriodSeconds"])
def test_a_pod_spec_field_knative_owns_is_always_refused(field):
    body = _service()
    _pod(body)[field] = "x"
    everything = webhook.Config({flag: "enabled" for flag in webhook.DEFAULT_FEATURES})
    assert f"spec.template.spec.{field}: must not set the field(s)" in _refused(body, everything)


def test_automount_token_may_only_be_turned_off():
    body = _service()
    assert _pod(body)["automountServiceAccountToken"] is False
    _pod(body)["automountServiceAccountToken"] = True
    assert _refused(body) == ["spec.template.spec.automountServiceAccountToken: must not set the field(s)"]


def test_pod_security_context_under_secure_pod_defaults_keeps_only_seccomp():
    body = _service()
    _pod(body)["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}}
    assert webhook.check(body, webhook.Config({"secure-pod-defaults": "enabled"})) == []
    _pod(body)["securityContext"]["runAsUser"] = 1000
    assert "spec.template.spec.securityContext.runAsUser: must not set the field(s)" in _refused(body, webhook.Config({"secure-pod-defaults": "enabled"}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("lifecycle", {"preStop": {"exec": {"command": ["true"]}}}), ("stdin", True), ("tty", True), ("volumeDevices", [])],
)
def test_a_container_field_outside_the_mask_is_refused(field, value):
    body = _service()
    _container(body)[field] = value
    assert _refused(body) == [f"spec.template.spec.containers[0].{field}: must not set the field(s)"]


def test_adding_capabilities_needs_its_flag_and_secure_pod_defaults_allows_net_bind_service_only():
    body = _service()
    _container(body)["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert _refused(body) == ["spec.template.spec.containers[0].securityContext.capabilities.add: must not set the field(s)"]
    assert webhook.check(body, webhook.Config({"secure-pod-defaults": "enabled"})) == []
    _container(body)["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    assert _refused(body, webhook.Config({"secure-pod-defaults": "enabled"}))
    assert webhook.check(body, webhook.Config({"kubernetes.containerspec-addcapabilities": "enabled"})) == []


@pytest.mark.parametrize(("field", "value"), [("privileged", True), ("procMount", "Unmasked"), ("seLinuxOptions", {"level": "s0"})])
def test_container_security_context_fields_outside_the_mask_are_refused(field, value):
    body = _service()
    _container(body)["securityContext"][field] = value
    assert _refused(body) == [f"spec.template.spec.containers[0].securityContext.{field}: must not set the field(s)"]


def test_privileged_false_is_allowed():
    body = _service()
    _container(body)["securityContext"]["privileged"] = False
    assert webhook.check(body, CONFIG) == []


def test_run_as_user_out_of_range_is_refused():
    body = _service()
    _container(body)["securityContext"]["runAsUser"] = 2**31
    assert _refused(body) == [f"spec.template.spec.containers[0].securityContext.runAsUser: expected 0 <= {2**31} <= {2**31 - 1}"]


@pytest.mark.parametrize("timeout", [601, -1])
def test_timeout_seconds_beyond_max_revision_timeout_is_refused(timeout):
    body = _service()
    _pod(body)["timeoutSeconds"] = timeout
    assert _refused(body) == [f"spec.template.spec.timeoutSeconds: expected 0 <= {timeout} <= 600"]
    if timeout > 0:  # an operator who raises the cluster's ceiling may raise ours (README "stream")
        assert webhook.check(body, webhook.Config(defaults={"max-revision-timeout-seconds": "900"})) == []


def test_container_concurrency_above_the_limit_is_refused():
    body = _service()
    _pod(body)["containerConcurrency"] = 1001
    assert _refused(body) == ["spec.template.spec.containerConcurrency: expected 0 <= 1001 <= 1000"]


@pytest.mark.parametrize("name", ["PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"])
def test_reserved_env_vars_are_refused(name):
    body = _service()
    _container(body)["env"].append({"name": name, "value": "1"})
    assert _refused(body) == [f'spec.template.spec.containers[0].env[{len(_container(body)["env"]) - 1}].name: "{name}" is a reserved environment variable']


def test_reserved_container_name_is_refused():
    body = _service()
    _container(body)["name"] = "queue-proxy"
    assert _refused(body) == ['spec.template.spec.containers[0].name: "queue-proxy" is a reserved container name']


def test_field_ref_in_env_needs_its_flag():
    body = _service()
    _container(body)["env"].append({"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    assert _refused(body) == [f"spec.template.spec.containers[0].env[{len(_container(body)['env']) - 1}].valueFrom.fieldRef: must not set the field(s)"]
    assert webhook.check(body, webhook.Config({"kubernetes.podspec-fieldref": "enabled"})) == []


@pytest.mark.parametrize(
    ("source", "flag"),
    [
        ({"hostPath": {"path": "/var"}}, "kubernetes.podspec-volumes-hostpath"),
        ({"persistentVolumeClaim": {"claimName": "c", "readOnly": True}}, "kubernetes.podspec-persistent-volume-claim"),
        ({"csi": {"driver": "d"}}, "kubernetes.podspec-volumes-csi"),
        ({"emptyDir": {}}, "kubernetes.podspec-volumes-emptydir"),
    ],
)
def test_a_volume_source_needs_its_flag(source, flag):
    body = _service()
    _pod(body)["volumes"].append({"name": "extra", **source})
    _container(body)["volumeMounts"].append({"name": "extra", "mountPath": "/extra"})
    assert _refused(body, webhook.Config({flag: "disabled"}))
    assert webhook.check(body, webhook.Config({flag: "enabled"})) == []


def test_a_writable_persistent_volume_claim_needs_the_write_flag():
    body = _service()
    _pod(body)["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "c"}})
    _container(body)["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    config = webhook.Config({"kubernetes.podspec-persistent-volume-claim": "enabled"})
    assert "Persistent volume write support is disabled" in _refused(body, config)[0]
    assert webhook.check(body, webhook.Config({"kubernetes.podspec-persistent-volume-claim": "enabled", "kubernetes.podspec-persistent-volume-write": "enabled"})) == []


def test_an_unmounted_volume_and_a_mount_without_volume_are_refused():
    body = _service()
    _pod(body)["volumes"].append({"name": "orphan", "secret": {"secretName": "s"}})
    _container(body)["volumeMounts"].append({"name": "ghost", "mountPath": "/ghost"})
    found = _refused(body)
    assert f'spec.template.spec.volumes[{len(_pod(body)["volumes"]) - 1}].name: volume with name "orphan" not mounted' in found
    assert f"spec.template.spec.containers[0].volumeMounts[{len(_container(body)['volumeMounts']) - 1}].name: volumeMount has no matching volume" in found


def test_mount_propagation_needs_its_flag():
    body = _service()
    _container(body)["volumeMounts"][0]["mountPropagation"] = "HostToContainer"
    assert _refused(body) == ["spec.template.spec.containers[0].volumeMounts[0].mountPropagation: must not set the field(s)"]


def test_init_containers_need_their_flag():
    body = _service()
    _pod(body)["initContainers"] = [{"name": "init", "image": "busybox"}]
    assert "spec.template.spec: pod spec support for init-containers is off, but found 1 init containers" in _refused(body)


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"containerPort": 8012}, "spec.template.spec.containers[0].ports[0].containerPort: 8012 is a reserved port"),
        ({"containerPort": 8080, "name": "web"}, "spec.template.spec.containers[0].ports[0]: Port name web is not allowed"),
        ({"containerPort": 8080, "hostPort": 80}, "spec.template.spec.containers[0].ports[0].hostPort: must not set the field(s)"),
        ({"containerPort": 8080, "protocol": "UDP"}, "spec.template.spec.containers[0].ports[0].protocol: invalid value: UDP"),
    ],
)
def test_the_serving_port_rules(port, expected):
    body = _service()
    _container(body)["ports"] = [port]
    assert _refused(body) == [expected]


def test_probe_rules():
    body = _service()
    probe = _container(body)["readinessProbe"]
    probe["httpGet"]["port"] = "metrics"
    assert _refused(body) == ["spec.template.spec.containers[0].readinessProbe.httpGet.port: Probe port must match container port"]
    probe["httpGet"].pop("port")
    probe["failureThreshold"] = 3  # with periodSeconds unset (0): Knative's own aggressive probe
    assert _refused(body) == ["spec.template.spec.containers[0].readinessProbe.failureThreshold: failureThreshold is disallowed when periodSeconds is zero"]
    probe["periodSeconds"] = 5
    assert webhook.check(body, CONFIG) == []
    probe["timeoutSeconds"] = -1
    assert _refused(body) == ["spec.template.spec.containers[0].readinessProbe.timeoutSeconds: expected 1 <= -1"]
    del probe["timeoutSeconds"]
    probe["exec"] = {"command": ["true"]}
    assert "expected exactly one of" in _refused(body)[0]


def test_a_flag_set_in_a_shipped_config_features_is_read():
    config = webhook.Config.from_documents(
        [{"kind": "ConfigMap", "metadata": {"name": "config-features", "namespace": "knative-serving"}, "data": {"kubernetes.podspec-nodeselector": "Enabled"}}]
    )
    body = _service()
    _pod(body)["nodeSelector"] = {"disk": "ssd"}
    assert webhook.check(body, config) == []


# ---- Broker and Trigger: updates ----------------------------------------------------------


def _broker() -> dict:
    return copy.deepcopy(one(DOCS, "Broker", "eventing.knative.dev", "default").body)


def _trigger() -> dict:
    return copy.deepcopy(one(DOCS, "Trigger", "eventing.knative.dev", "job-finished").body)


def test_a_broker_without_a_class_is_refused():
    body = _broker()
    del body["metadata"]["annotations"][webhook.BROKER_CLASS]
    assert _refused(body) == [f"metadata.annotations.{webhook.BROKER_CLASS}: missing field(s)"]


def test_changing_the_broker_class_is_refused_as_an_update():
    original, body = _broker(), _broker()
    body["metadata"]["annotations"][webhook.BROKER_CLASS] = "NatsJetStreamBroker"
    assert webhook.check(body, CONFIG) == []  # a new Broker of that class is fine
    assert webhook.check(body, CONFIG, original) == ["annotations: Immutable annotations changed (-old +new)"]


def test_a_broker_update_may_change_delivery_only():
    original, body = _broker(), _broker()
    body["spec"]["delivery"]["retry"] = 9
    assert webhook.check(body, CONFIG, original) == []
    body["spec"]["config"]["name"] = "another-channel"
    assert webhook.check(body, CONFIG, original) == ["spec: Immutable fields changed (-old +new)"]


def test_changing_a_triggers_broker_is_refused_as_an_update():
    original, body = _trigger(), _trigger()
    body["spec"]["broker"] = "other"
    assert webhook.check(body, CONFIG) == []
    assert webhook.check(body, CONFIG, original) == ["spec.broker: Immutable fields changed (-old +new)"]
    body = _trigger()
    body["spec"]["filter"]["attributes"]["type"] = "dev.dockyard.other"
    assert webhook.check(body, CONFIG, original) == []


def test_a_trigger_needs_exactly_one_of_broker_and_broker_ref():
    body = _trigger()
    body["spec"]["brokerRef"] = {"name": "default"}
    assert _refused(body) == ["spec: expected exactly one, got both or neither: broker, brokerRef"]


def test_the_readme_says_to_delete_and_recreate_to_change_the_broker_class():
    """Defect 6: `kubectl apply` of a new class is refused (above); the README must say so."""
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    assert "A Broker's class is immutable: to switch, delete the Broker and apply `eventing/broker.yaml` again" in readme
