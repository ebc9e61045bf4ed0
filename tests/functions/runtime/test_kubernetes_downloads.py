"""A task through the Kubernetes runtime (the API emulator, its RBAC), finished, then downloaded through the stream.

The functions launch the Job (task_submitted over the emulator); the pod is played by the
snapshotter's real final step (`agent.snapshot.upload_final`: the archive, the change set and
result.json into moto's S3 server over HTTP) over a workspace whose repository was cloned and
edited; the Job controller by the emulator's status; job_finished reads the Job back and the
store, and records the task finished. Then the stream app serves its change set and workspace
to a read token, and `dockyard download --url` unpacks it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
from kube_emulator import JOBS, job_condition

from agent import changes, contract
from agent.snapshot import upload_final
from agent.storage import open_store
from functions.runtime.kubernetes import KubernetesRuntime
from tests.agent.test_changes import cloned_workspace
from tests.conftest import REPO_ROOT, agent_environment
from tests.functions.stream.conftest import serve  # noqa: F401  (the stream app under uvicorn)
from tests.functions.stream.support import READ_TOKEN, replace_settings, write_tokens_file

pytestmark = pytest.mark.timeout(180)

TASK = "k8s-download"
SUBMITTED = contract.EVENT_TASK_SUBMITTED


@pytest.fixture
def settings(base_settings, s3_store_url, tmp_path):
    """The functions' settings with the S3 store (moto over HTTP) and the stream's tokens file."""
    return replace_settings(base_settings, store=s3_store_url, api_tokens_file=write_tokens_file(tmp_path / "api-tokens"))


@pytest.fixture
def runtime(kube_client, settings):
    return KubernetesRuntime(settings, kube_client, request_timeout=5)


async def test_a_task_finished_in_the_cluster_is_downloaded_through_the_stream(kube, post, bus, settings, serve, tmp_path):  # noqa: F811
    answer = await post("task_submitted", SUBMITTED, {"prompt": "edit", "task_id": TASK})
    assert answer.status_code == 200, answer.text
    assert kube.get(JOBS, contract.AGENTS_NAMESPACE, contract.job_name(TASK)) is not None

    # The pod: the agent cloned and edited; the snapshotter's final step stores the final set.
    workspace, repo, _base = cloned_workspace(tmp_path, {"edit.txt": "one\ntwo\n", "gone.txt": "bye\n"})
    (repo / "edit.txt").write_text("one\ntwo, changed\n")
    (repo / "gone.txt").unlink()
    (repo / "added.txt").write_text("new\n")
    store = open_store(settings.store)
    final = upload_final(workspace, store, TASK)
    assert final.result["changes_patch_key"] == changes.patch_key(TASK), final.result

    # The Job controller, then job_finished with the Job as the ApiServerSource sends it.
    await kube.set_job_status(contract.AGENTS_NAMESPACE, contract.job_name(TASK), succeeded=1, conditions=[job_condition("Complete")])
    job = kube.get(JOBS, contract.AGENTS_NAMESPACE, contract.job_name(TASK))
    answer = await post("job_finished", contract.EVENT_JOB_UPDATE, job)
    assert answer.status_code == 200 and answer.json()["final_snapshot_missing"] is False, answer.text
    assert (await bus.registry.get(TASK))["state"] == contract.STATE_FINISHED

    server = await serve()
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with httpx.AsyncClient(timeout=60) as client:
        patch = await client.get(f"{server.url}/api/tasks/{TASK}/changes.patch", headers=headers)
        refused = await client.get(f"{server.url}/api/tasks/{TASK}/changes.patch")
    assert patch.status_code == 200 and patch.content == store.get_bytes(changes.patch_key(TASK))
    assert b"-two\n+two, changed\n" in patch.content and b"+++ b/added.txt" in patch.content
    assert refused.status_code == 401

    dest = tmp_path / "downloaded"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "functions.cli", "download", TASK, "--to", str(dest), "--url", server.url, "--token", READ_TOKEN],
        cwd=REPO_ROOT, env=agent_environment(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (dest / "repo" / "edit.txt").read_text() == "one\ntwo, changed\n"
    assert (dest / "repo" / "added.txt").read_text() == "new\n" and not (dest / "repo" / "gone.txt").exists()

