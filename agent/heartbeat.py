"""A liveness file that stays fresh only while the agent loop makes progress.

The loop calls `beat()` after each step; a blocking call (the model, a tool)
runs inside `waiting(seconds)`, which keeps the file fresh for at most that
long. A hung loop stops refreshing it, and the pod's liveness probe (file
older than its threshold) restarts the container, which resumes from the
checkpoint.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

INTERVAL_SECONDS = 5.0
STEP_WINDOW_SECONDS = 60.0


class Heartbeat:
    def __init__(self, path: Path, interval: float = INTERVAL_SECONDS):
        self.path = path
        self.interval = interval
        self._fresh_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread.start()
        return self

    def beat(self, window: float = STEP_WINDOW_SECONDS) -> None:
        self._fresh_until = max(self._fresh_until, time.monotonic() + window)
        self._touch()

    @contextmanager
    def waiting(self, seconds: float):
        self.beat(seconds)
        try:
            yield
        finally:
            self._fresh_until = time.monotonic() + STEP_WINDOW_SECONDS
            self._touch()

    def stop(self) -> None:
        self._stop.set()

    def _touch(self) -> None:
        try:
            self.path.write_text(f"{time.time():.3f}\n")
        except OSError:
            pass  # a full disk must not kill the loop; the probe will notice

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() < self._fresh_until:
                self._touch()
