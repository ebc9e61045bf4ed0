"""The manifests fit together, and fit the code.

Event types, labels and namespaces come from agent/contract.py; every Trigger
reaches a function that exists; the local broker (functions/broker.py) routes
exactly as the cluster does; the settings ConfigMap holds only variables the
code reads; the NetworkPolicy admits the pods and ports the settings name.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import yaml

from agent import contract
from functions.devstack.broker import routes_from_manifests
from functions.main import HANDLERS
from functions.core.settings import Settings
from tests.manifests import (
    EVENTING_DIR,
    KNATIVE_DIR,
    ROOT,
    documents,
    find,
    knative_services,
    one,
    pod_template,
    rendered_jobs,
    rendered_manifests,
    settings_env,
)

DOCS = documents()
KNATIVE = documents(KNATIVE_DIR)
EVENTING = documents(EVENTING_DIR)
TRIGGERS = find(EVENTING, "Trigger", "eventing.knative.dev")
EVENT_TYPES = {contract.EVENT_TASK_SUBMITTED, contract.EVENT_TASK_COMMAND, contract.EVENT_JOB_UPDATE, contract.EVENT_PING}
FUNCTION_SERVICES = {name: d for name, d in knative_services(KNATIVE).items() if name != "stream"}
SECRETS = [d for d in yaml.safe_load_all((KNATIVE_DIR / "secrets.example.yaml").read_text()) if d]


def _container(doc) -> dict:
    containers = pod_template(doc.body)["spec"]["containers"]
    assert len(containers) == 1, f"{doc.id}: expected one container"
    return containers[0]


def function_target(service_doc) -> str | None:
    env = {e["name"]: e.get("value") for e in _container(service_doc).get("env") or []}
    return env.get("FUNCTION_TARGET")


def cluster_routes() -> dict[str, tuple[dict, str]]:
    """Trigger name -> (filter attributes, FUNCTION_TARGET of its subscriber Service)."""
    routes = {}
    for trigger in TRIGGERS:
        ref = trigger.body["spec"]["subscriber"]["ref"]
        service = FUNCTION_SERVICES[ref["name"]]
        routes[trigger.name] = (trigger.body["spec"]["filter"]["attributes"], function_target(service))
    return routes


def _matches(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "extend _matches for matchExpressions"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _namespace_of(peer: dict) -> str | None:
    return ((peer.get("namespaceSelector") or {}).get("matchLabels") or {}).get("kubernetes.io/metadata.name")


# --- eventing ----------------------------------------------------------------------


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda d: d.name)
def test_trigger_filters_a_contract_type_and_reaches_a_knative_service(trigger):
    spec = trigger.body["spec"]
    assert spec["filter"]["attributes"]["type"] in EVENT_TYPES, f"{trigger.id}: type is not one of agent/contract.py's"
    ref = spec["subscriber"]["ref"]
    assert (ref["apiVersion"], ref["kind"]) == ("serving.knative.dev/v1", "Service")
    assert ref["name"] in FUNCTION_SERVICES, f"{trigger.id}: no Knative Service {ref['name']!r} in knative/"
    assert ref.get("namespace", trigger.namespace) == FUNCTION_SERVICES[ref["name"]].namespace
    broker = one(EVENTING, "Broker", "eventing.knative.dev")
    assert (spec["broker"], trigger.namespace) == (broker.name, broker.namespace)


def test_every_function_has_exactly_one_trigger():
    targets = [target for _, target in cluster_routes().values()]
    assert sorted(targets) == sorted(HANDLERS), f"Triggers reach {sorted(targets)}; functions/main.py has {sorted(HANDLERS)}"


def test_every_function_service_runs_a_function_of_main():
    for service in FUNCTION_SERVICES.values():
        assert function_target(service) in HANDLERS, f"{service.id}: FUNCTION_TARGET is not in functions/main.py"
    assert set(knative_services(KNATIVE)) == {s.replace("_", "-") for s in HANDLERS} | {"stream"}


def test_the_local_broker_routes_like_the_cluster():
    local = {r.trigger: (r.attributes, r.function) for r in routes_from_manifests(EVENTING_DIR)}
    assert local == cluster_routes()


def test_dead_letters_go_to_a_service_that_exists():
    services = knative_services(DOCS)
    specs = [one(EVENTING, "Broker").body["spec"]] + [t.body["spec"] for t in TRIGGERS]
    for spec in specs:
        ref = spec["delivery"]["deadLetterSink"]["ref"]
        assert (ref["kind"], ref["name"]) == ("Service", "dead-letter") and ref["name"] in services


@pytest.mark.parametrize("kind", ["PingSource", "ApiServerSource"])
def test_sources_sink_to_the_broker(kind):
    source = one(EVENTING, kind, "sources.knative.dev")
    broker = one(EVENTING, "Broker", "eventing.knative.dev")
    ref = source.body["spec"]["sink"]["ref"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("eventing.knative.dev/v1", "Broker", broker.name)
    assert ref.get("namespace", source.namespace) == broker.namespace


def test_the_apiserversource_watches_the_agents_jobs_by_the_contract_label():
    source = one(EVENTING, "ApiServerSource", "sources.knative.dev").body["spec"]
    assert source["mode"] == "Resource"  # job_finished needs the whole Job
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": contract.AGENTS_NAMESPACE}
    [resource] = source["resources"]
    assert (resource["apiVersion"], resource["kind"]) == ("batch/v1", "Job")
    assert resource["selector"]["matchLabels"] == {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
    for manifests in rendered_manifests().values():
        assert _matches(resource["selector"], manifests[0]["metadata"]["labels"])


# --- services and settings ------------------------------------------------------------


def test_function_services_share_image_account_and_settings():
    accounts = {d.name for d in find(KNATIVE, "ServiceAccount", "", None) if d.namespace == contract.FUNCTIONS_NAMESPACE}
    configmaps = {d.name for d in find(KNATIVE, "ConfigMap", "")}
    images = set()
    for name, service in knative_services(KNATIVE).items():
        spec = pod_template(service.body)["spec"]
        container = _container(service)
        images.add(container["image"])
        assert service.namespace == contract.FUNCTIONS_NAMESPACE
        assert spec["serviceAccountName"] in accounts
        assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["dockyard-settings"]
        assert "dockyard-settings" in configmaps
        expected_account = "dockyard-stream" if name == "stream" else "dockyard-functions"
        assert spec["serviceAccountName"] == expected_account, service.id
    assert len(images) == 1, f"one functions image for all Services, found {images}"


def test_the_stream_stays_up_for_long_streams():
    stream = knative_services(KNATIVE)["stream"].body["spec"]["template"]
    annotations = stream["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "1"
    assert annotations["autoscaling.knative.dev/max-scale"] == "1"  # one tracker per deployment
    assert 300 <= stream["spec"]["timeoutSeconds"] <= 600  # Knative's default max-revision-timeout-seconds
    assert stream["spec"]["containers"][0]["command"] == ["python", "-m", "functions.stream"]  # with the tracker


def test_the_settings_configmap_holds_only_variables_the_model_defines():
    unknown = sorted(set(settings_env()) - set(Settings.variables().values()))
    assert not unknown, f"knative/settings.yaml sets variables the settings model does not define (typos?): {unknown}"


def test_the_settings_configmap_is_accepted_by_the_settings_model():
    settings = Settings.from_env(settings_env())
    assert settings.runtime == "kubernetes"
    assert settings.store.startswith("s3://")
    assert settings.namespace == contract.AGENTS_NAMESPACE
    assert settings.storage_class == "local-path"


def test_the_nats_default_is_where_the_cluster_deploys_nats():
    assert settings_env()["DOCKYARD_NATS_URL"] == Settings.default("nats_url")


# --- the agents' pods ---------------------------------------------------------------------


def test_agent_jobs_land_in_the_restricted_namespace_with_the_tokenless_account():
    namespace = one(KNATIVE, "Namespace", "", contract.AGENTS_NAMESPACE).body
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    account = one(KNATIVE, "ServiceAccount", "", "dockyard-agent")
    assert account.namespace == contract.AGENTS_NAMESPACE and account.body["automountServiceAccountToken"] is False
    bound = [s for rb in find(DOCS, "RoleBinding") + find(DOCS, "ClusterRoleBinding") for s in rb.body["subjects"]]
    assert not [s for s in bound if s["name"] == "dockyard-agent"], "the agent's account must have no RBAC"
    for job, *owned in rendered_manifests().values():
        assert {m["metadata"]["namespace"] for m in [job, *owned]} == {contract.AGENTS_NAMESPACE}
        assert pod_template(job)["spec"]["serviceAccountName"] == account.name


def test_the_secrets_the_pods_mount_have_templates():
    templates = {(s["metadata"]["namespace"], s["metadata"]["name"]): set(s["stringData"]) for s in SECRETS}
    for job, *owned in rendered_manifests().values():
        # The Job's own Secret (NATS credentials) is rendered with it; every other one has a template.
        own = {m["metadata"]["name"] for m in owned if m["kind"] == "Secret"}
        for volume in pod_template(job)["spec"]["volumes"]:
            if "secret" in volume and volume["secret"]["secretName"] not in own:
                assert (contract.AGENTS_NAMESPACE, volume["secret"]["secretName"]) in templates, volume
    assert templates[(contract.AGENTS_NAMESPACE, "dockyard-object-store")] >= {"access_key_id", "secret_access_key"}
    assert templates[(contract.AGENTS_NAMESPACE, "dockyard-model")] >= {"api_key", "base_url"}
    for service in FUNCTION_SERVICES.values():
        for volume in pod_template(service.body)["spec"].get("volumes") or []:
            if "secret" in volume:
                assert (service.namespace, volume["secret"]["secretName"]) in templates, (service.id, volume)


_VERBS = {"create": "create", "read": "get", "delete": "delete", "list": "list", "patch": "patch", "replace": "update"}
_RESOURCES = {"job": ("batch", "jobs"), "persistent_volume_claim": ("", "persistentvolumeclaims"), "secret": ("", "secrets"),
              "pod": ("", "pods")}


def _api_calls_of_the_runtime() -> dict[tuple[tuple[str, ...], tuple[str, ...]], set[str]]:
    """Every (apiGroup, resource) -> verbs the Kubernetes runtime calls, read from its source."""
    import re

    from tests.manifests import ROOT

    source = (ROOT / "functions" / "runtime" / "kubernetes.py").read_text()
    needed: dict = {}
    for verb, kind in re.findall(r"self\.(?:batch|core)\.(create|read|delete|list|patch|replace)_namespaced_(\w+?)(?:_status)?\b", source):
        group, resource = _RESOURCES[kind]
        needed.setdefault(((group,), (resource,)), set()).add(_VERBS[verb])
    return needed


def test_functions_rbac_grants_exactly_what_the_runtime_calls():
    """Issue 11, defects 4 and 6: RBAC and code cannot drift. The Role grants the verbs the runtime calls
    (no `watch`/`list` it never makes, no PVC reads or deletes: the Job's deletion takes them along), and
    `update` on `jobs/finalizers`: an ownerReference with blockOwnerDeletion needs it where the
    OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, hardened clusters)."""
    assert not find(KNATIVE, "ClusterRole") and not find(KNATIVE, "ClusterRoleBinding")
    role = one(KNATIVE, "Role", "rbac.authorization.k8s.io", "dockyard-functions")
    assert role.namespace == contract.AGENTS_NAMESPACE
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role.body["rules"]}
    expected = _api_calls_of_the_runtime()
    assert expected[(("batch",), ("jobs",))] >= {"create", "get", "delete"}  # the scan found the calls
    owned = [m for manifests in rendered_manifests().values() for m in manifests if m["metadata"].get("ownerReferences")]
    assert owned and all(ref["blockOwnerDeletion"] for m in owned for ref in m["metadata"]["ownerReferences"])
    expected[(("batch",), ("jobs/finalizers",))] = {"update"}
    assert rules == expected
    binding = one(KNATIVE, "RoleBinding", "rbac.authorization.k8s.io", "dockyard-functions").body
    assert binding["metadata"]["namespace"] == contract.AGENTS_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dockyard-functions", "namespace": contract.FUNCTIONS_NAMESPACE}]


# --- the network ---------------------------------------------------------------------------


def _agent_policy() -> dict:
    return one(KNATIVE, "NetworkPolicy", "networking.k8s.io", "agents").body


def _egress_rule(policy: dict, port: int) -> dict:
    rules = [r for r in policy["spec"]["egress"] if any(p.get("port") == port for p in r.get("ports") or [])]
    assert len(rules) == 1, f"expected one egress rule for port {port}"
    return rules[0]


def test_the_agent_policy_selects_every_agent_pod_and_admits_nothing_in():
    policy = _agent_policy()
    assert policy["metadata"]["namespace"] == contract.AGENTS_NAMESPACE
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not policy["spec"].get("ingress")
    for job in rendered_jobs().values():
        assert _matches(policy["spec"]["podSelector"], pod_template(job)["metadata"]["labels"])
    assert len(policy["spec"]["egress"]) == 4, "DNS, egress proxy, NATS and the object store; nothing else"


def test_the_agent_policy_admits_dns():
    rule = _egress_rule(_agent_policy(), 53)
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert [_namespace_of(peer) for peer in rule["to"]] == ["kube-system"]


def test_the_agent_policy_admits_the_egress_proxy_the_settings_name():
    proxy = urlsplit(settings_env()["DOCKYARD_EGRESS_PROXY"])
    service_name, namespace = proxy.hostname.split(".")[:2]
    service = one(KNATIVE, "Service", "", service_name)
    deployment = one(KNATIVE, "Deployment", "apps", service_name)
    assert service.namespace == deployment.namespace == namespace == contract.FUNCTIONS_NAMESPACE
    assert [p["port"] for p in service.body["spec"]["ports"]] == [proxy.port]
    pod = pod_template(deployment.body)
    assert _matches({"matchLabels": service.body["spec"]["selector"]}, pod["metadata"]["labels"])
    [container] = pod["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [proxy.port]

    rule = _egress_rule(_agent_policy(), proxy.port)
    [peer] = rule["to"]
    assert _namespace_of(peer) == namespace
    assert _matches(peer["podSelector"], pod["metadata"]["labels"])


@pytest.mark.parametrize("variable", ["DOCKYARD_NATS_URL", "DOCKYARD_S3_ENDPOINT"])
def test_the_agent_policy_admits_nats_and_the_object_store_the_settings_name(variable):
    url = urlsplit(settings_env()[variable])
    host_parts = url.hostname.split(".")
    assert host_parts[2:] == ["svc", "cluster", "local"], f"{variable}: use <service>.<namespace>.svc.cluster.local"
    rule = _egress_rule(_agent_policy(), url.port)
    assert [_namespace_of(peer) for peer in rule["to"]] == [host_parts[1]]


def test_the_proxy_takes_connections_from_agents_only():
    policy = one(KNATIVE, "NetworkPolicy", "networking.k8s.io", "egress-proxy").body
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert _namespace_of(peer) == contract.AGENTS_NAMESPACE
    for job in rendered_jobs().values():
        assert _matches(peer["podSelector"], pod_template(job)["metadata"]["labels"])
    assert [p["port"] for p in rule["ports"]] == [3128]


# --- the images -----------------------------------------------------------------------------


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of images/<name>, continuation lines joined, comments dropped."""
    text = (ROOT / "images" / name).read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def _env(instructions) -> dict[str, str]:
    env = {}
    for instruction, args in instructions:
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
    return env


