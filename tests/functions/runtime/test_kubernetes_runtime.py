"""KubernetesRuntime against the API emulator, over real HTTP with the official client.

Assertions are on the objects the emulator holds afterwards, not on the calls made.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest_kube import SA_TOKEN, api_client_for
from kube_emulator import JOBS, PVCS, job_condition, parse_selector, selector_matches
from kube_rules import defaulted

from agent import contract
from functions.core.factory import render_job
from functions.core.settings import Settings
from tests.conftest import free_port
from functions.errors import LaunchConflict, TaskNotFound
from functions.errors import ApiRejected, ApiUnavailable, PermanentError, TransientError
from functions.runtime.kubernetes import KubernetesRuntime
from functions.core.task import parse_task

NS = contract.AGENTS_NAMESPACE


def make_task(task_id: str = "t1", prompt: str = "fix the tests", **data):
    return parse_task({"prompt": prompt, "task_id": task_id, **data}, source="test", event_id="e1")


@pytest.fixture
def runtime(kube_client):
    return KubernetesRuntime(Settings(), kube_client, request_timeout=2)


def as_stored(rendered: dict, uid: str) -> dict:
    """A rendered Job as the API server stores it: its uid, then its defaults."""
    return defaulted({**rendered, "metadata": {**rendered["metadata"], "uid": uid}}, "Job")


def owner_uid(pvc: dict) -> str:
    (ref,) = pvc["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["controller"], ref["blockOwnerDeletion"]) == ("Job", pvc["metadata"]["name"].replace("workspace-", "agent-"), True, True)
    return ref["uid"]


# --- launch --------------------------------------------------------------------


async def test_launch_creates_the_job_then_a_pvc_owned_by_its_uid(kube, runtime):
    task = make_task()
    assert await runtime.launch(task) is True

    job = kube.get(JOBS, NS, "agent-t1")
    pvc = kube.get(PVCS, NS, "workspace-t1")
    assert job["metadata"]["uid"] and pvc is not None
    assert owner_uid(pvc) == job["metadata"]["uid"]
    # What was sent, as the API server defaults it (and nothing pruned: the runtime asks for Strict).
    assert job["spec"] == as_stored(render_job(task, Settings()), job["metadata"]["uid"])["spec"]
    # The Job went first: its UID was known when the PVC was created, and it was stored before.
    assert int(job["metadata"]["resourceVersion"]) < int(pvc["metadata"]["resourceVersion"])


async def test_launching_twice_leaves_one_job_and_reports_it_existed(kube, runtime):
    task = make_task()
    assert await runtime.launch(task) is True
    uid = kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"]
    assert await runtime.launch(task) is False
    assert len(kube.live(JOBS)) == 1 and len(kube.live(PVCS)) == 1
    assert kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"] == uid


async def test_concurrent_launches_create_one_job(kube, runtime):
    results = await asyncio.gather(*(runtime.launch(make_task()) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    assert len(kube.live(JOBS)) == 1 and len(kube.live(PVCS)) == 1


async def test_same_id_with_another_spec_is_a_conflict(kube, runtime):
    await runtime.launch(make_task(prompt="one thing"))
    with pytest.raises(LaunchConflict, match="different spec"):
        await runtime.launch(make_task(prompt="another thing"))
    assert issubclass(LaunchConflict, PermanentError)
    assert "one thing" in kube.get(JOBS, NS, "agent-t1")["metadata"]["annotations"][contract.ANNOTATION_TASK]


async def test_a_job_dockyard_does_not_manage_is_a_conflict(kube, kube_admin, runtime):
    foreign = render_job(make_task(), Settings())
    foreign["metadata"]["labels"] = {"app": "someone-else"}
    await asyncio.to_thread(_create_job, kube_admin, foreign)
    with pytest.raises(LaunchConflict, match="does not manage"):
        await runtime.launch(make_task())
    assert kube.get(PVCS, NS, "workspace-t1") is None


def _create_job(api_client, body: dict) -> None:
    from kubernetes import client

    client.BatchV1Api(api_client).create_namespaced_job(NS, body)


async def test_a_half_done_launch_is_completed_on_redelivery(kube, runtime):
    task = make_task()
    kube.fail_next("create", "persistentvolumeclaims", 503, "etcd is busy")
    with pytest.raises(ApiUnavailable) as caught:
        await runtime.launch(task)
    assert isinstance(caught.value, TransientError)
    assert kube.get(JOBS, NS, "agent-t1") is not None and kube.get(PVCS, NS, "workspace-t1") is None

    # Redelivery: the Job exists with the same spec; the missing workspace is created for it.
    assert await runtime.launch(task) is True
    assert owner_uid(kube.get(PVCS, NS, "workspace-t1")) == kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"]
    assert await runtime.launch(task) is False


async def test_a_create_that_timed_out_but_went_through_is_adopted(kube, kube_client):
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=0.3)
    kube.fail_next("create", "jobs", delay=0.6)  # creates the Job, answers after the client gave up
    with pytest.raises(ApiUnavailable, match="did not answer"):
        await runtime.launch(make_task())
    assert kube.get(JOBS, NS, "agent-t1") is not None
    assert await runtime.launch(make_task()) is True  # completed: the PVC was still missing
    assert owner_uid(kube.get(PVCS, NS, "workspace-t1")) == kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"]


@pytest.mark.parametrize(
    "status, words",
    [
        (422, ["rejected as invalid", "DOCKYARD_"]),
        (403, ["forbidden", "RBAC", NS]),
        (400, ["bad request"]),
    ],
)
async def test_refusals_are_not_transient_and_say_what_to_fix(kube, runtime, status, words):
    kube.fail_next("create", "jobs", status, "spec.template.spec.containers[0].image: Required value")
    with pytest.raises(ApiRejected) as caught:
        await runtime.launch(make_task())
    assert isinstance(caught.value, PermanentError) and caught.value.api_status == status
    message = str(caught.value)
    assert "create Job dockyard-agents/agent-t1" in message and "Required value" in message
    for word in words:
        assert word in message
    assert kube.live(JOBS) == [] and kube.live(PVCS) == []


@pytest.mark.parametrize("status", [500, 503, 429, 504])
async def test_server_trouble_is_transient(kube, runtime, status):
    kube.fail_next("create", "jobs", status, "try again")
    with pytest.raises(ApiUnavailable) as caught:
        await runtime.launch(make_task())
    assert isinstance(caught.value, TransientError) and caught.value.api_status == status
    assert await runtime.launch(make_task()) is True  # the retry succeeds


async def test_an_exceeded_quota_is_transient(kube, runtime):
    kube.fail_next("create", "jobs", 403, 'jobs.batch "agent-t1" is forbidden: exceeded quota: agents, requested: count/jobs.batch=1')
    with pytest.raises(ApiUnavailable, match="exceeded quota"):
        await runtime.launch(make_task())


async def test_an_unreachable_api_server_is_transient():
    port = free_port()  # nothing listens on it
    runtime = KubernetesRuntime(Settings(), api_client_for(f"http://127.0.0.1:{port}"), request_timeout=1)
    with pytest.raises(ApiUnavailable, match="did not answer") as caught:
        await runtime.launch(make_task())
    assert isinstance(caught.value, TransientError)
    with pytest.raises(ApiUnavailable, match="did not answer"):
        await runtime.finished_job("t1")
    await runtime.close()


# --- cancel ----------------------------------------------------------------------


async def test_cancel_deletes_the_job_and_the_pvc_goes_with_it(kube, runtime):
    await runtime.launch(make_task("t1"))
    await runtime.launch(make_task("t2"))
    await runtime.cancel("t1")
    assert kube.get(JOBS, NS, "agent-t1") is None
    assert kube.get(PVCS, NS, "workspace-t1") is None  # garbage-collected through its ownerReference
    assert kube.get(JOBS, NS, "agent-t2") is not None and kube.get(PVCS, NS, "workspace-t2") is not None

    with pytest.raises(TaskNotFound):
        await runtime.cancel("t1")
    assert await runtime.finished_job("t1") is None


async def test_the_emulator_orphans_a_jobs_dependents_by_default(kube, kube_admin, runtime):
    """Why cancel must ask for Background: batch/v1 orphans by default, leaving the workspace behind."""
    from kubernetes import client

    await runtime.launch(make_task())
    await asyncio.to_thread(client.BatchV1Api(kube_admin).delete_namespaced_job, "agent-t1", NS)
    pvc = kube.get(PVCS, NS, "workspace-t1")
    assert kube.get(JOBS, NS, "agent-t1") is None
    assert pvc is not None and not pvc["metadata"].get("ownerReferences")


async def test_cancel_of_an_unknown_or_invalid_id_is_not_found(runtime):
    with pytest.raises(TaskNotFound):
        await runtime.cancel("nope")
    with pytest.raises(TaskNotFound):
        await runtime.cancel("Not_An_Id")


# --- finished_job -------------------------------------------------------------------


async def test_a_condition_that_is_not_true_does_not_finish(kube, runtime):
    await runtime.launch(make_task())
    await kube.set_job_status(NS, "agent-t1", active=1, ready=1, conditions=[job_condition("Complete", status="False")])
    assert await runtime.finished_job("t1") is None
    await kube.set_job_status(NS, "agent-t1", active=0, ready=0, succeeded=1, conditions=[job_condition("Complete")])
    assert [c["type"] for c in (await runtime.finished_job("t1"))["status"]["conditions"]] == ["Complete"]


async def test_a_kueue_job_waits_suspended(kube, kube_client):
    runtime = KubernetesRuntime(Settings(kueue_queue="agents"), kube_client)
    await runtime.launch(make_task())
    job = kube.get(JOBS, NS, "agent-t1")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][contract.KUEUE_QUEUE_LABEL] == "agents"
    assert await runtime.finished_job("t1") is None


async def test_finished_job_is_the_job_once_it_has_a_finished_condition(kube, runtime):
    assert await runtime.finished_job("t1") is None  # no Job at all
    assert await runtime.job_uid("t1") is None and await runtime.job_uid("Not_An_Id") is None
    await runtime.launch(make_task())
    assert await runtime.job_uid("t1") == kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"]  # known while it runs
    await kube.set_job_status(NS, "agent-t1", active=1, ready=1)
    assert await runtime.finished_job("t1") is None
    await kube.set_job_status(NS, "agent-t1", active=0, failed=4, conditions=[job_condition("Failed", reason="BackoffLimitExceeded")])
    job = await runtime.finished_job("t1")
    assert job["metadata"]["uid"] == kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"]
    assert job["metadata"]["labels"][contract.LABEL_TASK_ID] == "t1"
    assert [c["type"] for c in job["status"]["conditions"]] == ["Failed"]


# --- the emulator itself ----------------------------------------------------------------


def test_label_selectors():
    labels = {"app": "x", "tier": "db"}
    assert selector_matches(parse_selector("app=x,tier in (db, cache)"), labels)
    assert selector_matches(parse_selector("app==x,!missing,tier"), labels)
    assert not selector_matches(parse_selector("app!=x"), labels)
    assert not selector_matches(parse_selector("tier notin (db)"), labels)
    assert selector_matches(parse_selector("missing notin (a),other!=y"), labels)
    with pytest.raises(ValueError):
        parse_selector("app=x=y")


async def test_emulator_answers_status_bodies(kube, kube_admin):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.BatchV1Api(kube_admin)
    body = render_job(make_task(), Settings())
    created = await asyncio.to_thread(api.create_namespaced_job, NS, body)
    assert created.metadata.uid and created.metadata.resource_version and created.metadata.creation_timestamp
    with pytest.raises(ApiException) as caught:
        await asyncio.to_thread(api.create_namespaced_job, NS, body)
    status = json.loads(caught.value.body)
    assert (caught.value.status, status["kind"], status["reason"], status["code"]) == (409, "Status", "AlreadyExists", 409)
    assert status["details"] == {"name": "agent-t1", "group": "batch", "kind": "jobs"}
    with pytest.raises(ApiException) as caught:
        await asyncio.to_thread(api.read_namespaced_job, "agent-none", NS)
    assert (caught.value.status, json.loads(caught.value.body)["reason"]) == (404, "NotFound")
    with pytest.raises(ApiException) as caught:
        await asyncio.to_thread(api.list_namespaced_job, NS, label_selector="a=b=c")
    assert caught.value.status == 400

    before = kube.get(JOBS, NS, "agent-t1")["metadata"]["resourceVersion"]
    await kube.set_job_status(NS, "agent-t1", active=1)
    assert int(kube.get(JOBS, NS, "agent-t1")["metadata"]["resourceVersion"]) > int(before)


async def test_make_runtime_reads_the_kubeconfig_and_the_job_settings_from_the_environment(kube, tmp_path, monkeypatch):
    import yaml

    from functions.runtime import make_runtime

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": str(kube.url).rstrip("/")}}],
                "users": [{"name": "tester", "user": {"token": SA_TOKEN}}],
                "contexts": [{"name": "test", "context": {"cluster": "emulator", "user": "tester"}}],
                "current-context": "test",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("DOCKYARD_RUNTIME", "kubernetes")
    monkeypatch.setenv("DOCKYARD_AGENT_IMAGE", "registry.test/agent:7")

    runtime = make_runtime(Settings.from_env())  # as functions/main.py does at start
    try:
        assert await runtime.launch(make_task()) is True
    finally:
        await runtime.close()
    job = kube.get(JOBS, NS, "agent-t1")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/agent:7"


async def test_no_kubernetes_configuration_is_a_settings_error(tmp_path, monkeypatch):
    from functions.errors import SettingsError

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="KUBECONFIG"):
        KubernetesRuntime(Settings())


async def test_a_file_repository_is_never_launched_in_the_cluster(kube, runtime):
    """Even a task parsed with file:// allowed (a misconfigured functions process) creates nothing."""
    from functions.errors import BadInput

    task = parse_task({"prompt": "x", "task_id": "t-file", "repo": {"url": "file:///srv/evilrepo"}},
                      source="test", event_id="e1", allow_file_repos=True)
    with pytest.raises(BadInput) as raised:
        await runtime.launch(task)
    assert (raised.value.field, raised.value.status) == ("repo.url", 400)
    assert kube.get(JOBS, NS, "agent-t-file") is None and kube.get(PVCS, NS, "workspace-t-file") is None


