"""Fixtures the security tests share with the functions' tests: a real nats-server, the task registry, the stream app."""

from tests.functions.conftest import bus, settings  # noqa: F401  (real nats-server, settings, the bus and registry)
from tests.functions.stream.conftest import serve  # noqa: F401  (the stream app under uvicorn)
