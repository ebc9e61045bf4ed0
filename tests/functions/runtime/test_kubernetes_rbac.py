"""The runtime under the RBAC of knative/rbac.yaml (issue 11, part B): the API emulator authorizes every
request of the runtime's client as the functions' ServiceAccount, so a call the Role does not grant is a 403
and fails the runtime's tests; and every verb the Role grants is needed (removing any one fails a scenario
that does what the functions do), so the Role and functions/runtime/kubernetes.py cannot drift apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from conftest_kube import FUNCTIONS_USER, api_client_for, knative_rbac
from kube_emulator import JOBS, PVCS, SECRETS, Rbac, job_condition

from agent import contract
from functions.core.settings import Settings
from functions.core.task import parse_task
from functions.errors import ApiRejected, PermanentError
from functions.runtime.kubernetes import KubernetesRuntime

NS = contract.AGENTS_NAMESPACE


def make_task(task_id: str = "t1"):
    return parse_task({"prompt": "fix the tests", "task_id": task_id}, source="test", event_id="e1")


def forbidden_body(caught) -> dict:
    return json.loads(caught.value.body)


# --- a verb the Role does not grant is a 403 -----------------------------------------------------


async def test_deleting_a_pvc_is_forbidden_with_the_api_server_s_status(kube, kube_client, runtime_with_creds):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    await runtime_with_creds.launch(make_task())
    with pytest.raises(ApiException) as caught:
        await asyncio.to_thread(client.CoreV1Api(kube_client).delete_namespaced_persistent_volume_claim, "workspace-t1", NS)
    assert caught.value.status == 403
    assert forbidden_body(caught) == {
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 403, "reason": "Forbidden",
        "message": f'persistentvolumeclaims "workspace-t1" is forbidden: User "{FUNCTIONS_USER}" cannot delete resource '
                   f'"persistentvolumeclaims" in API group "" in the namespace "{NS}"',
        "details": {"name": "workspace-t1", "group": "", "kind": "persistentvolumeclaims"},
    }  # fmt: skip
    assert kube.get(PVCS, NS, "workspace-t1") is not None  # refused: nothing changed


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda core, batch: core.list_namespaced_secret(NS),
         f'secrets is forbidden: User "{FUNCTIONS_USER}" cannot list resource "secrets" in API group "" in the namespace "{NS}"'),
        (lambda core, batch: core.read_namespaced_secret("agent-t1", NS),
         f'secrets "agent-t1" is forbidden: User "{FUNCTIONS_USER}" cannot get resource "secrets" in API group "" in the namespace "{NS}"'),
        (lambda core, batch: batch.list_namespaced_job(NS, watch=True, _preload_content=False),
         f'jobs.batch is forbidden: User "{FUNCTIONS_USER}" cannot watch resource "jobs" in API group "batch" in the namespace "{NS}"'),
        (lambda core, batch: batch.patch_namespaced_job_status("agent-t1", NS, {"status": {}}),
         f'jobs.batch "agent-t1" is forbidden: User "{FUNCTIONS_USER}" cannot patch resource "jobs/status" in API group "batch" in the namespace "{NS}"'),
        (lambda core, batch: batch.delete_collection_namespaced_job(NS),
         f'jobs.batch is forbidden: User "{FUNCTIONS_USER}" cannot deletecollection resource "jobs" in API group "batch" in the namespace "{NS}"'),
        (lambda core, batch: batch.read_namespaced_job("agent-t1", "default"),
         f'jobs.batch "agent-t1" is forbidden: User "{FUNCTIONS_USER}" cannot get resource "jobs" in API group "batch" in the namespace "default"'),
    ],
    ids=["list secrets", "get secret", "watch jobs", "patch jobs/status", "deletecollection jobs", "get job elsewhere"],
)
async def test_what_the_role_does_not_grant_is_forbidden(kube, kube_client, call, message):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as caught:
        await asyncio.to_thread(call, client.CoreV1Api(kube_client), client.BatchV1Api(kube_client))
    assert (caught.value.status, forbidden_body(caught)["reason"], forbidden_body(caught)["message"]) == (403, "Forbidden", message)


async def test_the_runtime_maps_a_refusal_by_rbac_to_a_permanent_error_naming_the_rbac(kube, kube_client):
    kube.rbac = without(knative_rbac(), "jobs", "create")
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=2)
    with pytest.raises(ApiRejected) as caught:
        await runtime.launch(make_task())
    assert isinstance(caught.value, PermanentError) and caught.value.api_status == 403
    text = str(caught.value)
    assert f'User "{FUNCTIONS_USER}" cannot create resource "jobs" in API group "batch"' in text
    assert "apply the RBAC in knative/" in text
    assert kube.live(JOBS) == [] and kube.live(PVCS) == []


async def test_without_a_known_token_the_api_answers_401(kube):
    api_client = api_client_for(str(kube.url), "not-a-token")
    runtime = KubernetesRuntime(Settings(), api_client, request_timeout=2)
    try:
        with pytest.raises(ApiRejected, match="rejected the credentials") as caught:
            await runtime.launch(make_task())
    finally:
        api_client.close()
    assert caught.value.api_status == 401 and kube.live(JOBS) == []


async def test_block_owner_deletion_needs_update_on_the_job_s_finalizers(kube, kube_client):
    """OwnerReferencesPermissionEnforcement (issue 11, defect 4): the PVC's ownerReference blocks its owner's
    deletion, which needs update on jobs/finalizers; the Job itself is created all the same."""
    kube.rbac = without(knative_rbac(), "jobs/finalizers", "update")
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=2)
    with pytest.raises(ApiRejected) as caught:
        await runtime.launch(make_task())
    assert caught.value.api_status == 403
    assert "cannot set blockOwnerDeletion" in str(caught.value) and 'cannot update resource "jobs/finalizers"' in str(caught.value)
    assert kube.get(JOBS, NS, "agent-t1") is not None and kube.get(PVCS, NS, "workspace-t1") is None


def test_rules_match_as_the_rbac_authorizer_does():
    rbac = Rbac.from_yaml(
        """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules:
  - {apiGroups: ["batch"], resources: ["jobs"], verbs: ["get"], resourceNames: ["agent-a"]}
  - {apiGroups: ["*"], resources: ["*/status"], verbs: ["*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: one}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects: [{kind: ServiceAccount, name: sa, namespace: elsewhere}, {kind: User, name: alice}]
"""
    )
    sa = "system:serviceaccount:elsewhere:sa"
    assert rbac.allows(sa, "get", "batch", "jobs", "one", "agent-a")
    assert not rbac.allows(sa, "get", "batch", "jobs", "one", "agent-b")  # resourceNames
    assert not rbac.allows(sa, "get", "batch", "jobs", "two", "agent-a")  # a RoleBinding grants in its namespace only
    assert rbac.allows("alice", "patch", "batch", "jobs/status", "one", "agent-b")
    assert not rbac.allows("alice", "patch", "batch", "jobs", "one", "agent-b")  # a subresource is not its resource
    assert not rbac.allows("bob", "get", "batch", "jobs", "one", "agent-a")


# --- every verb the Role grants is needed ----------------------------------------------------------


def without(rbac: Rbac, resource: str, verb: str) -> Rbac:
    """A copy of `rbac` whose rules no longer grant `verb` on `resource`."""
    roles = []
    for kind, namespace, name, rules in rbac.roles:
        kept = []
        for rule in rules:
            if resource in rule.resources:
                others = rule.resources - {resource}
                if others:
                    kept.append(dataclasses.replace(rule, resources=others))
                rule = dataclasses.replace(rule, resources=frozenset({resource}), verbs=rule.verbs - {verb})
            if rule.verbs and rule.resources:
                kept.append(rule)
        roles.append((kind, namespace, name, kept))
    return Rbac(roles, rbac.bindings)


def granted() -> list[tuple[str, str]]:
    """Every (resource, verb) that knative/rbac.yaml grants the functions."""
    return sorted(
        (resource, verb)
        for _, _, _, rules in knative_rbac().roles
        for rule in rules
        for resource in rule.resources
        for verb in rule.verbs
    )


@pytest.fixture
def creds_settings(nats_server):
    return Settings(nats_url=nats_server.url, nats_account=nats_server.auth.account,
                    nats_signing_key_file=str(nats_server.auth.signing_key_file))


@pytest.fixture
def runtime_with_creds(kube_client, creds_settings):
    return KubernetesRuntime(creds_settings, kube_client, request_timeout=2)


async def what_the_functions_do(kube, admin, runtime) -> None:
    """Every call of the runtime: launch (Job, Secret, PVC owned by the Job), read a finished Job with its pod's
    last words, cancel. Raises (ApiRejected or AssertionError) if any of it was refused."""
    from kubernetes import client

    assert await runtime.launch(make_task()) is True
    assert kube.get(SECRETS, NS, "agent-t1") is not None and kube.get(PVCS, NS, "workspace-t1") is not None
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "agent-t1-a", "labels": {"batch.kubernetes.io/job-name": "agent-t1"}},
           "spec": {"containers": [{"name": "agent", "image": "agent"}]}}  # fmt: skip
    await asyncio.to_thread(client.CoreV1Api(admin).create_namespaced_pod, NS, pod)
    await kube.set_pod_status(NS, "agent-t1-a", containerStatuses=[{"name": "agent", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}])
    await kube.set_job_status(NS, "agent-t1", failed=1, conditions=[job_condition("Failed")])
    job = await runtime.finished_job("t1")
    assert job["status"].get("agentExit") == {"reason": "OOMKilled", "exitCode": 137}  # the pods list was allowed
    assert await runtime.job_uid("t1") == job["metadata"]["uid"]
    await runtime.cancel("t1")
    assert kube.get(JOBS, NS, "agent-t1") is None


async def test_the_role_lets_the_functions_do_all_they_do(kube, kube_admin, runtime_with_creds):
    await what_the_functions_do(kube, kube_admin, runtime_with_creds)


def test_the_role_grants_something():
    assert len(granted()) >= 5  # the parametrization below is not vacuous


@pytest.mark.parametrize("resource, verb", granted(), ids=[f"{v} {r}" for r, v in granted()])
async def test_without_any_one_granted_verb_the_functions_fail(kube, kube_admin, runtime_with_creds, resource, verb):
    """Drift the other way: a verb no call needs would pass this with the verb removed."""
    kube.rbac = without(knative_rbac(), resource, verb)
    with pytest.raises((ApiRejected, AssertionError)):
        await what_the_functions_do(kube, kube_admin, runtime_with_creds)
