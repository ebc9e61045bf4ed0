"""The Job/PVC factory: every field DESIGN.md asks of the Job, checked on the rendered dicts."""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from agent import contract
from functions.core import factory, probes
from functions.cli import manifests
from functions.core.factory import render, render_job, render_pvc
from functions.core.settings import Resources, Settings
from functions.core.task import parse_task

ROOT = Path(__file__).resolve().parents[3]


NATS_HOST = urlsplit(Settings().nats_url).hostname


def make_task(**data):
    return parse_task({"prompt": "fix the tests", "task_id": "t1", **data}, source="test", event_id="e1")


@pytest.fixture
def task():
    return make_task(limits={"deadline_seconds": 900, "retries": 2, "storage": "7Gi"}, repo={"url": "https://example.com/r.git"})


@pytest.fixture
def job(task):
    return render_job(task, Settings())


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict, name: str) -> dict:
    spec = pod(job)
    (found,) = [c for c in spec["initContainers"] + spec["containers"] if c["name"] == name]
    return found


def env(c: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in c["env"]}


def mounts(c: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


def volumes(job: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod(job)["volumes"]}


# --- the Job ---------------------------------------------------------------------


def test_job_identity_labels_and_task_annotation(task, job):
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == "agent-t1"
    assert meta["namespace"] == contract.AGENTS_NAMESPACE
    assert meta["labels"] == contract.agent_labels("t1")
    assert json.loads(meta["annotations"][contract.ANNOTATION_TASK]) == task.to_dict()
    template = job["spec"]["template"]["metadata"]
    assert template["labels"] == contract.agent_labels("t1")
    # The downward API reads the pod's annotations: the task must be on the pod template too.
    assert template["annotations"][contract.ANNOTATION_TASK] == meta["annotations"][contract.ANNOTATION_TASK]


def test_job_limits_come_from_the_task(job):
    spec = job["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 900
    assert spec["ttlSecondsAfterFinished"] == Settings().ttl_seconds_after_finished
    assert "suspend" not in spec
    assert pod(job)["restartPolicy"] == "Never"


def test_pod_failure_policy(job):
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "agent", "operator": "In", "values": list(contract.NO_RETRY_EXIT_CODES)},
    }
    assert {"action": "FailJob", "onExitCodes": {"containerName": "restore", "operator": "In", "values": [contract.EXIT_FATAL]}} in rules
    assert rules[-1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # SIGTERM (resumable) is retried, never a FailJob.
    assert all(contract.EXIT_INTERRUPTED not in r.get("onExitCodes", {}).get("values", []) for r in rules)


def test_pod_is_restricted(job):
    spec = pod(job)
    assert spec["serviceAccountName"] == "dockyard-agent"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert spec["terminationGracePeriodSeconds"] == Settings().termination_grace_seconds >= 120
    names = [c["name"] for c in spec["initContainers"]] + [c["name"] for c in spec["containers"]]
    assert names == ["restore", "snapshotter", "gateway", "agent"]
    for c in spec["initContainers"] + spec["containers"]:
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert set(c["resources"]) == {"requests", "limits"}
        assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
        assert c["image"] == Settings().agent_image and c["imagePullPolicy"] == "IfNotPresent"
        # Secrets are files, never environment variables.
        assert all("valueFrom" not in item for item in c["env"])
        if c["name"] == "gateway":  # the model gateway: neither the workspace nor a writable place
            assert c["command"] == ["python", "-m", "gateway"]
            assert "/workspace" not in mounts(c) and "/tmp" not in mounts(c)
            continue
        assert c["command"] == ["python", "-m", "agent"]
        assert mounts(c)["/workspace"]["name"] == "workspace"
        assert "/tmp" in mounts(c)
        # Secrets are files, never environment variables.
        assert all("valueFrom" not in item for item in c["env"])
    assert "envFrom" not in str(spec)


def test_containers_run_the_agent_cli(job):
    restore, snapshotter, agent = (container(job, n) for n in ("restore", "snapshotter", "agent"))
    assert restore["args"][:3] == ["restore", "--task-id", "t1"]
    assert "restartPolicy" not in restore
    assert snapshotter["args"][0] == "snapshotter" and snapshotter["restartPolicy"] == "Always"  # native sidecar
    assert snapshotter["args"][snapshotter["args"].index("--interval") + 1] == str(Settings().snapshot_interval_seconds)
    assert agent["args"][0] == "run"
    assert agent["args"][agent["args"].index("--task-file") + 1] == contract.TASK_FILE
    for c in (restore, snapshotter):
        assert c["args"][c["args"].index("--store") + 1] == Settings().store
    for c in (snapshotter, agent):
        assert c["args"][c["args"].index("--nats") + 1] == Settings().nats_url
    for c in (restore, snapshotter, agent):
        assert env(c)["DOCKYARD_TASK_ID"] == "t1"
        assert env(c)["DOCKYARD_WORKSPACE"] == contract.WORKSPACE_MOUNT


def test_volumes_and_where_they_are_mounted(job):
    vols = volumes(job)
    assert vols["workspace"] == {"name": "workspace", "persistentVolumeClaim": {"claimName": "workspace-t1"}}
    assert "emptyDir" in vols["home"] and "emptyDir" in vols["tmp"]
    assert vols["task"]["downwardAPI"]["items"] == [
        {"path": "task.json", "fieldRef": {"fieldPath": f"metadata.annotations['{contract.ANNOTATION_TASK}']"}}
    ]
    assert vols["s3-credentials"]["secret"]["secretName"] == "dockyard-object-store"
    assert vols["model-credentials"]["secret"]["secretName"] == "dockyard-model"
    agent = container(job, "agent")
    assert mounts(agent)[contract.HOME_DIR]["name"] == "home"
    assert mounts(agent)["/etc/dockyard"] == {"name": "task", "mountPath": "/etc/dockyard", "readOnly": True}
    assert contract.TASK_FILE == "/etc/dockyard/task.json"
    assert "/home/agent" not in mounts(container(job, "restore")) and "/etc/dockyard" not in mounts(container(job, "restore"))


def test_secrets_only_where_needed(job):
    s3_dir, model_dir = f"{contract.SECRETS_DIR}/s3", f"{contract.SECRETS_DIR}/model"
    for name in ("restore", "snapshotter"):
        m = mounts(container(job, name))
        assert m[s3_dir] == {"name": "s3-credentials", "mountPath": s3_dir, "readOnly": True}
        assert model_dir not in m
    m = mounts(container(job, "gateway"))
    assert m[model_dir] == {"name": "model-credentials", "mountPath": model_dir, "readOnly": True}
    assert s3_dir not in m
    m = mounts(container(job, "agent"))
    assert s3_dir not in m and model_dir not in m


@pytest.mark.parametrize("nats", [False, True])
def test_the_agent_container_mounts_no_model_secret_only_the_gateway_does(task, nats):
    """Issue 10: `cat /var/secrets/model/api_key` in the agent's container found the key. Now no volume of the
    model Secret is mounted there, under any path, and no env var refers to a Secret."""
    job = render_job(task, Settings(**(NATS_SETTINGS if nats else {})))
    model_volumes = {name for name, v in volumes(job).items() if v.get("secret", {}).get("secretName") == Settings().model_secret}
    assert model_volumes == {"model-credentials"}
    holders = [c["name"] for c in pod(job)["initContainers"] + pod(job)["containers"]
               if any(m["name"] in model_volumes for m in c["volumeMounts"])]
    assert holders == ["gateway"]
    agent = container(job, "agent")
    assert "secretKeyRef" not in json.dumps(agent) and "envFrom" not in agent
    assert env(agent)["DOCKYARD_MODEL_GATEWAY"] == f"http://127.0.0.1:{contract.MODEL_GATEWAY_PORT}"
    assert "127.0.0.1" in env(agent)["NO_PROXY"].split(",")  # the SDK reaches the gateway directly, not via the proxy


def test_the_gateway_is_a_native_sidecar_with_the_task_budget(task):
    budgeted = make_task(limits={"max_tokens": 5000, "max_cost_usd": 1.5})
    gateway = container(render_job(budgeted, Settings(model_prices="gpt-4o=2.5/10")), "gateway")
    assert gateway["restartPolicy"] == "Always" and "startupProbe" in gateway
    args = gateway["args"]
    assert args[args.index("--task-id") + 1] == "t1" and args[args.index("--listen") + 1] == f"127.0.0.1:{contract.MODEL_GATEWAY_PORT}"
    assert (args[args.index("--max-tokens") + 1], args[args.index("--max-cost-usd") + 1]) == ("5000", "1.5")
    assert args[args.index("--prices") + 1] == "gpt-4o=2.5/10"
    assert env(gateway)["HTTPS_PROXY"] == Settings().egress_proxy  # to the provider through the egress proxy
    assert "--max-tokens" not in container(render_job(task, Settings()), "gateway")["args"]
    # It publishes usage as its own NATS user, on the task's own subjects only.
    nats_gateway = container(render_job(task, Settings(**NATS_SETTINGS)), "gateway")
    assert nats_gateway["args"][nats_gateway["args"].index("--nats-creds") + 1] == factory.nats_creds_path("gateway")


def test_agent_environment_home_path_and_proxy(job):
    e = env(container(job, "agent"))
    assert e["HOME"] == contract.HOME_DIR
    assert e["PYTHONUSERBASE"] == contract.PYTHONUSERBASE == "/home/agent/.local"
    assert e["PATH"].startswith("/home/agent/.local/bin:") and "/usr/local/bin" in e["PATH"]
    proxy = Settings().egress_proxy
    assert e["HTTP_PROXY"] == e["HTTPS_PROXY"] == e["http_proxy"] == e["https_proxy"] == proxy
    no_proxy = e["NO_PROXY"].split(",")
    assert e["no_proxy"] == e["NO_PROXY"]
    assert {".svc", ".cluster.local", NATS_HOST} <= set(no_proxy)
    # Restore and snapshotter talk to NATS and the store directly (the NetworkPolicy allows it).
    for name in ("restore", "snapshotter"):
        assert not {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"} & set(env(container(job, name)))


def test_no_proxy_names_the_store_endpoint_and_an_empty_proxy_means_none(task):
    settings = Settings(s3_endpoint="http://minio.storage.svc:9000", no_proxy=("10.0.0.0/8",))
    agent = container(render_job(task, settings), "agent")
    assert env(agent)["NO_PROXY"] == f"10.0.0.0/8,127.0.0.1,{NATS_HOST},minio.storage.svc"
    assert env(container(render_job(task, settings), "snapshotter"))["DOCKYARD_S3_ENDPOINT"] == "http://minio.storage.svc:9000"
    assert "HTTP_PROXY" not in env(container(render_job(task, Settings(egress_proxy="")), "agent"))


def test_liveness_probe_checks_the_heartbeat(job, tmp_path):
    probe = container(job, "agent")["livenessProbe"]
    command = probe["exec"]["command"]
    assert command[0] == "python"
    assert f"{contract.WORKSPACE_MOUNT}/{contract.HEARTBEAT_FILE}" in command[-1]
    assert probe["periodSeconds"] * (probe["failureThreshold"] - 1) + probe["initialDelaySeconds"] >= 60

    # Run the probe's code for real against a heartbeat file: fresh passes, stale fails, missing passes.
    heartbeat = tmp_path / "heartbeat"
    code = probes.heartbeat_probe_command(60)[-1].replace(f"{contract.WORKSPACE_MOUNT}/{contract.HEARTBEAT_FILE}", str(heartbeat))

    def probe_passes() -> bool:
        return subprocess.run(["python3", "-I", "-S", "-c", code]).returncode == 0

    assert probe_passes()
    heartbeat.write_text("1")
    assert probe_passes()
    old = time.time() - 120
    os.utime(heartbeat, (old, old))
    assert not probe_passes()


def test_model_default_only_when_the_task_names_none():
    settings = Settings(default_model="openai:gpt-4o")
    args = container(render_job(make_task(), settings), "agent")["args"]
    assert args[args.index("--model") + 1] == "openai:gpt-4o"
    args = container(render_job(make_task(model="anthropic:claude"), settings), "agent")["args"]
    assert "--model" not in args


def test_kueue_suspends_and_labels_the_job(task):
    job = render_job(task, Settings(kueue_queue="agents"))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][contract.KUEUE_QUEUE_LABEL] == "agents"
    assert contract.KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]


