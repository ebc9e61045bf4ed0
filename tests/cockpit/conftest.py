"""The cockpit in a real browser against a real `dockyard dev`.

Chromium is Debian's (`/usr/bin/chromium`, installed by scripts/install-test-packages),
driven by Playwright for Python; Playwright's own browser downloads are never used.
Without Chromium the browser tests skip, unless CI is set: there they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.dev_process import DevServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    message = f"{CHROMIUM} is missing: install Debian's chromium with ./scripts/install-test-packages"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page at laptop size; JavaScript errors on it fail the test."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory):
    """The dev stacks' DOCKYARD_SCRIPTS_DIR: a test's `scripted:NAME` model is a file here."""
    return tmp_path_factory.mktemp("scripts")


@pytest.fixture(scope="module")
def dev(tmp_path_factory, scripts_dir):
    """One dev stack shared by the tests that only add tasks to it."""
    server = DevServer(tmp_path_factory.mktemp("cockpit-dev"), env={"DOCKYARD_SCRIPTS_DIR": str(scripts_dir)}).start()
    yield server
    server.stop()


@pytest.fixture
def make_dev(tmp_path, scripts_dir):
    servers: list[DevServer] = []

    def make(**kwargs) -> DevServer:
        kwargs["env"] = {"DOCKYARD_SCRIPTS_DIR": str(scripts_dir), **(kwargs.get("env") or {})}
        servers.append(DevServer(tmp_path / "data", **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


AXE_JS = Path(__file__).parent / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="session")
def axe_js() -> Path:
    return find_axe()


def find_axe() -> Path:
    """axe-core as tests/cockpit/package-lock.json pins it (`npm ci --prefix tests/cockpit`, run by
    ./scripts/install-test-packages). Missing: the accessibility tests skip, unless CI is set: there they fail."""
    if AXE_JS.exists():
        return AXE_JS
    message = f"{AXE_JS} is missing: install it with ./scripts/install-test-packages (npm ci --prefix tests/cockpit)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
