"""NATS credentials in the cluster's manifests: each Service mounts only its own keys of dockyard-nats.

The functions connect as `functions`, the stream as `stream` and its tracker as
`tracker`; only task-submitted (the launcher) holds the account signing key. The
Secret's keys are the files `dockyard nats-auth init` names (functions/cli/nats_auth.py),
and every path a variable points at is a file a volume puts there.
"""

from __future__ import annotations

import posixpath

import pytest
import yaml

from agent import contract
from functions.cli import nats_auth
from functions.core import factory
from functions.core.settings import Settings
from tests.manifests import KNATIVE_DIR, documents, knative_services, pod_template, rendered_manifests, service_env

SERVICES = knative_services(documents(KNATIVE_DIR))
SECRETS = [d for d in yaml.safe_load_all((KNATIVE_DIR / "secrets.example.yaml").read_text()) if d]
NATS_DIR = "/var/secrets/nats"
EXPECTED_KEYS = {
    "task-submitted": {"functions.creds", "signing-key.nk"},
    "job-finished": {"functions.creds"},
    "snapshot-due": {"functions.creds"},
    "task-command": {"functions.creds"},
    "stream": {"stream.creds", "tracker.creds"},
}


def _nats_files(service: str) -> dict[str, str]:
    """Path in the container -> key of dockyard-nats, for every volume of that Secret the container mounts."""
    spec = pod_template(SERVICES[service].body)["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    files = {}
    for mount in container.get("volumeMounts") or []:
        secret = volumes[mount["name"]].get("secret") or {}
        if secret.get("secretName") != nats_auth.SECRET:
            continue
        assert mount.get("readOnly") is True, f"{service}: {mount['mountPath']} must be read-only"
        assert "items" in secret, f"{service}: mount only the keys it needs (items), not the whole Secret"
        # No fsGroup in a Knative pod: the files are root:root, so the container's user 1000 reads them as "other".
        assert secret["defaultMode"] == 0o444 and "securityContext" not in spec, service
        for item in secret["items"]:
            files[posixpath.join(mount["mountPath"], item["path"])] = item["key"]
    return files


def test_every_service_is_listed():
    assert set(SERVICES) == set(EXPECTED_KEYS)


@pytest.mark.parametrize("service", sorted(EXPECTED_KEYS))
def test_each_service_mounts_only_its_own_keys(service):
    files = _nats_files(service)
    assert set(files.values()) == EXPECTED_KEYS[service]
    assert all(path.startswith(NATS_DIR + "/") for path in files)


@pytest.mark.parametrize("service", sorted(EXPECTED_KEYS))
def test_the_variables_point_at_the_mounted_files(service):
    env = service_env(service)
    files = _nats_files(service)
    wanted = {
        "task-submitted": {"DOCKYARD_NATS_CREDS": "functions.creds", "DOCKYARD_NATS_SIGNING_KEY_FILE": "signing-key.nk"},
        "stream": {"DOCKYARD_NATS_CREDS": "stream.creds", "DOCKYARD_TRACKER_NATS_CREDS": "tracker.creds"},
    }.get(service, {"DOCKYARD_NATS_CREDS": "functions.creds"})
    for variable, key in wanted.items():
        assert files.get(env.get(variable, "")) == key, f"{service}: {variable}={env.get(variable)!r} is not the mounted {key}"
    others = {"DOCKYARD_NATS_CREDS", "DOCKYARD_TRACKER_NATS_CREDS", "DOCKYARD_NATS_SIGNING_KEY_FILE"} - set(wanted)
    assert not others & set(env), f"{service} sets {others & set(env)}"


@pytest.mark.parametrize("service", sorted(EXPECTED_KEYS))
def test_each_service_s_environment_is_accepted_and_only_the_launcher_mints(service):
    settings = Settings.from_env(service_env(service))  # account and signing key: both or neither
    assert factory.mints_nats_credentials(settings) is (service == "task-submitted")


def test_the_launcher_reads_the_account_from_the_secret_beside_its_signing_key():
    (container,) = pod_template(SERVICES["task-submitted"].body)["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DOCKYARD_NATS_ACCOUNT"] == {
        "name": "DOCKYARD_NATS_ACCOUNT", "valueFrom": {"secretKeyRef": {"name": nats_auth.SECRET, "key": "account.pub"}}}
    assert "DOCKYARD_NATS_ACCOUNT" not in yaml.safe_dump(SERVICES["task-command"].body)
    # Not in the shared ConfigMap: every other Service would then need the signing key too.
    from tests.manifests import settings_env

    assert not {"DOCKYARD_NATS_ACCOUNT", "DOCKYARD_NATS_SIGNING_KEY_FILE", "DOCKYARD_NATS_CREDS"} & set(settings_env())


def test_the_secret_template_holds_the_files_nats_auth_init_names():
    (template,) = [s for s in SECRETS if s["metadata"]["name"] == nats_auth.SECRET]
    assert template["metadata"]["namespace"] == contract.FUNCTIONS_NAMESPACE
    assert set(template["stringData"]) == set(nats_auth.SECRET_FILES)
    mounted = set().union(*EXPECTED_KEYS.values())
    assert set(nats_auth.SECRET_FILES) == mounted | {"account.pub"}
    (eventing,) = [s for s in SECRETS if s["metadata"]["name"] == nats_auth.EVENTING_SECRET]
    assert eventing["metadata"]["namespace"] == nats_auth.EVENTING_NAMESPACE
    assert set(eventing["stringData"]) == {nats_auth.CREDS_KEY}


def test_the_launcher_s_jobs_get_their_secret_and_each_container_its_own_user():
    job, secret, pvc = rendered_manifests()["launcher"]
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", contract.job_name("all-limits"))
    spec = pod_template(job)["spec"]
    held_by = {"nats-leaf": "agent", "snapshotter": "snapshotter", "gateway": "gateway"}  # the leaf holds the agent's user
    for c in spec["initContainers"] + spec["containers"]:
        args = c.get("args", [])
        creds = args[args.index("--nats-creds") + 1] if "--nats-creds" in args else None
        if c["name"] == "nats-leaf":  # nats-server: the path is in its configuration, not a flag
            conf = {e["name"]: e["value"] for e in c["env"]}[factory.NATS_LEAF_CONF_ENV]
            creds = factory.nats_creds_path("agent") if f'credentials: "{factory.nats_creds_path("agent")}"' in conf else None
        assert creds == (factory.nats_creds_path(held_by[c["name"]]) if c["name"] in held_by else None), c["name"]


def test_the_readme_creates_the_secrets_with_the_keys_the_manifests_mount():
    import re

    from tests.manifests import ROOT

    readme = (ROOT / "README.md").read_text()

    def keys_of(secret: str, namespace: str) -> set[str]:
        (command,) = re.findall(rf"kubectl create secret generic {secret} -n {namespace}((?:[^\n]*\\\n)*[^\n]*)", readme)
        return set(re.findall(r"--from-file=([^=\s]+)=", command))

    assert keys_of(nats_auth.SECRET, contract.FUNCTIONS_NAMESPACE) == set(nats_auth.SECRET_FILES)
    assert keys_of(nats_auth.EVENTING_SECRET, nats_auth.EVENTING_NAMESPACE) == {nats_auth.CREDS_KEY}
    assert keys_of(nats_auth.ADMIN_SECRET, nats_auth.NATS_NAMESPACE) == {nats_auth.CREDS_KEY}
    assert f"-f ~/dockyard-nats/{nats_auth.VALUES_FILE}" in readme and f"kubectl apply -f ~/dockyard-nats/{nats_auth.CONFIG_NATS_FILE}" in readme
