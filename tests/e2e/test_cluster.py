"""End to end on a real cluster: launch -> the pod runs -> the Job completes -> cancel removes Job and PVC.

Opt-in: skipped unless DOCKYARD_E2E_KUBECONFIG names a kubeconfig. See docs/e2e.md.

    DOCKYARD_E2E_KUBECONFIG   kubeconfig of the cluster (required)
    DOCKYARD_E2E_AGENT_IMAGE  the agent image, already on the nodes or pullable (required)
    DOCKYARD_E2E_STORE        object store for restore/snapshotter (default: file:///tmp/dockyard-store,
                              the pod's own /tmp, so no object store is needed)
    DOCKYARD_E2E_TIMEOUT      seconds to wait for the Job to complete (default 600)

Other Job settings come from the usual DOCKYARD_* variables (functions/factory.py).
The namespace, the agent ServiceAccount and RBAC must be applied (knative/); the
object-store secret is created empty for the run if it does not exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest

from agent import contract
from functions.core.settings import Settings
from functions.core.task import parse_task
from tests.conftest import eventually_async

E2E_TIMEOUT = int(os.environ.get("DOCKYARD_E2E_TIMEOUT", "600"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("DOCKYARD_E2E_KUBECONFIG"), reason="set DOCKYARD_E2E_KUBECONFIG to run against a cluster"),
    pytest.mark.timeout(E2E_TIMEOUT + 300),
]

EXAMPLE_TASK = Path(__file__).resolve().parents[2] / "agent" / "examples" / "example_task.json"


@pytest.fixture
def api_client():
    from kubernetes import config

    api = config.new_client_from_config(config_file=os.environ["DOCKYARD_E2E_KUBECONFIG"])
    yield api
    api.close()


@pytest.fixture
def settings():
    image = os.environ.get("DOCKYARD_E2E_AGENT_IMAGE")
    if not image:
        pytest.skip("set DOCKYARD_E2E_AGENT_IMAGE to the agent image the cluster can run")
    return Settings.from_env().updated(
        {
            "agent_image": image,
            "store": os.environ.get("DOCKYARD_E2E_STORE", "file:///tmp/dockyard-store"),
            "default_model": "scripted:example",
            "ttl_seconds_after_finished": 600,
        }
    )


@pytest.fixture
async def prerequisites(api_client, settings):
    """The namespace and ServiceAccount must exist (knative/); an empty object-store secret is made if missing."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    ns = settings.namespace
    for what, read in (
        (f"namespace {ns}", lambda: core.read_namespace(ns)),
        (f"ServiceAccount {ns}/{settings.service_account}", lambda: core.read_namespaced_service_account(settings.service_account, ns)),
    ):
        try:
            await asyncio.to_thread(read)
        except ApiException as exc:
            if exc.status == 404:
                pytest.fail(f"{what} does not exist: apply knative/ first (docs/e2e.md)")
            raise
    created_secret = False
    try:
        await asyncio.to_thread(core.read_namespaced_secret, settings.object_store_secret, ns)
    except ApiException as exc:
        if exc.status != 404:
            raise
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": settings.object_store_secret, "namespace": ns}, "data": {}}
        await asyncio.to_thread(core.create_namespaced_secret, ns, secret)
        created_secret = True
    yield
    if created_secret:
        await asyncio.to_thread(core.delete_namespaced_secret, settings.object_store_secret, ns)


async def test_a_task_runs_to_completion_and_cancel_cleans_up(api_client, settings, prerequisites):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from functions.runtime.kubernetes import KubernetesRuntime

    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    ns = settings.namespace
    task_id = f"e2e-{uuid.uuid4().hex[:8]}"
    task = parse_task({**json.loads(EXAMPLE_TASK.read_text()), "task_id": task_id}, source="tests/e2e", event_id=task_id)
    runtime = KubernetesRuntime(settings, api_client)
    selector = f"{contract.LABEL_TASK_ID}={task_id}"

    async def pod_phase():
        pods = await asyncio.to_thread(core.list_namespaced_pod, ns, label_selector=selector)
        phases = [p.status.phase for p in pods.items]
        return next((phase for phase in phases if phase in ("Running", "Succeeded")), None)

    async def finished():
        return await runtime.finished_job(task_id)

    async def gone(read):
        try:
            await asyncio.to_thread(read)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    try:
        assert await runtime.launch(task) is True
        assert await runtime.launch(task) is False  # a redelivery changes nothing

        job = await asyncio.to_thread(batch.read_namespaced_job, contract.job_name(task_id), ns)
        pvc = await asyncio.to_thread(core.read_namespaced_persistent_volume_claim, contract.pvc_name(task_id), ns)
        assert pvc.metadata.owner_references[0].uid == job.metadata.uid

        await eventually_async(pod_phase, f"a pod of Job {contract.job_name(task_id)} to run", timeout=300, interval=2)
        job = await eventually_async(finished, "the Job to finish", timeout=E2E_TIMEOUT, interval=5)
        conditions = [c for c in job["status"]["conditions"] if c.get("status") == "True"]
        assert [c["type"] for c in conditions if c["type"] in ("Complete", "Failed")] == ["Complete"], f"the Job failed: {job['status']}"
    finally:
        try:
            await runtime.cancel(task_id)
        except Exception:  # noqa: BLE001 - cleanup; the assertions below report what is left
            pass

    await eventually_async(lambda: gone(lambda: batch.read_namespaced_job(contract.job_name(task_id), ns)), "the Job to be deleted", timeout=120, interval=2)
    await eventually_async(
        lambda: gone(lambda: core.read_namespaced_persistent_volume_claim(contract.pvc_name(task_id), ns)),
        "the PVC to be garbage-collected with its Job",
        timeout=180,
        interval=2,
    )
