"""translate.plan: the rendered Job as podman arguments, checked field by field against the Job itself
(so a change in factory.py shows up here, not in a second description). No podman needed."""

from __future__ import annotations

import base64
import json

import pytest

from functions.core import factory
from functions.core.settings import Settings
from functions.core.task import parse_task
from functions.runtime.local.pod import JobSpec
from functions.runtime.podman.translate import GAPS, Untranslatable, plan

SECRETS = {"dockyard-object-store": {"access_key_id": b"AKIA-test", "secret_access_key": b"s3cr3t"}}
WHERE = {"workspace_dir": "/data/tasks/t1/workspace", "files_dir": "/data/tasks/t1/pod", "network": "slirp4netns:allow_host_loopback=true"}


def _settings(**kw) -> Settings:
    base = dict(store="s3://bucket/p", s3_endpoint="http://10.0.2.2:9000", nats_url="nats://10.0.2.2:4222",
                nats_leaf_url="nats-leaf://10.0.2.2:7422", nats_account="A" * 56, nats_signing_key_file="/keys/signing.nk",
                egress_proxy="http://10.0.2.2:3128", agent_memory_limit="3Gi", agent_cpu_limit="1500m")
    return Settings(**{**base, **kw})


def _rendered(settings: Settings | None = None, **task):
    settings = settings or _settings()
    t = parse_task({"prompt": "p", "task_id": "t1", **task}, source="test", event_id="e", policy=settings.limits)
    creds = {role: f"creds of {role}" for role in factory.NATS_ROLES}
    return factory.render(t, settings, "uid-1", creds)


def _option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def _image_at(args: list[str], image: str) -> int:
    return len(args) - 1 - args[::-1].index(image)


def test_every_container_is_the_jobs_own_field_by_field():
    manifests = _rendered()
    job = manifests[0]
    pod = job["spec"]["template"]["spec"]
    p = plan(manifests, SECRETS, **WHERE)
    containers = pod["initContainers"] + pod["containers"]
    assert [c.name for c in p.containers] == [c["name"] for c in containers]
    assert [c.kind for c in p.containers] == ["init", "sidecar", "sidecar", "sidecar", "main"]
    for c, planned in zip(containers, p.containers, strict=True):
        args = planned.args
        i = _image_at(args, c["image"])
        assert args[i + 1 :] == c.get("args", []), c["name"]
        assert json.loads(_option(args, "--entrypoint")[0]) == c["command"], c["name"]
        assert _option(args, "--env") == [f"{e['name']}={e['value']}" for e in c["env"]], c["name"]
        assert _option(args, "--pod") == [job["metadata"]["name"]]
        ctx = {**pod["securityContext"], **c["securityContext"]}
        assert _option(args, "--user") == [f"{ctx['runAsUser']}:{ctx['runAsGroup']}"]
        assert _option(args, "--group-add") == [str(ctx["fsGroup"])]
        assert ("--read-only" in args) is ctx["readOnlyRootFilesystem"] is True
        assert _option(args, "--cap-drop") == ctx["capabilities"]["drop"] == ["ALL"]
        assert _option(args, "--security-opt") == ["no-new-privileges"]
        limits = c["resources"]["limits"]
        assert _option(args, "--memory") == [str(_bytes(limits["memory"]))]
        assert float(_option(args, "--cpus")[0]) == _cpus(limits["cpu"])
        mounts = _option(args, "--mount")
        assert [m.split("dst=")[1].split(",")[0] for m in mounts] == [m["mountPath"] for m in c["volumeMounts"]], c["name"]
        for mount, m in zip(mounts, c["volumeMounts"], strict=True):
            assert ("ro=true" in mount) is m.get("readOnly", False), (c["name"], mount)
        assert (planned.startup_probe.command if planned.startup_probe else None) == (c.get("startupProbe") or {}).get("exec", {}).get("command")
        assert (planned.liveness_probe.command if planned.liveness_probe else None) == (c.get("livenessProbe") or {}).get("exec", {}).get("command")
    agent = p.containers[-1]
    assert _option(agent.args, "--memory") == [str(3 * 2**30)] and _option(agent.args, "--cpus") == ["1.5"]