def test_resources_per_container(task):
    settings = Settings(agent_resources=Resources("1", "2Gi", "4", "8Gi"), sidecar_resources=Resources("10m", "64Mi", "200m", "256Mi"))
    job = render_job(task, settings)
    assert container(job, "agent")["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
    for name in ("restore", "snapshotter"):
        assert container(job, name)["resources"]["limits"] == {"cpu": "200m", "memory": "256Mi"}


# --- the PVC ---------------------------------------------------------------------


def test_pvc_is_owned_by_the_job(task):
    pvc = render_pvc(task, Settings(), "1234-uid")
    assert pvc["apiVersion"] == "v1" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["name"] == "workspace-t1"
    assert pvc["metadata"]["namespace"] == contract.AGENTS_NAMESPACE
    assert pvc["metadata"]["labels"] == contract.agent_labels("t1")
    assert pvc["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "agent-t1", "uid": "1234-uid", "controller": True, "blockOwnerDeletion": True}
    ]
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "7Gi"}},
        "storageClassName": "local-path",
    }
    assert "storageClassName" not in render_pvc(task, Settings(storage_class=""), "u")["spec"]


def test_render_gives_job_then_pvc_with_the_placeholder_uid(task):
    job, pvc = render(task, Settings())
    assert job["kind"] == "Job" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == factory.PLACEHOLDER_UID


