"""PodmanRuntime with real podman and the real agent image (scripts/build-images): the example task to
`done` with its final snapshot in S3 (moto over HTTP, reached from the pod), the containers as the Job
says (read-only root, UID 1000, no capabilities, no new privileges); an agent OOM-killed under its
memory limit and an agent that crashes with exit code 2 each reach the Job event with their reason and
their last log lines, and the crash is retried backoffLimit times.

Select them with `-k podman`. Outside CI (no `CI` variable) they skip when podman or the image is
missing; in CI they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from agent import contract
from functions.core import factory
from functions.core.settings import Settings
from functions.core.task import parse_task
from functions.handlers.job_finished import _agent_exit_reason
from functions.runtime import make_runtime
from functions.runtime.podman.cli import default_containers_conf
from tests.conftest import REPO_ROOT, eventually_async

AGENT_IMAGE = Settings.default("agent_image")
# The runtime's own default (images/containers.conf), unless the environment names one.
CONTAINERS_CONF = os.environ.get("CONTAINERS_CONF") or default_containers_conf()
PODMAN_ENV = {**os.environ, **({"CONTAINERS_CONF": CONTAINERS_CONF} if CONTAINERS_CONF else {})}
TASK_SECONDS = 240  # generous: a loaded 2-core machine, sidecars with startup probes


def _missing() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (./scripts/install-test-packages podman runc uidmap mmdebstrap)"
    if subprocess.run(["podman", "image", "exists", AGENT_IMAGE], env=PODMAN_ENV).returncode != 0:
        return f"the image {AGENT_IMAGE} is not built (./scripts/build-images)"
    return None


@pytest.fixture(scope="module")
def podman_ready():
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the podman runtime: {missing}")
        pytest.skip(missing)


@pytest.fixture
def stand_in_image(podman_ready, tmp_path):
    """The agent image whose `python -m agent run` is a stand-in (crash.py): restore, snapshotter and the
    other containers are the real ones. Only COPY layers: built in a second or two, removed after."""
    context = tmp_path / "image"
    (context / "agent").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "agent" / "__main__.py", context / "agent" / "real_main.py")
    (context / "agent" / "__main__.py").write_text(
        "import os, runpy, sys, time\n"
        "if sys.argv[1:2] == ['run']:\n"
        "    for i in range(120):\n"
        "        print(f'stand-in agent line {i}', flush=True)\n"
        "    if os.environ.get('DOCKYARD_TASK_ID', '').startswith('slow'):\n"
        "        import signal\n"
        "        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as the agent: stop after the step\n"
        "        time.sleep(600)\n"
        "    if os.environ.get('DOCKYARD_TASK_ID', '').startswith('hung'):\n"
        f"        beat = {contract.WORKSPACE_MOUNT + '/' + contract.HEARTBEAT_FILE!r}\n"
        "        os.makedirs(os.path.dirname(beat), exist_ok=True)\n"
        "        open(beat, 'w').close()\n"
        "        os.utime(beat, (time.time() - 3600, time.time() - 3600))  # a heartbeat an hour old: hung\n"
        "        time.sleep(600)\n"
        "    if os.environ.get('DOCKYARD_TASK_ID', '').startswith('probe'):\n"  # an attacker's look around (tests/security)
        "        import json\n"
        "        found = {'secrets_dir': os.path.exists('/var/secrets'), 'uid': os.getuid(), 'gid': os.getgid(),\n"
        "                 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
        "                 'cap_eff': [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]}\n"
        "        try:\n"
        "            open('/probe', 'w')\n"
        "            found['root_write'] = 'written'\n"
        "        except OSError as exc:\n"
        "            found['root_write'] = exc.strerror\n"
        "        with open('/workspace/probe.json', 'w') as out:\n"
        "            json.dump(found, out)\n"
        "    if os.environ.get('DOCKYARD_TASK_ID', '').startswith('oom'):\n"
        "        hog = [bytearray(1 << 20) for _ in range(4096)]  # 4 GiB against a small limit\n"
        "    sys.exit(2)\n"
        "runpy.run_module('agent.real_main', run_name='__main__')\n"
    )
    (context / "Containerfile").write_text(f"FROM {AGENT_IMAGE}\nCOPY agent/ /app/agent/\n")
    tag = f"localhost/dockyard-test-stand-in:{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "build", "-q", "-t", tag, str(context)], env=PODMAN_ENV, check=True, capture_output=True)
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], env=PODMAN_ENV, capture_output=True)


@pytest.fixture
def podman_settings(podman_ready, tmp_path, hub, s3_store_url, s3_endpoint):
    """Settings as `dockyard dev --runtime podman` makes them: the hub's NATS (and leafnode port), S3, a signing key."""
    secret_dir = tmp_path / "object-store"
    secret_dir.mkdir()
    for name, value in {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}.items():
        (secret_dir / name).write_text(value)
    hub.create_agent_stream()
    return Settings(
        runtime="podman",
        data_dir=tmp_path / "data",
        store=s3_store_url,
        s3_endpoint=s3_endpoint,
        nats_url=hub.url,
        nats_leaf_url=hub.leafnode_url,
        nats_account=hub.auth.account,
        nats_signing_key_file=str(hub.auth.signing_key_file),
        egress_proxy="",
        object_store_secret_dir=str(secret_dir),
        termination_grace_seconds=20,
        snapshot_interval_seconds=0,
        podman_containers_conf=CONTAINERS_CONF,
    )


