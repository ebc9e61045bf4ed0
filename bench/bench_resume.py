"""Resume: time from process start to the first new step after a SIGKILL.

Target: <= 2 s here (container start excluded). Printed against the same
measure for a fresh start in the same run (import and model load included in both).
Run: .venv/bin/python bench/bench_resume.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TURNS = [{"tool_calls": [{"name": "plan", "args": {"todos": ["work"], "objective": "work"}}]}]
TURNS += [{"tool_calls": [{"name": "execute", "args": {"command": f"echo {i} >> log.txt; sleep 0.2"}}]} for i in range(30)]
TURNS += [{"content": "done"}, {"tool_calls": [{"name": "finish", "args": {"summary": "ok"}}]}]


def start(workspace: Path, script: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [
        sys.executable, "-m", "agent", "run", "--task-id", "bench", "--workspace", str(workspace),
        "--task-file", str(ROOT / "agent/examples/example_task.json"), "--model", f"scripted:{script.name}", "--scripts-dir", str(script.parent),
        "--home", str(workspace.parent / "home"), "--secrets-dir", str(workspace.parent / "none"),
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def seconds_to_first_tool_call(proc: subprocess.Popen, started: float) -> float:
    for line in proc.stdout:
        if line.startswith("{") and '"type": "tool"' in line.replace('":"', '": "'):
            return time.perf_counter() - started
    raise RuntimeError("the agent exited before any tool call")


def one_round(tmp: Path) -> tuple[float, float]:
    script = tmp / "turns.yaml"
    script.write_text(yaml.safe_dump(TURNS))
    workspace = tmp / "ws"
    began = time.perf_counter()
    proc = start(workspace, script)
    fresh = seconds_to_first_tool_call(proc, began)
    while not (workspace / "log.txt").exists() or len((workspace / "log.txt").read_text().split()) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    began = time.perf_counter()
    proc = start(workspace, script)
    resumed = seconds_to_first_tool_call(proc, began)
    proc.kill()
    proc.wait()
    return fresh, resumed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    fresh, resumed = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            f, r = one_round(Path(tmp))
            fresh.append(f)
            resumed.append(r)
    f, r = statistics.median(fresh), statistics.median(resumed)
    print(f"fresh start to first tool call:   {f:.2f} s (median of {args.repeat})")
    print(f"restart after SIGKILL to first new tool call: {r:.2f} s (target <= 2 s); ratio resume/fresh {r / f:.2f}x")


if __name__ == "__main__":
    main()