async def test_a_job_with_only_the_interim_conditions_of_1_31_is_not_finished_yet(kube, runtime):
    """Issue 11, defect 6: since Kubernetes 1.31 the Job controller first sets `FailureTarget` or
    `SuccessCriteriaMet`, and `Failed`/`Complete` only once every pod has terminated. The pod's
    snapshotter sidecar is still uploading the final snapshot then: the task is not finished until
    the terminal condition, so its end is read once, after the upload."""
    await runtime.launch(make_task())
    for interim, terminal, reason in (("FailureTarget", "Failed", "DeadlineExceeded"), ("SuccessCriteriaMet", "Complete", None)):
        await kube.set_job_status(NS, "agent-t1", active=1, terminating=1, conditions=[job_condition(interim, reason=reason)])
        assert await runtime.finished_job("t1") is None
        await kube.set_job_status(NS, "agent-t1", active=0, terminating=0,
                                  conditions=[job_condition(interim, reason=reason), job_condition(terminal, reason=reason)])
        job = await runtime.finished_job("t1")
        assert job is not None and job["status"]["conditions"][-1]["type"] == terminal


_STATUS_FIELDS = {"image": "agent", "imageID": "sha256:0", "ready": False, "restartCount": 1}


async def _agent_pod(kube, admin, name: str, created: str, terminated: dict, *, last: bool = False) -> None:
    """A pod of Job agent-t1 as the Job controller makes it (with the `admin` client: the runtime may not create
    pods), then its status as the kubelet writes it."""
    from kubernetes import client

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"batch.kubernetes.io/job-name": "agent-t1", **contract.agent_labels("t1")}},
           "spec": {"containers": [{"name": "agent", "image": "agent"}]}}
    await asyncio.to_thread(client.CoreV1Api(admin).create_namespaced_pod, NS, pod)
    state = {"lastState" if last else "state": {"terminated": terminated}}
    await kube.set_pod_status(NS, name, created=created, containerStatuses=[
        {"name": "snapshotter", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}, **_STATUS_FIELDS},
        {"name": "agent", **state, **_STATUS_FIELDS},
    ])