def test_rendering_is_pure_and_shares_no_dicts(task):
    first = render(task, Settings())
    assert first == render(task, Settings())
    # No aliasing: yaml would print anchors, and a later edit of one container would change another.
    assert "&id" not in yaml.safe_dump_all(first)


# --- NATS credentials: the Secret agent-<id> and who mounts what of it -------------------

ACCOUNT = "A" + "D" * 55  # the factory never reads the key: any account key and path will do
NATS_SETTINGS = {"nats_account": ACCOUNT, "nats_signing_key_file": "/var/secrets/nats/signing-key.nk"}
NATS_DIR = f"{contract.SECRETS_DIR}/nats"


@pytest.fixture
def nats_job(task):
    return render_job(task, Settings(**NATS_SETTINGS))


def args_value(c: dict, flag: str) -> str | None:
    return c["args"][c["args"].index(flag) + 1] if flag in c["args"] else None


def test_the_nats_secret_is_named_after_the_job_owned_by_it_and_holds_one_key_per_process(task):
    creds = {"agent": "agent's creds text", "snapshotter": "snapshotter's creds text", "gateway": "gateway's creds text"}
    secret = factory.render_nats_secret(task, Settings(**NATS_SETTINGS), "1234-uid", creds)
    assert secret["apiVersion"] == "v1" and secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert secret["immutable"] is True
    assert secret["metadata"]["name"] == "agent-t1" == contract.job_name("t1")
    assert secret["metadata"]["namespace"] == contract.AGENTS_NAMESPACE
    assert secret["metadata"]["labels"] == contract.agent_labels("t1")
    assert secret["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "agent-t1", "uid": "1234-uid", "controller": True, "blockOwnerDeletion": True}
    ]
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "agent.creds": "agent's creds text", "snapshotter.creds": "snapshotter's creds text",
        "gateway.creds": "gateway's creds text"}


