"""KubernetesRuntime with NATS credentials: the Secret `agent-<id>` with each task's own users.

Against the API emulator over real HTTP; the minted users are then tried on a real
nats-server in operator mode (the `nats_server` fixture's trust chain), so what the
Secret holds is judged by the server, not by reading the JWT.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from kube_emulator import JOBS, PVCS, SECRETS

from agent import contract
from functions.core import factory
from functions.core.nats_jwt import CREDENTIALS_MARGIN_SECONDS, TASK_ROLES, decode_claims
from functions.core.settings import Settings
from functions.core.task import parse_task
from functions.errors import ApiRejected, ApiUnavailable, PermanentError, TransientError
from functions.runtime.kubernetes import KubernetesRuntime
from tests.conftest import eventually_async

NS = contract.AGENTS_NAMESPACE


def make_task(task_id: str = "t1", **data):
    return parse_task({"prompt": "fix the tests", "task_id": task_id, **data}, source="test", event_id="e1")


@pytest.fixture
def creds_settings(nats_server):
    return Settings(nats_url=nats_server.url, nats_account=nats_server.auth.account,
                    nats_signing_key_file=str(nats_server.auth.signing_key_file))


@pytest.fixture
def runtime(kube_client, creds_settings):
    return KubernetesRuntime(creds_settings, kube_client, request_timeout=2)


def secret_creds(secret: dict) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def user_jwt(creds_text: str) -> str:
    lines = creds_text.splitlines()
    return lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]


# --- the Secret --------------------------------------------------------------------


async def test_launch_creates_a_secret_owned_by_the_job_with_one_user_per_process(kube, runtime):
    task = make_task(limits={"deadline_seconds": 900})
    before = int(time.time())
    assert await runtime.launch(task) is True
    after = int(time.time())

    job, secret, pvc = kube.get(JOBS, NS, "agent-t1"), kube.get(SECRETS, NS, "agent-t1"), kube.get(PVCS, NS, "workspace-t1")
    (ref,) = secret["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "batch/v1", "kind": "Job", "name": "agent-t1", "uid": job["metadata"]["uid"],
                   "controller": True, "blockOwnerDeletion": True}
    assert secret["metadata"]["labels"] == contract.agent_labels("t1")
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    # Job, then Secret, then PVC (the last step, whose create decides who completed the launch).
    versions = [int(o["metadata"]["resourceVersion"]) for o in (job, secret, pvc)]
    assert versions == sorted(versions)

    creds = secret_creds(secret)
    assert sorted(creds) == ["agent.creds", "gateway.creds", "snapshotter.creds"]
    claims = {role: decode_claims(user_jwt(creds[f"{role}.creds"])) for role in TASK_ROLES}
    assert claims["agent"]["sub"] != claims["snapshotter"]["sub"]  # two users, not one shared
    for role, claim in claims.items():
        assert claim["name"] == f"task-t1-{role}"
        assert before + 900 + CREDENTIALS_MARGIN_SECONDS <= claim["exp"] <= after + 900 + CREDENTIALS_MARGIN_SECONDS
        assert claim["nats"]["issuer_account"] == runtime.settings.nats_account


async def test_a_second_launch_keeps_the_secret(kube, runtime):
    task = make_task()
    assert await runtime.launch(task) is True
    first = kube.get(SECRETS, NS, "agent-t1")
    assert await runtime.launch(task) is False
    assert kube.get(SECRETS, NS, "agent-t1") == first
    assert len(kube.live(SECRETS)) == 1 and len(kube.live(JOBS)) == 1 and len(kube.live(PVCS)) == 1


async def test_concurrent_launches_make_one_secret(kube, runtime):
    results = await asyncio.gather(*(runtime.launch(make_task()) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    assert len(kube.live(SECRETS)) == 1


async def test_a_launch_cut_short_before_the_secret_creates_it_on_redelivery(kube, runtime):
    task = make_task()
    kube.fail_next("create", "secrets", 503, "etcd is busy")
    with pytest.raises(ApiUnavailable) as caught:
        await runtime.launch(task)
    assert isinstance(caught.value, TransientError)
    assert "create Secret dockyard-agents/agent-t1" in str(caught.value)
    assert kube.get(JOBS, NS, "agent-t1") is not None
    assert kube.get(SECRETS, NS, "agent-t1") is None and kube.get(PVCS, NS, "workspace-t1") is None

    assert await runtime.launch(task) is True
    uid = kube.get(JOBS, NS, "agent-t1")["metadata"]["uid"]
    assert kube.get(SECRETS, NS, "agent-t1")["metadata"]["ownerReferences"][0]["uid"] == uid
    assert kube.get(PVCS, NS, "workspace-t1")["metadata"]["ownerReferences"][0]["uid"] == uid


async def test_a_forbidden_secret_is_permanent_and_names_the_rbac(kube, runtime):
    kube.fail_next("create", "secrets", 403, 'secrets is forbidden: User "system:serviceaccount:dockyard:dockyard-functions" cannot create')
    with pytest.raises(ApiRejected) as caught:
        await runtime.launch(make_task())
    assert isinstance(caught.value, PermanentError) and caught.value.api_status == 403
    assert "create on secrets" in str(caught.value) and "knative/" in str(caught.value)
    assert kube.get(PVCS, NS, "workspace-t1") is None


async def test_cancel_takes_the_secret_along(kube, runtime):
    await runtime.launch(make_task("t1"))
    await runtime.launch(make_task("t2"))
    await runtime.cancel("t1")
    assert kube.get(SECRETS, NS, "agent-t1") is None  # garbage-collected through its ownerReference
    assert kube.get(SECRETS, NS, "agent-t2") is not None


async def test_without_a_signing_key_there_is_no_secret_and_no_flag(kube, kube_client):
    runtime = KubernetesRuntime(Settings(), kube_client, request_timeout=2)
    assert runtime.issuer is None
    assert await runtime.launch(make_task()) is True
    assert kube.live(SECRETS) == []
    spec = kube.get(JOBS, NS, "agent-t1")["spec"]["template"]["spec"]
    assert not any("--nats-creds" in c["args"] for c in spec["initContainers"] + spec["containers"])


async def test_a_signing_key_that_cannot_sign_stops_the_runtime_at_start(kube_client, tmp_path, nats_server):
    from functions.errors import SettingsError

    bad = tmp_path / "signing-key.nk"
    bad.write_text((nats_server.auth.directory / "creds" / "functions.creds").read_text())  # a user's creds, not a seed
    settings = Settings(nats_account=nats_server.auth.account, nats_signing_key_file=str(bad))
    with pytest.raises(SettingsError, match="DOCKYARD_NATS_SIGNING_KEY_FILE"):
        KubernetesRuntime(settings, kube_client)


# --- what the server lets the minted users do ------------------------------------------------


async def _connect_as(nats_server, tmp_path, creds_text: str, task_id: str, errors: list):
    import nats

    path = tmp_path / f"{len(errors)}-{time.monotonic_ns()}.creds"
    path.write_text(creds_text)

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())  # nats-py: 'nats: permissions violation for publish to "x"'

    return await nats.connect(nats_server.url, user_credentials=str(path), inbox_prefix=contract.inbox_prefix(task_id),
                              error_cb=on_error, allow_reconnect=False, connect_timeout=2)


async def _stream_subjects(nats_server) -> list[str]:
    admin = await nats_server.connect()
    try:
        js = admin.jetstream()
        info = await js.stream_info(contract.STREAM_NAME, subjects_filter=">")
        return sorted((info.state.subjects or {}).keys())
    finally:
        await admin.close()


async def _publishes_its_own_trace_only(nats_server, tmp_path, creds_text: str, role: str) -> None:
    """Task t1's user `role`: its events and logs acked; t2's subjects, and everyone's, refused by the server."""
    from nats.errors import TimeoutError as NatsTimeout

    errors: list[str] = []
    nc = await _connect_as(nats_server, tmp_path, creds_text, "t1", errors)
    try:
        js = nc.jetstream()
        ack = await js.publish(contract.subject_events("t1"), f"{role} was here".encode(), timeout=2)
        assert ack.stream == contract.STREAM_NAME and ack.seq >= 1
        await js.publish(contract.subject_logs("t1"), b"a log line", timeout=2)

        with pytest.raises(NatsTimeout):  # refused: no ack ever comes
            await js.publish(contract.subject_events("t2"), b"forged", timeout=0.5)
        await eventually_async(lambda: any("permissions violation for publish" in e and "events.agent.t2" in e for e in errors),
                               "the server refused the publish on another task's subject", detail=lambda: errors)

        await nc.subscribe(contract.subject_cmd("t1"))  # its own commands: allowed
        await nc.subscribe(contract.subject_cmd("t2"))  # another task's: refused
        await nc.subscribe("events.agent.>")  # everyone's trace: refused
        await nc.flush()
        await eventually_async(
            lambda: any("permissions violation for subscription" in e and "cmd.agent.t2" in e for e in errors)
            and any("permissions violation for subscription" in e and "events.agent.>" in e for e in errors),
            "the server refused the foreign subscriptions", detail=lambda: errors)
        assert not any("cmd.agent.t1" in e for e in errors), errors
    finally:
        await nc.close()