@pytest.mark.parametrize("name", ["agent.Dockerfile", "functions.Dockerfile"])
def test_images_install_from_the_lock_file_and_run_as_uid_1000(name):
    from functions.core.factory import AGENT_USER

    instructions = dockerfile(name)
    # The base is an argument (scripts/build-images passes a local Debian one); a registry's image by default.
    assert instructions[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    user = [args for instruction, args in instructions if instruction == "USER"][-1]
    # Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
    assert user == f"{AGENT_USER}:{AGENT_USER}", f"{name}: USER {user}"
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    copies = [args for instruction, args in instructions if instruction == "COPY"]
    assert any("uv.lock" in c.split() for c in copies), f"{name}: the lock file is not copied"
    assert "uv export --frozen --no-dev" in runs and "--require-hashes" in runs, f"{name}: not installed from uv.lock"
    assert {"agent /app/agent", "functions /app/functions"} <= set(copies)
    env = _env(instructions)
    assert env["PYTHONPATH"] == "/app" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"!pyproject.toml", "!uv.lock", "!agent/", "!functions/"} <= set(ignored), ".dockerignore hides a COPY source"


def test_the_agent_image_fits_the_job():
    from functions.core.settings import DEFAULT_IMAGE_PATH

    instructions = dockerfile("agent.Dockerfile")
    env = _env(instructions)
    assert env["HOME"] == contract.HOME_DIR and env["PYTHONUSERBASE"] == contract.PYTHONUSERBASE
    # The Job replaces PATH with <PYTHONUSERBASE>/bin:<image PATH>: python must be on the image PATH.
    assert env["PATH"].endswith(DEFAULT_IMAGE_PATH) and "/usr/local/bin" in DEFAULT_IMAGE_PATH
    assert ("WORKDIR", contract.WORKSPACE_MOUNT) in instructions
    assert ("ENTRYPOINT", '["python", "-m", "agent"]') in instructions
    assert "git" in " ".join(args for instruction, args in instructions if instruction == "RUN").split()


def test_the_functions_image_serves_main_with_functions_framework():
    instructions = dockerfile("functions.Dockerfile")
    assert _env(instructions)["FUNCTION_SOURCE"] == "/app/functions/main.py"
    assert ("ENTRYPOINT", '["functions-framework"]') in instructions
    runs_as = {_container(s)["securityContext"]["runAsUser"] for s in knative_services(KNATIVE).values()}
    assert runs_as == {1000}