def _task(task_id: str, **limits):
    example = json.loads((REPO_ROOT / "agent" / "examples" / "example_task.json").read_text())
    data = {**example, "task_id": task_id, "model": "scripted:example", "limits": {**example["limits"], **limits}}
    return parse_task(data, source="test", event_id=task_id, policy=Settings().limits)


async def _run(settings: Settings, task, **runtime_options) -> tuple[dict, float, object]:
    events: list[dict] = []

    async def emit(event: dict) -> None:
        events.append(event)

    runtime = make_runtime(settings, emit_job_event=emit, backoff_seconds=0.5, **runtime_options)
    began = time.monotonic()
    try:
        assert await runtime.launch(task) is True
        assert await runtime.launch(task) is False  # same spec again: nothing new
        await eventually_async(lambda: events, f"the job event of {task.task_id}", TASK_SECONDS, interval=0.2,
                               detail=lambda: _pod_logs(task.task_id))
        return events[0]["data"], time.monotonic() - began, runtime
    finally:
        await runtime.close()


def _pod_logs(task_id: str) -> str:
    out = []
    for container in ("restore", "snapshotter", "gateway", "nats-leaf", "agent"):
        name = f"{contract.job_name(task_id)}-{container}"
        logs = subprocess.run(["podman", "logs", "--tail", "15", name], env=PODMAN_ENV, capture_output=True, text=True)
        out.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
    return "\n".join(out)