def test_volumes_are_a_named_volume_tmpfs_and_files_with_the_secrets_modes():
    manifests = _rendered()
    job, secret, pvc = manifests
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    p = plan(manifests, SECRETS, **WHERE)
    assert p.volume == pvc["metadata"]["name"] and p.volume_args[-1] == p.volume
    assert f"device={WHERE['workspace_dir']}" in p.volume_args
    agent_mounts = _option(p.containers[-1].args, "--mount")
    assert f"type=volume,src={p.volume},dst=/workspace" in agent_mounts
    home = next(m for m in agent_mounts if "dst=/home/agent" in m)
    assert home.startswith("type=tmpfs") and f"tmpfs-size={_bytes(volumes['home']['emptyDir']['sizeLimit'])}" in home
    files = {(f.volume, f.path): f for f in p.files}
    s3 = volumes["s3-credentials"]["secret"]
    assert files[("s3-credentials", "access_key_id")].data == b"AKIA-test"
    assert files[("s3-credentials", "access_key_id")].mode == s3["defaultMode"] == 0o440
    assert {f.gid for f in p.files} == {job["spec"]["template"]["spec"]["securityContext"]["fsGroup"]}
    for role in factory.NATS_ROLES:  # each role's volume holds only its own key, from the rendered Secret
        item = volumes[f"nats-{role}"]["secret"]["items"][0]
        assert files[(f"nats-{role}", item["path"])].data == base64.b64decode(secret["data"][item["key"]])
        assert [k for k in files if k[0] == f"nats-{role}"] == [(f"nats-{role}", item["path"])]
    task = files[("task", "task.json")]
    assert json.loads(task.data) == json.loads(job["spec"]["template"]["metadata"]["annotations"]["dockyard.dev/task"])
    assert not [k for k in files if k[0] == "model-credentials"]  # optional and absent: an empty directory
    assert p.owner == (1000, 1000)


def test_the_job_spec_is_read_from_the_job():
    manifests = _rendered(limits={"retries": 2, "deadline_seconds": 900})
    job = manifests[0]
    spec = plan(manifests, SECRETS, **WHERE).spec
    assert spec == JobSpec.from_job(job)
    assert spec.backoff_limit == job["spec"]["backoffLimit"] == 2
    assert spec.deadline_seconds == job["spec"]["activeDeadlineSeconds"] == 900
    assert spec.grace_seconds == job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    rules = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    for rule in rules:
        on = rule["onExitCodes"]
        assert all(spec.fails_job(on["containerName"], code) for code in on["values"])
    assert not spec.fails_job("agent", 1) and not spec.fails_job("agent", 137)


def test_the_pod_is_labelled_with_the_task_and_joins_the_network():
    p = plan(_rendered(), SECRETS, **WHERE)
    assert p.pod_args[:4] == ["--name", "agent-t1", "--network", WHERE["network"]]
    assert "dockyard.dev/task-id=t1" in _option(p.pod_args, "--label")
    assert "dockyard.dev/runtime=podman" in _option(p.pod_args, "--label")


def test_without_minted_credentials_there_is_no_leaf_and_no_nats_secret():
    settings = _settings(nats_account="", nats_signing_key_file="")
    p = plan(_rendered(settings), SECRETS, **WHERE)
    assert [c.name for c in p.containers] == ["restore", "snapshotter", "gateway", "agent"]


def test_what_is_not_translated_is_refused_naming_it():
    manifests = _rendered()
    with pytest.raises(Untranslatable, match="dockyard-object-store"):
        plan(manifests, {}, **WHERE)
    manifests[0]["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": 80}]
    with pytest.raises(Untranslatable, match="agent: ports"):
        plan(manifests, SECRETS, **WHERE)
    assert len(GAPS) >= 8


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]]


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_the_design_lists_every_gap():
    from tests.conftest import REPO_ROOT

    design = (REPO_ROOT / "docs" / "DESIGN.md").read_text()
    missing = [gap for gap in GAPS if f"- {gap}" not in design]
    assert not missing, f"docs/DESIGN.md, 'Podman runtime': add {missing}"


def test_the_job_is_rendered_with_loopback_urls_naming_the_podman_host():
    from functions.errors import SettingsError
    from functions.runtime.podman.runtime import pod_settings

    settings = _settings(nats_url="nats://u:pw@127.0.0.1:4222", nats_leaf_url="nats-leaf://localhost:7422",
                         s3_endpoint="http://127.0.0.1:9000", egress_proxy="http://127.0.0.1:3128", podman_host="10.0.2.2")
    rendered = pod_settings(settings)
    assert (rendered.nats_url, rendered.nats_leaf_url) == ("nats://u:pw@10.0.2.2:4222", "nats-leaf://10.0.2.2:7422")
    assert (rendered.s3_endpoint, rendered.egress_proxy) == ("http://10.0.2.2:9000", "http://10.0.2.2:3128")
    other = _settings(nats_url="nats://nats.example:4222")
    assert pod_settings(other).nats_url == "nats://nats.example:4222"  # not this machine: as it is
    job = _rendered(rendered)[0]
    agent_env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert agent_env["HTTPS_PROXY"] == "http://10.0.2.2:3128" and "10.0.2.2" in agent_env["NO_PROXY"].split(",")
    with pytest.raises(SettingsError, match="DOCKYARD_STORE"):
        pod_settings(_settings(store="file:///tmp/store"))
