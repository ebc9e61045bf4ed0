"""The stream app served by uvicorn on a free port, against the real nats-server of tests/functions/conftest.py."""

from __future__ import annotations

import pytest

from functions.stream.app import create_app
from tests.functions.stream.support import AppServer, replace_settings, write_tokens_file


@pytest.fixture
def settings(settings, tmp_path, nats_server):
    """The functions' test settings as the stream Service gets them: its own NATS user, and the tokens file
    of `support.WRITE_TOKEN` and `support.READ_TOKEN`."""
    return replace_settings(settings, api_tokens_file=write_tokens_file(tmp_path / "api-tokens"),
                            nats_creds=nats_server.creds("stream"))


@pytest.fixture
async def serve(settings, nats_server):
    """`await serve(heartbeat_seconds=..., run_tracker=..., **settings_fields)` -> a started AppServer (stopped at teardown)."""
    servers: list[AppServer] = []

    async def start(heartbeat_seconds: float = 60, run_tracker: bool = False, **fields) -> AppServer:
        fields = {"nats_creds": nats_server.creds("stream"), **fields}  # the stream's own NATS user, wherever it runs
        app = create_app(replace_settings(settings, **fields), heartbeat_seconds=heartbeat_seconds, run_tracker=run_tracker)
        server = await AppServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()
