"""The fake dev API the CLI tests talk to."""

import pytest

from tests.functions.cli.test_cli import FakeServer


@pytest.fixture
def server():
    fake = FakeServer()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()