@pytest.mark.parametrize("creds", [{"agent": "x"}, {"agent": "x", "snapshotter": ""}, {"agent": "x", "snapshotter": "y", "restore": "z"}])
def test_the_nats_secret_needs_exactly_the_two_roles(task, creds):
    with pytest.raises(ValueError, match="creds: need exactly the roles agent, snapshotter"):
        factory.render_nats_secret(task, Settings(**NATS_SETTINGS), "u", creds)


# Who holds each NATS user: the agent's is held by the nats-leaf sidecar on the agent's behalf.
HOLDERS = {"agent": "nats-leaf", "snapshotter": "snapshotter", "gateway": "gateway"}


def leaf_conf(job: dict) -> str:
    return env(container(job, "nats-leaf"))[factory.NATS_LEAF_CONF_ENV]


def test_each_container_mounts_only_its_own_nats_user(nats_job):
    vols = volumes(nats_job)
    for role, holder in HOLDERS.items():
        c = container(nats_job, holder)
        mount = mounts(c)[NATS_DIR]
        assert mount == {"name": f"nats-{role}", "mountPath": NATS_DIR, "readOnly": True}
        # The volume projects only this role's key: the other user's file is not in the container at all.
        assert vols[mount["name"]] == {"name": f"nats-{role}", "secret": {
            "secretName": "agent-t1", "defaultMode": 0o440, "items": [{"key": f"{role}.creds", "path": f"{role}.creds"}]}}
        if holder == "nats-leaf":  # nats-server reads it: the remote's credentials in its configuration
            assert f'credentials: "{factory.nats_creds_path(role)}"' in leaf_conf(nats_job)
        else:
            assert args_value(c, "--nats-creds") == f"{NATS_DIR}/{role}.creds" == factory.nats_creds_path(role)
            assert args_value(c, "--nats") == Settings().nats_url
        assert not [m for m in c["volumeMounts"] if m["name"].startswith("nats-") and m["name"] != f"nats-{role}"]
    # The agent container holds none of them: it talks to the leaf on loopback, without credentials.
    agent = container(nats_job, "agent")
    assert NATS_DIR not in mounts(agent) and args_value(agent, "--nats-creds") is None
    assert args_value(agent, "--nats") == factory.NATS_LEAF_URL == "nats://127.0.0.1:4222"
    # Restore never talks to NATS: no user, no flag.
    restore = container(nats_job, "restore")
    assert NATS_DIR not in mounts(restore) and "--nats" not in restore["args"] and "--nats-creds" not in restore["args"]
    # Readable by the agent's user (1000) through the pod's fsGroup, like the other secrets; never by others.
    assert pod(nats_job)["securityContext"]["fsGroup"] == factory.AGENT_USER
    assert {v["secret"]["defaultMode"] for v in vols.values() if "secret" in v} == {0o440}


