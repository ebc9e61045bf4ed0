"""Every custom object of knative/ and eventing/ is valid against the upstream CRD of its kind.

The CRDs are vendored in tests/manifests/schemas/ at the tags pinned in tests/manifests/versions.py
(sources in schemas/README.md). Validation is strict: a wrong type, a missing required field or a
field the structural schema would prune (crd_schema.pruned_fields) is a failure.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.manifests import ROOT, Doc, documents, one
from tests.manifests import versions
from tests.manifests.crd_schema import SCHEMA_DIR, load_crds, problems, pruned_fields

CRDS = load_crds()


def _custom_group(group: str) -> bool:
    """Not a group the API server ships (core "", apps, batch, *.k8s.io)."""
    return "." in group and not group.endswith(".k8s.io")


DOCS = documents()
NOT_CLUSTER_OBJECTS = {("kustomize.config.k8s.io/v1beta1", "Kustomization")}  # read by kubectl, never applied
CUSTOM = [
    d
    for d in DOCS
    if (d.api_version, d.kind) not in NOT_CLUSTER_OBJECTS
    and ((d.api_version, d.kind) in CRDS or _custom_group(d.api_version.rpartition("/")[0]))
]

# The custom kinds dockyard ships; a new one needs its CRD vendored.
SHIPPED_KINDS = {
    ("serving.knative.dev/v1", "Service"),
    ("eventing.knative.dev/v1", "Broker"),
    ("eventing.knative.dev/v1", "Trigger"),
    ("sources.knative.dev/v1", "PingSource"),
    ("sources.knative.dev/v1", "ApiServerSource"),
}


def test_every_shipped_custom_kind_has_a_vendored_crd():
    shipped = {(d.api_version, d.kind) for d in CUSTOM}
    assert shipped == SHIPPED_KINDS, f"custom kinds changed: {sorted(shipped ^ SHIPPED_KINDS)}"
    assert shipped <= set(CRDS), f"vendor the CRDs of {sorted(shipped - set(CRDS))} in {SCHEMA_DIR}"


@pytest.mark.parametrize("doc", CUSTOM, ids=lambda d: d.id)
def test_custom_object_is_valid_against_its_upstream_crd(doc: Doc):
    found = problems(doc.body, CRDS)
    assert not found, f"{doc.id} ({CRDS.get((doc.api_version, doc.kind)) and CRDS[(doc.api_version, doc.kind)].file}):\n  " + "\n  ".join(found)


# ---- the validator can fail ---------------------------------------------------------------


def _trigger() -> dict:
    return copy.deepcopy(one(DOCS, "Trigger", "eventing.knative.dev", "job-finished").body)


def _service() -> dict:
    return copy.deepcopy(one(DOCS, "Service", "serving.knative.dev", "job-finished").body)


def test_an_unknown_field_under_a_trigger_subscriber_is_caught():
    body = _trigger()
    body["spec"]["subscriber"]["url"] = "http://job-finished.dockyard.svc"  # the field is `uri`
    assert problems(body, CRDS) == ["spec.subscriber.url: unknown field (the structural schema prunes it)"]


def test_trigger_spec_itself_keeps_unknown_fields_as_upstream_says():
    """Upstream marks Trigger.spec x-kubernetes-preserve-unknown-fields (for experimental features),
    so the API server keeps an unknown field there and so does the walk; its declared children
    (subscriber, brokerRef) have no such mark and are pruned strictly."""
    body = _trigger()
    body["spec"]["experimental"] = True
    assert problems(body, CRDS) == []


def test_an_unknown_field_in_a_knative_container_is_caught():
    """Knative's Service CRD lists the pod-spec fields it knows (feature-flagged ones included);
    anything else is pruned."""
    body = _service()
    body["spec"]["template"]["spec"]["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": ["true"]}}}
    body["spec"]["template"]["spec"]["containerz"] = []
    found = pruned_fields(body, CRDS[("serving.knative.dev/v1", "Service")].schema)
    assert found == ["spec.template.spec.containers.0.lifecycle", "spec.template.spec.containerz"], found


def test_unknown_fields_in_the_root_metadata_are_caught():
    body = _trigger()
    body["metadata"]["label"] = {"app": "x"}
    assert "metadata.label: unknown field (the structural schema prunes it)" in problems(body, CRDS)


def test_preserve_unknown_fields_keeps_what_it_says():
    """Trigger.spec.filter.attributes has x-kubernetes-preserve-unknown-fields: any key is kept."""
    body = _trigger()
    body["spec"].setdefault("filter", {}).setdefault("attributes", {})["anyextension"] = "value"
    assert problems(body, CRDS) == []


def test_a_wrong_type_is_caught():
    body = _trigger()
    body["spec"]["broker"] = 7
    assert problems(body, CRDS) == ["spec.broker: 7 is not of type 'string'"]


def test_a_missing_required_field_is_caught():
    source = copy.deepcopy(one(DOCS, "ApiServerSource", "sources.knative.dev").body)
    del source["spec"]["resources"]
    service = _service()
    del service["spec"]["template"]["spec"]["containers"]
    del service["metadata"]["name"]
    assert problems(source, CRDS) == ["spec: 'resources' is a required property"]
    assert problems(service, CRDS) == [
        "spec.template.spec: 'containers' is a required property",
        "metadata.name: required",
    ]


def test_an_unknown_kind_or_version_is_a_problem():
    body = _trigger()
    body["apiVersion"] = "eventing.knative.dev/v2"
    assert problems(body, CRDS) == ["no vendored CRD for eventing.knative.dev/v2 Trigger (add it to tests/manifests/schemas/)"]


# ---- the pinned versions agree with the README and the vendored CRDs ------------------------


def test_the_readme_installs_the_pinned_knative():
    readme = (ROOT / "README.md").read_text()
    exported = re.findall(r"^export KNATIVE=(\S+)", readme, re.MULTILINE)
    assert exported == [versions.KNATIVE], exported
    assert f"knative-{versions.KNATIVE}" == versions.KNATIVE_SERVING == versions.KNATIVE_EVENTING == versions.EVENTING_NATSS


def test_the_schema_readme_names_the_pinned_tags_and_every_file():
    readme = (SCHEMA_DIR / "README.md").read_text()
    assert versions.KNATIVE_SERVING in readme and versions.KNATIVE_EVENTING in readme
    for crd in {c.file for c in CRDS.values()}:
        assert f"`{crd}`" in readme, f"schemas/README.md does not name the source of {crd}"
    assert (SCHEMA_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_the_vendored_crds_are_the_upstream_files():
    """Vendored verbatim: each is a CustomResourceDefinition with Knative's copyright header."""
    for path in sorted(SCHEMA_DIR.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# Copyright") and "The Knative Authors" in text.splitlines()[0], path.name
        (crd,) = [d for d in yaml.safe_load_all(text) if d]
        assert crd["kind"] == "CustomResourceDefinition", path.name


def test_the_broker_channel_template_is_a_channel_the_pinned_eventing_natss_serves():
    """MTChannelBasedBroker creates its channel from the ConfigMap its spec.config names: the key
    `channel-template-spec` holds apiVersion, kind and an optional spec (knative/eventing
    pkg/apis/messaging/v1 ChannelTemplateSpec). That channel must be valid against eventing-natss's CRD."""
    broker = one(DOCS, "Broker", "eventing.knative.dev", "default").body
    ref = broker["spec"]["config"]
    configmap = one(DOCS, "ConfigMap", "", ref["name"])
    assert (ref["kind"], configmap.namespace) == ("ConfigMap", ref["namespace"])
    template = yaml.safe_load(configmap.body["data"]["channel-template-spec"])
    assert set(template) <= {"apiVersion", "kind", "spec"}, template
    channel = {**template, "metadata": {"name": "default-kne-trigger", "namespace": broker["metadata"]["namespace"]}}
    assert problems(channel, CRDS) == []
    assert CRDS[(template["apiVersion"], template["kind"])].file == "eventing-natss-jetstream-channel.yaml"
