"""`dockyard dev`'s model gateway: one `python -m gateway` child for every task of the dev stack.

Invariants
- The model key files stay where they were, `<data dir>/secrets/model/` (`api_key` or
  `<provider>_api_key`, `base_url`): only the gateway reads them. The agents get neither the
  directory nor a key, in files, environment or command line (the agent's `--secrets-dir` is
  its task's own `secrets/` folder, holding its NATS user and its gateway token).
- Each task presents its own token (`gateway.grants`), minted by the local runtime at each
  admission; the grants (`<data dir>/gateway/grants/`, 0700) and the running totals
  (`<data dir>/gateway/usage/`, so a restarted stack continues a task's budget) are the gateway's.
- The listening socket is bound here, before any agent starts, and handed to the child
  (`--fd`): a call that comes before the child is up waits in the backlog, it is never refused.
- The child dies with the dev process (parent-death signal) and is stopped with it.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

from agent.procs import die_with_parent, terminate

log = logging.getLogger("dockyard.gateway")


class DevGateway:
    def __init__(self, data_dir: Path, *, nats_url: str | None, nats_creds: str = "", prices: str = "", env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "gateway"
        self.grants_dir = self.root / "grants"
        self.secrets_dir = self.data_dir / "secrets" / "model"
        self.nats_url = nats_url
        self.nats_creds = nats_creds
        self.prices = prices
        self.env = env
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "gateway", "--fd", str(self.sock.fileno()), "--secrets-dir", str(self.secrets_dir),
                "--grants-dir", str(self.grants_dir), "--state-dir", str(self.root / "usage"), "--prices", self.prices]
        if self.nats_url:
            argv += ["--nats", self.nats_url]
            if self.nats_creds:
                argv += ["--nats-creds", self.nats_creds]
        return argv

    def start(self) -> "DevGateway":
        from functions.runtime.local.processes import child_env

        for folder in (self.root, self.grants_dir, self.secrets_dir.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        log_file = open(self.root / "gateway.log", "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                         env=child_env(self.env), pass_fds=(self.sock.fileno(),), start_new_session=True,
                                         preexec_fn=die_with_parent(signal.SIGTERM))
        finally:
            log_file.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and not terminate(self.proc, timeout):
            log.warning("the model gateway ignored SIGTERM for %.0f s; it was killed", timeout)
        self.sock.close()
