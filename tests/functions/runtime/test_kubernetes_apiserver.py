"""The runtime against an API server that answers as a real one: the emulator's honesty, and the runtime coping.

Each section is one behaviour of the API server the runtime depends on (tests/functions/kube_emulator.py
lists them): namespaces that must exist, `dryRun`, `resourceVersion` conflicts, field validation,
defaulting, 422 `Invalid`, and the Job controller's 1.31+ ending. Raw requests go over HTTP with httpx
as a cluster admin, so headers and Status bodies are seen as a client sees them.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from conftest_kube import ADMIN_TOKEN
from kube_emulator import JOBS, PVCS, SECRETS
from kube_rules import defaulted

from agent import contract
from functions.core import factory
from functions.core.settings import Settings
from functions.core.task import parse_task
from functions.errors import ApiRejected, LaunchConflict
from functions.runtime.kubernetes import JOB_NAME_LABEL, KubernetesRuntime

NS = contract.AGENTS_NAMESPACE


def make_task(task_id: str = "t1", prompt: str = "fix the tests", **data):
    return parse_task({"prompt": prompt, "task_id": task_id, **data}, source="test", event_id="e1")


@pytest.fixture
def settings_with_key(nats_server):
    """Settings with a NATS account signing key: a launch also creates the task's NATS Secret."""
    return Settings(nats_url=nats_server.url, nats_account=nats_server.auth.account,
                    nats_signing_key_file=str(nats_server.auth.signing_key_file))  # fmt: skip


@pytest.fixture
async def api(kube):
    """An admin's raw HTTP client for the emulator."""
    async with httpx.AsyncClient(base_url=str(kube.url).rstrip("/"), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, trust_env=False) as client:
        yield client