async def test_a_finished_job_carries_its_agent_container_s_end_and_last_words(kube, kube_admin, runtime):
    """Issue 11, defect 7: a Job carries no termination message (the Pod does), so an OOM-killed agent left
    no reason and no last lines. The runtime now reads the newest pod's agent container."""
    await runtime.launch(make_task())
    await _agent_pod(kube, kube_admin, "agent-t1-b", "2026-12-01T10:05:00Z",
                     {"exitCode": 137, "reason": "OOMKilled", "message": "step 41: cloning\nKilled\n"}, last=True)
    await _agent_pod(kube, kube_admin, "agent-t1-a", "2026-12-01T10:00:00Z", {"exitCode": 1, "reason": "Error", "message": "first try"})
    await kube.set_job_status(NS, "agent-t1", active=0, failed=2, conditions=[job_condition("Failed", reason="BackoffLimitExceeded")])

    job = await runtime.finished_job("t1")
    assert job["status"]["agentExit"] == {"reason": "OOMKilled", "exitCode": 137}
    assert job["status"]["terminationMessage"] == "step 41: cloning\nKilled"
    assert kube.get(JOBS, NS, "agent-t1")["status"].get("terminationMessage") is None  # read, never written back


async def test_without_its_pods_a_finished_job_is_still_finished(kube, runtime):
    await runtime.launch(make_task())
    await kube.set_job_status(NS, "agent-t1", active=0, succeeded=1, conditions=[job_condition("Complete")])
    job = await runtime.finished_job("t1")  # no pods (deleted, or never listed): nothing to add
    assert job is not None and "agentExit" not in job["status"]
    kube.fail_next("list", "pods", 403, "pods is forbidden")
    assert (await runtime.finished_job("t1"))["status"]["conditions"][-1]["type"] == "Complete"