async def test_the_secret_s_users_may_publish_the_task_s_trace_and_nothing_of_another_task(kube, runtime, nats_server, tmp_path):
    from functions.core.bus import ensure_stream

    admin = await nats_server.connect()
    await ensure_stream(admin.jetstream())  # the functions create the stream before any launch
    await admin.close()
    await runtime.launch(make_task("t1"))
    creds = secret_creds(kube.get(SECRETS, NS, "agent-t1"))

    for role in TASK_ROLES:
        await _publishes_its_own_trace_only(nats_server, tmp_path, creds[f"{role}.creds"], role)

    assert await _stream_subjects(nats_server) == [contract.subject_events("t1"), contract.subject_logs("t1")]


async def test_another_task_s_users_cannot_touch_this_task(kube, runtime, nats_server, tmp_path):
    await runtime.launch(make_task("t1"))
    await runtime.launch(make_task("t2"))
    t2 = secret_creds(kube.get(SECRETS, NS, "agent-t2"))
    errors: list[str] = []
    nc = await _connect_as(nats_server, tmp_path, t2["agent.creds"], "t2", errors)
    try:
        await nc.publish(contract.subject_cmd("t1"), b'{"op": "cancel"}')  # a command to t1: refused
        await nc.flush()
        await eventually_async(lambda: any("permissions violation for publish" in e and "cmd.agent.t1" in e for e in errors),
                               "the server refused the command to another task", detail=lambda: errors)
    finally:
        await nc.close()


def test_the_factory_roles_are_the_minted_roles():
    assert factory.NATS_ROLES == TASK_ROLES
