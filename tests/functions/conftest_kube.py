"""Fixtures for code that talks to Kubernetes: the emulator on a free port and real clients for it.

The emulator authenticates by bearer token and authorizes by the RBAC of knative/rbac.yaml: `kube_client`
is the runtime's client, the functions' ServiceAccount (SA_TOKEN), so a call its Role does not grant is a
403; `kube_admin` (ADMIN_TOKEN, a cluster admin) is for tests that seed or inspect state over HTTP.
Tests may also use the emulator's Python API (`kube.get`, `kube.set_job_status`, ...), which is not checked.

tests/functions/runtime/conftest.py imports them, which registers them for the tests beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kmock import Server

from kube_emulator import KubeEmulator, Rbac

RBAC_YAML = Path(__file__).resolve().parents[2] / "knative" / "rbac.yaml"
NAMESPACES_YAML = Path(__file__).resolve().parents[2] / "knative" / "namespaces.yaml"
FUNCTIONS_USER = "system:serviceaccount:dockyard:dockyard-functions"
SA_TOKEN = "dockyard-functions-token"
ADMIN_TOKEN = "kubernetes-admin-token"


def knative_rbac() -> Rbac:
    return Rbac.from_yaml(RBAC_YAML.read_text())


def knative_namespaces() -> set[str]:
    """The namespaces knative/ creates: the only ones the emulator's cluster has."""
    import yaml

    return {d["metadata"]["name"] for d in yaml.safe_load_all(NAMESPACES_YAML.read_text()) if d and d.get("kind") == "Namespace"}


@pytest.fixture
async def kube():
    """The API emulator, served over HTTP on 127.0.0.1 and a free port for this test, enforcing knative/rbac.yaml,
    with the namespaces of knative/namespaces.yaml."""
    tokens = {SA_TOKEN: FUNCTIONS_USER, ADMIN_TOKEN: "kubernetes-admin"}
    async with KubeEmulator(tokens=tokens, rbac=knative_rbac(), namespaces=knative_namespaces()) as emulator, Server(emulator):
        yield emulator


def api_client_for(url: str, token: str | None = SA_TOKEN):
    """A `kubernetes.client.ApiClient` for `url` presenting `token` (by default the functions' ServiceAccount's),
    never through a proxy from the environment."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url.rstrip("/")
    configuration.proxy = None
    if token:
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(configuration)


@pytest.fixture
def kube_client(kube):
    """The runtime's client: the functions' ServiceAccount."""
    api_client = api_client_for(str(kube.url))
    yield api_client
    api_client.close()


@pytest.fixture
def kube_admin(kube):
    """A cluster admin's client, to seed or inspect state over HTTP as a test (not the runtime) does."""
    api_client = api_client_for(str(kube.url), ADMIN_TOKEN)
    yield api_client
    api_client.close()