def jobs_url(namespace: str = NS, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def a_job(name: str = "agent-t1") -> dict:
    job = factory.render_job(make_task(), Settings())
    job["metadata"]["name"] = name
    return job


def status_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert body["kind"] == "Status" and body["code"] == response.status_code
    return response.status_code, body["reason"], body["message"]


# --- namespaces must exist ----------------------------------------------------------------------


async def test_creating_in_a_namespace_that_does_not_exist_is_not_found(kube, api):
    job = a_job()
    job["metadata"]["namespace"] = "nowhere"
    response = await api.post(jobs_url("nowhere"), json=job)
    assert status_of(response) == (404, "NotFound", 'namespaces "nowhere" not found')
    assert response.json()["details"] == {"name": "nowhere", "kind": "namespaces"}
    assert kube.live(JOBS) == []


async def test_the_runtime_says_which_namespace_is_missing(kube, kube_admin):
    """With a client allowed everywhere (the functions' Role would 403 first), a missing namespace is a
    permanent error that says to apply knative/."""
    runtime = KubernetesRuntime(Settings(namespace="nowhere"), kube_admin, request_timeout=5)
    with pytest.raises(ApiRejected, match=r'namespaces "nowhere" not found\. Does namespace nowhere exist\? Apply knative/ first'):
        await runtime.launch(make_task())
    assert kube.live(JOBS) == [] and kube.live(PVCS) == []


# --- dryRun=All ---------------------------------------------------------------------------------


async def test_dry_run_create_is_validated_and_answered_but_not_stored(kube, api):
    response = await api.post(jobs_url(), params={"dryRun": "All"}, json=a_job())
    assert response.status_code == 201
    answered = response.json()
    assert answered["metadata"]["uid"] and answered["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirst"  # defaulted
    assert kube.get(JOBS, NS, "agent-t1") is None
    # Validation runs all the same.
    response = await api.post(jobs_url(), params={"dryRun": "All"}, json=a_job("x" * 64))
    assert status_of(response)[:2] == (422, "Invalid")
    assert (await api.post(jobs_url(), params={"dryRun": "Some"}, json=a_job())).status_code == 400


async def test_dry_run_patch_and_delete_change_nothing(kube, api):
    assert (await api.post(jobs_url(), json=a_job())).status_code in (200, 201)
    before = copy.deepcopy(kube.get(JOBS, NS, "agent-t1"))
    patch = {"metadata": {"labels": {"extra": "yes"}}}
    response = await api.patch(jobs_url(name="agent-t1"), params={"dryRun": "All"}, json=patch,
                               headers={"Content-Type": "application/merge-patch+json"})  # fmt: skip
    assert response.status_code == 200 and response.json()["metadata"]["labels"]["extra"] == "yes"
    response = await api.delete(jobs_url(name="agent-t1"), params={"dryRun": "All"})
    assert response.status_code == 200
    assert kube.get(JOBS, NS, "agent-t1") == before


# --- resourceVersion conflicts ------------------------------------------------------------------


async def test_a_stale_resource_version_is_a_conflict(kube, api):
    created = (await api.post(jobs_url(), json=a_job())).json()
    stale = created["metadata"]["resourceVersion"]
    await kube.set_job_status(NS, "agent-t1", active=1)  # the controller wrote since
    headers = {"Content-Type": "application/merge-patch+json"}
    response = await api.patch(jobs_url(name="agent-t1"), json={"metadata": {"resourceVersion": stale, "labels": {"x": "1"}}}, headers=headers)
    assert status_of(response) == (
        409, "Conflict",
        'Operation cannot be fulfilled on jobs.batch "agent-t1": the object has been modified; '
        "please apply your changes to the latest version and try again",
    )  # fmt: skip
    assert response.json()["details"] == {"name": "agent-t1", "group": "batch", "kind": "jobs"}
    assert "x" not in kube.get(JOBS, NS, "agent-t1")["metadata"]["labels"]
    current = kube.get(JOBS, NS, "agent-t1")["metadata"]["resourceVersion"]
    response = await api.patch(jobs_url(name="agent-t1"), json={"metadata": {"resourceVersion": current, "labels": {"x": "1"}}}, headers=headers)
    assert response.status_code == 200 and kube.get(JOBS, NS, "agent-t1")["metadata"]["labels"]["x"] == "1"
    # Without a resourceVersion a patch is unconditional (jobStrategy.AllowUnconditionalUpdate).
    response = await api.patch(jobs_url(name="agent-t1"), json={"metadata": {"labels": {"y": "2"}}}, headers=headers)
    assert response.status_code == 200


async def test_put_replaces_the_object_but_not_its_status_nor_the_systems_metadata(kube, api):
    created = (await api.post(jobs_url(), json=a_job())).json()
    await kube.set_job_status(NS, "agent-t1", active=1)
    current = kube.get(JOBS, NS, "agent-t1")
    body = copy.deepcopy(current)
    del body["metadata"]["annotations"]  # gone after a PUT (a merge would keep it)
    body["metadata"]["uid"] = "forged"
    body["status"] = {"succeeded": 5}
    response = await api.put(jobs_url(name="agent-t1"), json=body)
    assert response.status_code == 200
    stored = kube.get(JOBS, NS, "agent-t1")
    assert "annotations" not in stored["metadata"]
    assert stored["metadata"]["uid"] == created["metadata"]["uid"] and stored["status"] == {"active": 1}
    assert int(stored["metadata"]["resourceVersion"]) > int(current["metadata"]["resourceVersion"])
    # The same PUT again carries the old resourceVersion: a conflict.
    assert status_of(await api.put(jobs_url(name="agent-t1"), json=body))[:2] == (409, "Conflict")
    # An invalid result is refused whole.
    body = copy.deepcopy(kube.get(JOBS, NS, "agent-t1"))
    body["metadata"]["labels"]["bad"] = "x" * 64
    assert status_of(await api.put(jobs_url(name="agent-t1"), json=body))[:2] == (422, "Invalid")
    assert "bad" not in kube.get(JOBS, NS, "agent-t1")["metadata"]["labels"]


# --- field validation ---------------------------------------------------------------------------


def _with_unknown_fields() -> dict:
    job = a_job()
    job["spec"]["template"]["spec"]["containers"][0]["restartPolicyy"] = "Never"
    job["spec"]["backoffLimitt"] = 2
    return job


async def test_strict_field_validation_names_every_unknown_field(kube, api):
    response = await api.post(jobs_url(), params={"fieldValidation": "Strict"}, json=_with_unknown_fields())
    assert status_of(response) == (
        400, "BadRequest",
        'Job in version "v1" cannot be handled as a Job: strict decoding error: '
        'unknown field "spec.template.spec.containers[0].restartPolicyy", unknown field "spec.backoffLimitt"',
    )  # fmt: skip
    assert kube.live(JOBS) == []


@pytest.mark.parametrize("directive", [None, "Warn", "Ignore"])
async def test_unknown_fields_are_warned_about_or_ignored_and_never_stored(kube, api, directive):
    params = {"fieldValidation": directive} if directive else {}
    response = await api.post(jobs_url(), params=params, json=_with_unknown_fields())
    assert response.status_code in (200, 201)
    warnings = response.headers.get_list("Warning")
    if directive == "Ignore":
        assert warnings == []
    else:  # Warn is the server's default
        assert warnings == ['299 - "unknown field \\"spec.template.spec.containers[0].restartPolicyy\\""',
                            '299 - "unknown field \\"spec.backoffLimitt\\""']  # fmt: skip
    stored = kube.get(JOBS, NS, "agent-t1")
    assert "backoffLimitt" not in stored["spec"] and "restartPolicyy" not in stored["spec"]["template"]["spec"]["containers"][0]


async def test_every_create_of_the_runtime_asks_for_strict_field_validation(kube, kube_client, settings_with_key):
    """The runtime must never create an object missing something it rendered: a field this API server does
    not know (e.g. one newer than the cluster) must be a named 400, not dropped under the default Warn."""
    runtime = KubernetesRuntime(settings_with_key, kube_client, request_timeout=5)
    assert await runtime.launch(make_task()) is True
    creates = [r for r in kube if r.method.value.upper() == "POST"]  # kmock keeps every request
    assert sorted(r.resource.plural for r in creates) == ["jobs", "persistentvolumeclaims", "secrets"]
    assert all(r.params.get("fieldValidation") == "Strict" for r in creates)


async def test_a_body_the_client_refuses_before_sending_is_a_permanent_error(kube, kube_client, monkeypatch):
    """The client checks a body against its models first (its own strict decoding): that is a fault in what
    dockyard renders, a permanent ApiRejected naming the field, never an unsorted exception."""
    render = factory.render_job

    def with_an_unknown_field(task, settings):
        job = render(task, settings)
        job["spec"]["template"]["spec"]["futureField"] = True
        return job

    monkeypatch.setattr(factory, "render_job", with_an_unknown_field)
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=5)
    with pytest.raises(ApiRejected, match=r"refused by the Kubernetes client before sending: spec\.template\.spec\.futureField: Extra inputs are not permitted"):
        await runtime.launch(make_task())
    assert kube.live(JOBS) == [] and list(kube) == []


async def test_what_the_runtime_sends_is_stored_whole(kube, kube_client, settings_with_key):
    """Every field of the Job, its Secret and its PVC is one the API server declares: nothing is pruned."""
    runtime = KubernetesRuntime(settings_with_key, kube_client, request_timeout=5)
    await runtime.launch(make_task())
    sent = {r.resource.plural: json.loads(r.body) for r in kube if r.method.value.upper() == "POST"}  # the bytes sent
    for res, name in ((JOBS, "agent-t1"), (SECRETS, "agent-t1"), (PVCS, "workspace-t1")):
        stored = kube.get(res, NS, name)
        assert _contains(stored, sent[res.plural]), f"{res.plural}: the server dropped a field that was sent"


def _contains(stored, sent) -> bool:
    """Every field of `sent` is in `stored` with the same value (the server may add defaults)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(k in stored and _contains(stored[k], v) for k, v in sent.items())
    if isinstance(sent, list):
        return isinstance(stored, list) and len(stored) == len(sent) and all(map(_contains, stored, sent))
    return stored == sent


# --- defaulting -------------------------------------------------------------------------------


async def test_a_relaunch_of_the_same_task_is_a_redelivery_despite_the_servers_defaults(kube, kube_client):
    """The stored Job carries the defaulters' fields (completions, completionMode, suspend, podReplacementPolicy,
    dnsPolicy, schedulerName, terminationMessagePath, generated selector and labels...): the runtime must not
    take them for another spec. It compares the task it annotated, which the server leaves alone."""
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=5)
    task = make_task()
    assert await runtime.launch(task) is True
    stored = kube.get(JOBS, NS, "agent-t1")
    rendered = factory.render_job(task, Settings())
    assert stored["spec"] != rendered["spec"]  # defaulting is on
    spec = stored["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"], spec["suspend"], spec["podReplacementPolicy"]) == (
        1, 1, "NonIndexed", False, "Failed")  # fmt: skip  (Failed: the Job has a podFailurePolicy)
    agent = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == factory.CONTAINER_AGENT)
    assert agent["terminationMessagePath"] == "/dev/termination-log"
    assert stored == {**stored, "spec": defaulted({**rendered, "metadata": {**rendered["metadata"], "uid": stored["metadata"]["uid"]}}, "Job")["spec"]}
    assert await runtime.launch(task) is False  # a redelivery, not a LaunchConflict
    with pytest.raises(LaunchConflict):
        await runtime.launch(make_task(prompt="another thing"))


async def test_the_pod_label_the_runtime_lists_by_is_one_the_job_strategy_sets(kube, kube_client):
    """_with_last_gasp lists the Job's pods by batch.kubernetes.io/job-name: the API server puts it on the
    template (and so on every pod), the runtime does not render it."""
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=5)
    await runtime.launch(make_task())
    assert JOB_NAME_LABEL not in factory.render_job(make_task(), Settings())["spec"]["template"]["metadata"]["labels"]
    stored = kube.get(JOBS, NS, "agent-t1")
    assert stored["spec"]["template"]["metadata"]["labels"][JOB_NAME_LABEL] == "agent-t1"
    assert stored["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": stored["metadata"]["uid"]}}


# --- 422 Invalid --------------------------------------------------------------------------------


async def test_an_invalid_job_is_422_with_its_causes(kube, api):
    name = "agent-" + "x" * 60  # a valid object name, but it becomes the pods' job-name label value
    response = await api.post(jobs_url(), json=a_job(name))
    code, reason, message = status_of(response)
    assert (code, reason) == (422, "Invalid")
    assert message == f'Job.batch "{name}" is invalid: spec.template.labels: Invalid value: "{name}": must be no more than 63 characters'
    details = response.json()["details"]
    assert (details["name"], details["group"], details["kind"]) == (name, "batch", "Job")
    assert {json.dumps(c, sort_keys=True) for c in details["causes"]} == {
        json.dumps({"reason": "FieldValueInvalid", "field": "spec.template.labels",
                    "message": f'Invalid value: "{name}": must be no more than 63 characters'}, sort_keys=True)
    }  # fmt: skip
    assert kube.live(JOBS) == []


async def test_the_runtime_reports_an_invalid_job_as_a_permanent_error_naming_the_field(kube, kube_client):
    """A setting that makes the Job invalid (a Kueue queue name is a label value: at most 63 characters) is
    refused by the API server; the runtime says what to fix and leaves nothing behind."""
    runtime = KubernetesRuntime(Settings(kueue_queue="q" * 64), kube_client, request_timeout=5)
    with pytest.raises(ApiRejected, match=r"rejected as invalid: .*metadata\.labels: Invalid value: \"q{64}\": must be no more than 63 characters") as raised:
        await runtime.launch(make_task())
    assert raised.value.status == 422 and kube.live(JOBS) == [] and kube.live(PVCS) == []


# --- the Job controller's ending (1.31+) -----------------------------------------------------------


@pytest.mark.parametrize(("terminal", "reason"), [("Complete", None), ("Failed", "DeadlineExceeded")])
async def test_finished_job_waits_for_the_terminal_condition(kube, kube_client, terminal, reason):
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=5)
    await runtime.launch(make_task())
    target = await kube.job_reaches_target(NS, "agent-t1", terminal, reason=reason)
    assert [c["type"] for c in target["status"]["conditions"]] == [{"Complete": "SuccessCriteriaMet", "Failed": "FailureTarget"}[terminal]]
    assert await runtime.finished_job("t1") is None  # the pods (and the final upload) are still terminating
    await kube.job_pods_gone(NS, "agent-t1")
    job = await runtime.finished_job("t1")
    assert job["status"]["conditions"][-1]["type"] == terminal and job["status"]["terminating"] == 0
    assert job["status"]["conditions"][-1]["reason"] == job["status"]["conditions"][0]["reason"]


@pytest.fixture
def runtime(kube_client, settings):
    """The functions' runtime (for `post`, tests/functions/conftest.py): Kubernetes, on the emulator."""
    return KubernetesRuntime(settings, kube_client, request_timeout=5)


