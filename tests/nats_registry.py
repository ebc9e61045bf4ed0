"""The test nats-servers running in this worker, by port.

A module of its own because pytest loads tests/conftest.py as `conftest` while test
modules import it as `tests.conftest`: two copies, but one of this."""

RUNNING: dict = {}
