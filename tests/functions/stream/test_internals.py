"""The one private use left (uvicorn's transport of a connection) is pinned to the installed version and still works."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from functions.stream import internals
from functions.stream.app import create_app
from tests.functions.stream.support import AUTH, AppServer

pytestmark = pytest.mark.timeout(60)


def test_the_private_use_is_pinned_to_the_installed_version():
    """Fails when uvicorn changes version: re-check what the message says, then update WRITTEN_FOR."""
    mismatches = internals.version_mismatches()
    assert not mismatches, "\n".join(mismatches)


async def test_under_uvicorn_the_transport_is_the_connection_of_the_request():
    seen = {}

    class Probe:
        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                seen["transport"] = internals.transport_of(send)
                seen["client"] = tuple(scope["client"])
            await app(scope, receive, send)

    app = Starlette(routes=[Route("/", lambda request: JSONResponse({}))])
    server = await AppServer(Probe()).start()
    try:
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
            assert (await client.get(server.url)).status_code == 200
    finally:
        await server.stop()
    transport = seen["transport"]
    assert transport is not None, "uvicorn's send no longer leads to the transport: see functions/stream/internals.py"
    assert transport.get_extra_info("peername")[:2] == seen["client"]
    assert transport.get_extra_info("socket") is not None


def test_a_send_that_is_not_uvicorns_gives_no_transport():
    async def wrapped(message):  # what a parent app's middleware hands a mounted app
        pass

    class Cycle:
        transport = "not a transport"

        async def send(self, message):
            pass

    assert internals.transport_of(wrapped) is None
    assert internals.transport_of(Cycle().send) is None


async def test_the_stream_app_mounted_in_another_app_finds_no_transport(settings):
    """The dev stack mounts the stream app: a stalled client's socket then closes only when the peer reads."""
    from starlette.routing import Mount

    stream_app = create_app(settings)
    seen = {}

    async def peek(request):
        seen["transport"] = request.scope.get(internals.TRANSPORT_KEY, "absent")
        return JSONResponse({})

    stream_app.router.routes.insert(0, Route("/peek", peek))
    parent = Starlette(routes=[Mount("", app=stream_app)])
    server = await AppServer(parent).start()
    try:
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
            assert (await client.get(f"{server.url}/peek")).status_code == 200
    finally:
        await server.stop()
    assert seen["transport"] is None