def test_the_nats_leaf_is_a_restricted_native_sidecar_on_loopback_started_before_the_agent(nats_job):
    spec = pod(nats_job)
    names = [c["name"] for c in spec["initContainers"]] + [c["name"] for c in spec["containers"]]
    assert names == ["restore", "snapshotter", "gateway", "nats-leaf", "agent"]
    leaf = container(nats_job, "nats-leaf")
    assert leaf["restartPolicy"] == "Always"  # native sidecar: its startupProbe gates the agent's start
    assert leaf["securityContext"] == container(nats_job, "agent")["securityContext"]
    assert leaf["securityContext"]["readOnlyRootFilesystem"] is True and leaf["securityContext"]["runAsNonRoot"] is True
    assert set(mounts(leaf)) == {NATS_DIR}  # no workspace, no writable place: the config comes on stdin
    assert "args" not in leaf and leaf["command"][:4] == ["python", "-I", "-S", "-c"] and "nats-server" in leaf["command"][-1]
    conf = leaf_conf(nats_job)
    assert conf == factory.render_leaf_conf(Settings().nats_leaf_url, factory.nats_creds_path("agent"))
    assert 'listen: "127.0.0.1:4222"' in conf and 'http: "127.0.0.1:8222"' in conf  # the pod's loopback only
    assert f'url: "{Settings().nats_leaf_url}"' in conf and "jetstream" not in conf and "authorization" not in conf
    probe = leaf["startupProbe"]
    assert probe["exec"]["command"] == factory.leaf_probe_command() and "/leafz" in probe["exec"]["command"][-1]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60


@pytest.mark.parametrize("value", ["nats-leaf://h:7422\n}\nauthorization {", "nats-leaf://$HOST:7422"])
def test_the_leaf_conf_refuses_text_that_would_change_its_meaning(value):
    with pytest.raises(ValueError):
        factory.render_leaf_conf(value, "/var/secrets/nats/agent.creds")


def test_without_a_signing_key_no_secret_no_volume_no_flag(task, job):
    assert not [v for v in volumes(job) if v.startswith("nats-")]
    assert "nats-leaf" not in [c["name"] for c in pod(job)["initContainers"]]  # no user to hold: the agent connects itself
    assert args_value(container(job, "agent"), "--nats") == Settings().nats_url
    for name in ("restore", "snapshotter", "agent"):
        assert "--nats-creds" not in container(job, name)["args"] and NATS_DIR not in mounts(container(job, name))
    assert [m["kind"] for m in render(task, Settings())] == ["Job", "PersistentVolumeClaim"]


def test_render_with_an_issuer_gives_job_secret_pvc_in_creation_order(task):
    settings = Settings(**NATS_SETTINGS)
    job, secret, pvc = render(task, settings, job_uid="u-1", creds={"agent": "a", "snapshotter": "s", "gateway": "g"})
    assert (job["kind"], secret["kind"], pvc["kind"]) == ("Job", "Secret", "PersistentVolumeClaim")
    assert secret == factory.render_nats_secret(task, settings, "u-1", {"agent": "a", "snapshotter": "s", "gateway": "g"})
    # Without creds (dockyard manifests job): placeholders, never real credentials.
    _, placeholder, _ = render(task, settings)
    assert {base64.b64decode(v).decode() for v in placeholder["data"].values()} == {factory.NATS_CREDS_PLACEHOLDER}
    assert "&id" not in yaml.safe_dump_all(render(task, settings))  # no shared dicts between the two volumes


