"""The cockpit in a real browser against a real `dockyard dev`.

Chromium is Debian's (`/usr/bin/chromium`, installed by scripts/install-test-packages),
driven by Playwright for Python; Playwright's own browser downloads are never used.
Without Chromium the browser tests skip, unless CI is set: there they fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port

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
START_TIMEOUT_SECONDS = 60.0


def chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    message = f"{CHROMIUM} is missing: install Debian's chromium with ./scripts/install-test-packages"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class DevServer:
    """`dockyard dev` as a child process in its own process group, restartable on the same port and data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
        self.env.update({"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log = data_dir / "dev-test.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DevServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "functions.cli", "dev", "--port", str(self.port), "--data-dir", str(self.data_dir)],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # dev and its embedded nats-server share a group: crash() kills both
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dev exited with {self.proc.returncode}:\n{self.log.read_text()[offset:]}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    self.nats_url = self._nats_url(offset)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"dev did not answer on {self.url}:\n{self.log.read_text()[offset:]}")

    def _nats_url(self, offset: int) -> str | None:
        match = re.search(r"NATS\s+(nats://\S+)", self.log.read_text()[offset:])
        return match.group(1) if match else None

    def crash(self) -> None:
        """SIGKILL for dev and its nats-server; the agents (own groups) get SIGTERM from the kernel."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Ctrl-C, as a person stops it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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
def dev(tmp_path_factory):
    """One dev stack shared by the tests that only add tasks to it."""
    server = DevServer(tmp_path_factory.mktemp("cockpit-dev")).start()
    yield server
    server.stop()


@pytest.fixture
def make_dev(tmp_path):
    servers: list[DevServer] = []

    def make(**kwargs) -> DevServer:
        servers.append(DevServer(tmp_path / "data", **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
