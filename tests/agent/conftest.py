"""Fixtures of the work-tool tests: a workspace, a home, a directory outside with a secret, the tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.tools import ToolResult, WorkTools


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return workspace


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspace with a secret file in it."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("TOP-SECRET")
    return out


@pytest.fixture
def tools(ws: Path, home: Path) -> WorkTools:
    return WorkTools(ws, home, output_cap=4_000, default_timeout=10, max_timeout=20)


def assert_refused(result: ToolResult, *, secret: str = "TOP-SECRET") -> None:
    assert isinstance(result, ToolResult)
    assert result.ok is False
    assert "outside the workspace" in result.output
    assert secret not in result.output


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """The object store in both kinds: a file store, and S3 over HTTP (moto's server)."""
    from agent.storage import open_store

    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    return open_store(request.getfixturevalue("s3_store_url"))


@pytest.fixture
def readers(monkeypatch):
    """Every HashingReader the store makes, to count the bytes it read."""
    from agent import digest

    made = []

    class Recorded(digest.HashingReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(digest, "HashingReader", Recorded)
    return made
