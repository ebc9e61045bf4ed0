"""Fixtures the security tests share with the functions' tests: a real nats-server, the task registry,
the stream app, and API tokens (the stream refuses requests without one)."""

import pytest

from tests.functions.conftest import base_settings, bus  # noqa: F401  (real nats-server, the bus and registry)
from tests.functions.stream.conftest import serve  # noqa: F401  (the stream app under uvicorn)
from tests.functions.stream.support import replace_settings, write_tokens_file


@pytest.fixture
def settings(base_settings, tmp_path):  # noqa: F811
    """The functions' settings with the tokens file of `support.WRITE_TOKEN` and `support.READ_TOKEN`."""
    return replace_settings(base_settings, api_tokens_file=write_tokens_file(tmp_path / "api-tokens"))
