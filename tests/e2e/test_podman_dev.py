"""`dockyard dev --runtime podman` end to end, as a user starts it: the example task to `done` in a podman
pod, and an agent OOM-killed under its memory limit whose reason and last log lines reach the task's
registry record and its trace through `job_finished` (the same code as in the cluster).

Needs podman and the agent image (scripts/build-images): outside CI skipped when missing, in CI failed.
S3 is moto's server over HTTP (the tests' fixture), reached from the pods at the podman host address.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from agent import contract
from functions.cli import client
from tests.conftest import eventually
from tests.dev_process import DevServer
from tests.functions.devstack.test_dev import collect, example_task, wait_record
from tests.functions.runtime.test_podman_runtime import CONTAINERS_CONF, PODMAN_ENV, podman_ready, stand_in_image  # noqa: F401 (fixtures)

# A whole task in podman pods (containers started one by one, each sidecar's startup probe polled by
# `podman exec`): a loaded 2-core machine takes minutes, not the 30 s a local task gets.
POD_RUN_SECONDS = 180


@pytest.fixture
def podman_dev(podman_ready, tmp_path, s3_store_url, s3_endpoint):  # noqa: F811
    """Start `dockyard dev --runtime podman` with `env` added; stopped at the end."""
    secret_dir = tmp_path / "object-store"
    secret_dir.mkdir()
    for name, value in {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}.items():
        (secret_dir / name).write_text(value)
    started: list[DevServer] = []

    def start(**env: str) -> DevServer:
        base = {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "DOCKYARD_S3_ENDPOINT": s3_endpoint,
            "DOCKYARD_OBJECT_STORE_SECRET_DIR": str(secret_dir),
            "DOCKYARD_TERMINATION_GRACE_SECONDS": "20",
            **({"CONTAINERS_CONF": CONTAINERS_CONF} if CONTAINERS_CONF else {}),
        }  # fmt: skip
        dev = DevServer(tmp_path / "data", env={**base, **env}, args=("--runtime", "podman", "--store", s3_store_url))
        started.append(dev.start())
        return dev

    yield start
    for dev in started:
        try:
            dev.stop(POD_RUN_SECONDS)  # each pod's agent and sidecars stopped in turn, each with its grace
        finally:  # a dev that would not stop leaves its pods: the next run's tasks of the same id would meet them
            for task in (dev.data_dir / "tasks").iterdir() if (dev.data_dir / "tasks").is_dir() else ():
                _remove_pod(task.name)


def _remove_pod(task_id: str) -> None:
    subprocess.run(["podman", "pod", "rm", "-f", "-t", "0", contract.job_name(task_id)], env=PODMAN_ENV, capture_output=True)
    subprocess.run(["podman", "volume", "rm", "-f", contract.pvc_name(task_id)], env=PODMAN_ENV, capture_output=True)


def test_the_example_task_is_done_through_dockyard_dev_with_the_podman_runtime(podman_dev):
    dev = podman_dev()
    task_id = client.submit_task(dev.url, {**example_task(), "task_id": "podman-example"}, dev.token)
    record = wait_record(dev.token, dev.url, task_id, POD_RUN_SECONDS)
    assert (record["state"], record["outcome"]) == (contract.STATE_FINISHED, contract.OUTCOME_DONE), record
    assert not record.get("final_snapshot_missing"), record
    assert f"task {task_id} finished: done" in dev.output()


def test_an_oom_killed_agent_puts_oomkilled_and_its_last_lines_in_the_record_and_the_trace(podman_dev, stand_in_image):  # noqa: F811
    dev = podman_dev(DOCKYARD_AGENT_IMAGE=stand_in_image, DOCKYARD_AGENT_MEMORY_LIMIT="64Mi", DOCKYARD_AGENT_MEMORY_REQUEST="64Mi")
    task_id = client.submit_task(dev.url, {**example_task(), "task_id": "oom-dev", "limits": {"retries": 0}}, dev.token)
    record = wait_record(dev.token, dev.url, task_id, POD_RUN_SECONDS)
    assert record["outcome"] == contract.OUTCOME_FAILED, record
    assert record["reason"] == "the agent failed, with no retry left: OOMKilled (exit code 137)", record
    assert record["termination_message"].splitlines()[-1] == "stand-in agent line 119", record
    def is_finished(m) -> bool:
        return m.event == contract.EV_STATUS and m.data.get("state") == contract.STATE_FINISHED

    messages = asyncio.run(collect(dev.token, dev.url, task_id, until=is_finished))
    finished = [m.data for m in messages if m.event == contract.EV_STATUS and m.data.get("state") == contract.STATE_FINISHED]
    assert finished and finished[-1]["reason"] == record["reason"], finished
    assert "stand-in agent line 119" in finished[-1]["termination_message"]


def test_after_dev_crashes_its_running_pod_is_stopped_and_the_task_runs_again_in_a_new_one(podman_dev, stand_in_image):  # noqa: F811
    """The stand-in agent of a `slow-` task sleeps (SIGTERM: exit 143): dev dies hard with it running; podman
    keeps the pod; the next dev stops that pod (the agent gets SIGTERM) and runs the task again from its checkpoint."""
    dev = podman_dev(DOCKYARD_AGENT_IMAGE=stand_in_image)
    task_id = client.submit_task(dev.url, {**example_task(), "task_id": "slow-dev"}, dev.token)
    agent = f"{contract.job_name(task_id)}-agent"

    def running() -> bool:
        out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}} {{.State.StartedAt}}", agent],
                             env=PODMAN_ENV, capture_output=True, text=True).stdout.split(" ", 1)
        return out[0] == "true" and out[1].strip()

    first_start = eventually(running, "the agent container running", 120, interval=0.2, detail=dev.output)
    dev.crash()
    assert running(), "the pod outlives a dev killed hard (podman keeps it)"

    dev.start()
    eventually(lambda: running() and running() != first_start and dev.supervisor_state(task_id)["attempts"] == 2,
               "the task running again in a new pod", 120, interval=0.2, detail=dev.output)
    assert f"stopping the pod {contract.job_name(task_id)} left by the previous process" in dev.output()