async def test_job_finished_records_the_end_once_and_only_on_the_terminal_condition(kube, post, bus, events):
    """Every update of the Job reaches job_finished (the ApiServerSource): the interim condition is ignored,
    a forged terminal one is ignored (the runtime's Job is the truth), the terminal one records the end,
    and its redelivery changes nothing."""
    from tests.functions.handlers.test_functions import submitted

    await submitted(post, "t1")
    target = await kube.job_reaches_target(NS, "agent-t1", "Failed", reason="DeadlineExceeded")
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, target)
    assert response.json() == {"status": "ignored", "reason": "job not finished"}

    forged = copy.deepcopy(target)
    forged["status"]["conditions"].append({"type": "Failed", "status": "True", "reason": "DeadlineExceeded"})
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, forged)
    assert response.json()["status"] == "ignored" and "no finished Job" in response.json()["reason"]
    assert (await bus.registry.get("t1"))["state"] == contract.STATE_QUEUED

    failed = await kube.job_pods_gone(NS, "agent-t1")
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, failed)
    assert response.json()["status"] == "finished"
    response = await post("job_finished", contract.EVENT_JOB_UPDATE, failed)  # redelivered
    assert response.json() == {"task_id": "t1", "status": "already handled"}
    record = await bus.registry.get("t1")
    assert record["state"] == contract.STATE_FINISHED and record["finished_uids"] == [failed["metadata"]["uid"]]
    assert [e["state"] for e in await events("t1")].count(contract.STATE_FINISHED) == 1
