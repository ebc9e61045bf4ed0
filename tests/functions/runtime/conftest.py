"""Fixtures of the LocalRuntime tests: the stand-in agent and a fake clock."""

from __future__ import annotations

import sys

import pytest
from conftest_kube import kube, kube_admin, kube_client  # noqa: F401  (fixtures of the Kubernetes runtime tests)

from tests.functions.runtime.fake_clock import FakeClock
from tests.functions.runtime.local_stand_in import STAND_IN


@pytest.fixture
def stand_in(tmp_path) -> list[str]:
    """The command line of the stand-in for `python -m agent` (see local_stand_in.py)."""
    script = tmp_path / "stand_in_agent.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
