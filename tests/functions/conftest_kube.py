"""Fixtures for code that talks to Kubernetes: the emulator on a free port and a real client for it.

tests/functions/runtime/conftest.py imports them, which registers them for the tests beside it.
"""

from __future__ import annotations

import pytest
from kmock import Server

from kube_emulator import KubeEmulator


@pytest.fixture
async def kube():
    """The API emulator, served over HTTP on 127.0.0.1 and a free port for this test."""
    async with KubeEmulator() as emulator, Server(emulator):
        yield emulator


def api_client_for(url: str):
    """A `kubernetes.client.ApiClient` for `url`, never through a proxy from the environment."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url.rstrip("/")
    configuration.proxy = None
    return client.ApiClient(configuration)


@pytest.fixture
def kube_client(kube):
    api_client = api_client_for(str(kube.url))
    yield api_client
    api_client.close()