def _inspect(name: str) -> dict:
    out = subprocess.run(["podman", "inspect", name], env=PODMAN_ENV, capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def _cleanup(runtime, task_id: str) -> None:
    subprocess.run(["podman", "pod", "rm", "-f", "-t", "0", contract.job_name(task_id)], env=PODMAN_ENV, capture_output=True)
    subprocess.run(["podman", "volume", "rm", "-f", contract.pvc_name(task_id)], env=PODMAN_ENV, capture_output=True)


async def test_the_example_task_runs_to_done_in_a_podman_pod_with_its_final_snapshot_in_s3(podman_settings):
    from agent.storage import open_store

    task_id = f"pod-{uuid.uuid4().hex[:8]}"
    settings = podman_settings.updated({"ttl_succeeded_seconds": 0})
    job, seconds, runtime = await _run(settings, _task(task_id), sweep_interval_seconds=3600)
    try:
        print(f"\nexample task under podman: {seconds:.1f}s from launch to the job event")
        condition = job["status"]["conditions"][0]
        assert condition["type"] == "Complete", (job["status"], _pod_logs(task_id))
        assert job["status"]["agentExit"] == {"reason": "Completed", "exitCode": 0}
        store = open_store(podman_settings.store)  # the test's own credentials (s3_store_url's environment)
        assert store.exists(contract.final_result_key(task_id)), store.list(contract.checkpoints_prefix(task_id))
        result = json.loads(store.get_bytes(contract.final_result_key(task_id)))
        assert result["outcome"] == contract.OUTCOME_DONE
        # The containers ran as the Job says: read-only root, UID/GID 1000, every capability dropped.
        for container in ("restore", "snapshotter", "gateway", "nats-leaf", "agent"):
            info = _inspect(f"{contract.job_name(task_id)}-{container}")
            assert info["HostConfig"]["ReadonlyRootfs"] is True, container
            assert info["Config"]["User"] == "1000:1000", container
            assert info["EffectiveCaps"] in (None, []), (container, info["EffectiveCaps"])
            assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"], container
            assert info["State"]["ExitCode"] in (0, 143), (container, info["State"])  # sidecars stop on SIGTERM
        # Past its TTL (0 here), with the final snapshot stored: the janitor removes the pod and the volume.
        await runtime.sweep()
        assert runtime.folders.load(task_id).workspace_removed
        for kind, name in (("pod", contract.job_name(task_id)), ("volume", contract.pvc_name(task_id))):
            exists = subprocess.run(["podman", kind, "exists", name], env=PODMAN_ENV).returncode == 0
            assert not exists, f"{kind} {name} is still there"
    finally:
        _cleanup(runtime, task_id)


async def test_an_oom_killed_agent_reaches_the_job_event_with_oomkilled_and_its_last_lines(podman_settings, stand_in_image):
    settings = podman_settings.updated({"agent_image": stand_in_image, "agent_memory_limit": "64Mi", "agent_memory_request": "64Mi"})
    task_id = f"oom-{uuid.uuid4().hex[:8]}"
    job, _, runtime = await _run(settings, _task(task_id, retries=0))
    try:
        status = job["status"]
        assert status["agentExit"]["reason"] == "OOMKilled", (status, _pod_logs(task_id))
        assert status["agentExit"]["exitCode"] == 137
        assert _agent_exit_reason(job) == "OOMKilled (exit code 137)"
        lines = status["terminationMessage"].splitlines()
        assert lines[-1] == "stand-in agent line 119" and len(lines) <= 80, lines[-3:]
        assert len(status["terminationMessage"].encode()) <= 2048
    finally:
        _cleanup(runtime, task_id)


async def test_an_agent_the_liveness_probe_stops_ends_with_its_exit_and_last_lines(podman_settings, stand_in_image, monkeypatch):
    """The Job's liveness probe (the heartbeat check), run as the kubelet runs it: timings shortened for the
    test, the probe's command and the reaction as rendered. A hung agent is stopped, its end and last lines
    reach the Job event. The hung stand-in is its container's PID 1 without a SIGTERM handler, so only the
    SIGKILL after the probe's grace period ends it (137), as the kubelet's would in the cluster."""
    monkeypatch.setattr(factory, "AGENT_LIVENESS_TIMING", {
        "initialDelaySeconds": 1, "periodSeconds": 1, "timeoutSeconds": 10, "failureThreshold": 2,
        "terminationGracePeriodSeconds": 5,
    })  # fmt: skip
    settings = podman_settings.updated({"agent_image": stand_in_image, "heartbeat_stale_seconds": 60})
    task_id = f"hung-{uuid.uuid4().hex[:8]}"
    job, _, runtime = await _run(settings, _task(task_id, retries=0))
    try:
        status = job["status"]
        assert (status["conditions"][0]["type"], status["conditions"][0]["reason"]) == ("Failed", "BackoffLimitExceeded"), status
        assert status["agentExit"]["exitCode"] == 137, status
        assert _agent_exit_reason(job) == "Error (exit code 137)"
        assert status["terminationMessage"].splitlines()[-1] == "stand-in agent line 119"
    finally:
        _cleanup(runtime, task_id)


async def test_a_crashing_agent_is_retried_backofflimit_times_then_reports_error_exit_code_2(podman_settings, stand_in_image):
    settings = podman_settings.updated({"agent_image": stand_in_image})
    task_id = f"crash-{uuid.uuid4().hex[:8]}"
    job, _, runtime = await _run(settings, _task(task_id, retries=1))
    try:
        status = job["status"]
        condition = status["conditions"][0]
        assert (condition["type"], condition["reason"]) == ("Failed", "BackoffLimitExceeded"), status
        assert status["failed"] == 2  # the first attempt and backoffLimit=1 retry
        assert job["spec"]["backoffLimit"] == 1
        assert _agent_exit_reason(job) == "Error (exit code 2)"
        assert status["terminationMessage"].splitlines()[-1] == "stand-in agent line 119"
        state = runtime.folders.load(task_id)
        assert state.exit_codes == [2, 2]
    finally:
        _cleanup(runtime, task_id)


async def test_a_shutdown_stops_the_pod_the_next_runtime_runs_it_again_and_cancel_stops_it(podman_settings, stand_in_image):
    settings = podman_settings.updated({"agent_image": stand_in_image})
    task_id = f"slow-{uuid.uuid4().hex[:8]}"
    agent = f"{contract.job_name(task_id)}-agent"
    events: list[dict] = []

    async def emit(event: dict) -> None:
        events.append(event)

    def agent_running() -> bool:
        out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", agent], env=PODMAN_ENV, capture_output=True, text=True)
        return out.stdout.strip() == "true"

    first = make_runtime(settings, emit_job_event=emit)
    try:
        await first.launch(_task(task_id))
        await eventually_async(agent_running, "the agent container running", TASK_SECONDS, interval=0.2)
    finally:
        await first.close()  # a clean stop: SIGTERM, the agent exits 143, the task stays unfinished
    assert _inspect(agent)["State"]["ExitCode"] == 143
    state = first.folders.load(task_id)
    assert not state.finished and state.attempts == 1

    second = make_runtime(settings, emit_job_event=emit)
    try:
        assert await second.resume_running() == [task_id]
        await eventually_async(lambda: agent_running() and second.folders.load(task_id).attempts == 2,
                               "the agent running again in a new pod", TASK_SECONDS, interval=0.2)
        began = time.monotonic()
        await second.cancel(task_id)
        assert time.monotonic() - began < settings.termination_grace_seconds + 15
        await eventually_async(lambda: events, "the job event", TASK_SECONDS, interval=0.2)
        assert events[0]["data"]["status"]["conditions"][0]["reason"] == "Cancelled"
        assert not agent_running()
        # The sidecars were stopped too (the snapshotter's final upload done): nothing of the pod runs.
        out = subprocess.run(["podman", "ps", "--filter", f"pod={contract.job_name(task_id)}", "--format", "{{.Names}}"],
                             env=PODMAN_ENV, capture_output=True, text=True).stdout.split()
        assert [name for name in out if not name.endswith("-infra")] == [], out
    finally:
        await second.close()
        _cleanup(second, task_id)


async def test_the_jobs_deadline_stops_the_pod(podman_settings, stand_in_image):
    settings = podman_settings.updated({"agent_image": stand_in_image})
    task_id = f"slow-{uuid.uuid4().hex[:8]}"
    job, _, runtime = await _run(settings, _task(task_id, deadline_seconds=15))
    try:
        condition = job["status"]["conditions"][0]
        assert (condition["type"], condition["reason"]) == ("Failed", "DeadlineExceeded"), job["status"]
        assert job["spec"]["activeDeadlineSeconds"] == 15
        agent = _inspect(f"{contract.job_name(task_id)}-agent")["State"]
        assert (agent["Running"], agent["ExitCode"]) == (False, 143)  # SIGTERM: it stopped after its step
    finally:
        _cleanup(runtime, task_id)


async def test_a_pod_podman_cannot_make_is_a_failed_attempt_with_podmans_error(podman_settings):
    settings = podman_settings.updated({"agent_image": "localhost/dockyard-no-such-image:0", "image_pull_policy": "Never"})
    task_id = f"noimage-{uuid.uuid4().hex[:8]}"
    job, _, runtime = await _run(settings, _task(task_id, retries=1))
    try:
        status = job["status"]
        assert status["conditions"][0]["reason"] == "BackoffLimitExceeded", status
        assert status["failed"] == 2
        assert "the pod could not run" in status["terminationMessage"] and "dockyard-no-such-image" in status["terminationMessage"]
    finally:
        _cleanup(runtime, task_id)


async def test_a_stale_volume_left_by_a_job_that_is_gone_is_replaced(podman_settings, tmp_path):
    from functions.runtime.podman.translate import JOB_UID_LABEL

    settings = podman_settings.updated({"agent_image": "localhost/dockyard-no-such-image:0", "image_pull_policy": "Never"})
    task_id = f"stale-{uuid.uuid4().hex[:8]}"
    volume = contract.pvc_name(task_id)
    subprocess.run(["podman", "volume", "create", "--label", f"{JOB_UID_LABEL}=another", "--opt", "type=none", "--opt", "o=bind",
                    "--opt", f"device={tmp_path / 'gone'}", volume], env=PODMAN_ENV, check=True, capture_output=True)
    job, _, runtime = await _run(settings, _task(task_id, retries=0))
    try:
        labels = _inspect_volume(volume)["Labels"]
        assert labels[JOB_UID_LABEL] == job["metadata"]["uid"]  # ours now: the old one's workspace folder was gone
        assert "dockyard-no-such-image" in job["status"]["terminationMessage"]  # and the attempt went on to the image
    finally:
        _cleanup(runtime, task_id)


def _inspect_volume(name: str) -> dict:
    out = subprocess.run(["podman", "volume", "inspect", name], env=PODMAN_ENV, capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]