# --- dockyard manifests job --------------------------------------------------------


def run_manifests(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dockyard")
    manifests.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DOCKYARD_"):
            monkeypatch.delenv(name)


def test_manifests_job_prints_two_yaml_documents(tmp_path, capsys, clean_env):
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"prompt": "hello", "limits": {"storage": "3Gi"}}))
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text("agent_image: example/agent:2\nkueue_queue: q\nagent_resources:\n  memory_limit: 6Gi\n")

    assert run_manifests(["manifests", "job", "--task-file", str(task_file), "--settings", str(settings_file), "--task-id", "demo-1"]) == 0
    job, pvc = yaml.safe_load_all(capsys.readouterr().out)
    assert job["kind"] == "Job" and job["metadata"]["name"] == "agent-demo-1"
    assert job["spec"]["suspend"] is True
    assert container(job, "agent")["image"] == "example/agent:2"
    assert container(job, "agent")["resources"]["limits"]["memory"] == "6Gi"
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["resources"]["requests"]["storage"] == "3Gi"
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == factory.PLACEHOLDER_UID


def test_manifests_job_prints_the_nats_secret_with_placeholders(tmp_path, capsys, clean_env, monkeypatch):
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"prompt": "hello", "task_id": "demo-2"}))
    for name, value in NATS_SETTINGS.items():
        monkeypatch.setenv(Settings.variable(name), value)
    assert run_manifests(["manifests", "job", "--task-file", str(task_file)]) == 0
    job, secret, pvc = yaml.safe_load_all(capsys.readouterr().out)
    assert (job["kind"], secret["kind"], pvc["kind"]) == ("Job", "Secret", "PersistentVolumeClaim")
    assert secret["metadata"]["name"] == "agent-demo-2"
    assert {base64.b64decode(v).decode() for v in secret["data"].values()} == {factory.NATS_CREDS_PLACEHOLDER}


def test_manifests_job_derives_a_stable_id_and_reports_bad_input(tmp_path, capsys, clean_env):
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"prompt": "hello"}))
    run_manifests(["manifests", "job", "--task-file", str(task_file)])
    first = list(yaml.safe_load_all(capsys.readouterr().out))
    run_manifests(["manifests", "job", "--task-file", str(task_file)])
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == first
    assert contract.is_valid_task_id(first[0]["metadata"]["labels"][contract.LABEL_TASK_ID])

    from functions.cli.main import CommandError

    task_file.write_text(json.dumps({"prompt": ""}))
    with pytest.raises(CommandError, match="prompt"):
        run_manifests(["manifests", "job", "--task-file", str(task_file)])
    with pytest.raises(CommandError, match="nope.yaml"):
        run_manifests(["manifests", "job", "--task-file", str(tmp_path / "nope.yaml")])


def test_the_agent_waits_for_a_snapshotter_that_handles_sigterm(job, tmp_path):
    """The snapshotter's startup probe passes only once its process catches SIGTERM: run it for real."""
    probe = container(job, "snapshotter")["startupProbe"]
    assert probe["exec"]["command"] == probes.sigterm_handled_probe_command()

    def probe_passes(pid: int) -> bool:
        return subprocess.run(["python3", *probes.sigterm_handled_probe_command(pid)[1:]]).returncode == 0

    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    workspace = tmp_path / "ws"
    workspace.mkdir()
    argv = [sys.executable, "-m", "agent", "snapshotter", "--task-id", "probe", "--workspace", str(workspace),
            "--store", (tmp_path / "store").as_uri(), "--interval", "0"]
    log = tmp_path / "snapshotter.log"
    with open(log, "wb") as out:
        snapshotter = subprocess.Popen(argv, stderr=out, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while "starting:" not in log.read_text() and snapshotter.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "starting:" in log.read_text(), log.read_text()
        assert probe_passes(snapshotter.pid)
        assert not probe_passes(plain.pid)  # a process that would die of SIGTERM
    finally:
        plain.kill()
        snapshotter.terminate()
        snapshotter.wait(60)
