"""What resuming itself costs: process start to the first new step of a run resumed after SIGKILL, MINUS
process start to the first step of a fresh run of the same task, in the same round.

Run: .venv/bin/python bench/bench_resume.py [--repeat 7]

Each round starts the agent (`python -m agent run`, scripted model, no NATS) on a fresh workspace, times its
first tool call, kills it with SIGKILL after five finished steps, starts it again on the same workspace and
times its first new tool call (the `tool` event at stage start, read from its stdout). Both sides pay the
interpreter, the imports and the model set-up alike, so the difference is opening the checkpoint and
restoring the state. Bytecode as ./scripts/setup compiles it.
Target (issue 13): resumed - fresh <= 50 ms (median over the rounds; each round printed).
Exit status 1 when the target is missed.
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seconds_to_first_tool_call(proc: subprocess.Popen, started: float) -> tuple[float, float]:
    """(wall seconds, the agent process's CPU seconds) from its start to its first `tool` event."""
    for line in proc.stdout:
        if line.startswith("{") and '"type": "tool"' in line.replace('":"', '": "'):
            return time.perf_counter() - started, cpu_seconds(proc.pid)
    raise RuntimeError("the agent exited before any tool call")


def one_round(tmp: Path) -> tuple[tuple[float, float], tuple[float, float]]:
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


TARGET_MS = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    fresh, resumed, fresh_cpu, resumed_cpu = [], [], [], []
    for n in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            (f, fc), (r, rc) = one_round(Path(tmp))
        fresh.append(f * 1000)
        resumed.append(r * 1000)
        fresh_cpu.append(fc * 1000)
        resumed_cpu.append(rc * 1000)
        print(f"round {n + 1}: wall fresh {fresh[-1]:7.1f} ms  resumed {resumed[-1]:7.1f} ms  cost {resumed[-1] - fresh[-1]:+7.1f} ms"
              f"   | cpu fresh {fresh_cpu[-1]:6.0f} ms  resumed {resumed_cpu[-1]:6.0f} ms  cost {resumed_cpu[-1] - fresh_cpu[-1]:+5.0f} ms")
    cost = [r - f for f, r in zip(fresh, resumed, strict=True)]
    cpu_cost = [r - f for f, r in zip(fresh_cpu, resumed_cpu, strict=True)]
    median = statistics.median(cost)
    ok = median <= TARGET_MS
    print(f"baseline: fresh start to first tool call          median {statistics.median(fresh):7.1f} ms wall, {statistics.median(fresh_cpu):5.0f} ms cpu")
    print(f"restart after SIGKILL to first new tool call      median {statistics.median(resumed):7.1f} ms wall, {statistics.median(resumed_cpu):5.0f} ms cpu"
          f"   ratio {statistics.median(resumed) / statistics.median(fresh):.2f}x (wall)")
    print(f"resume cost (resumed - fresh, per round), wall    median {median:+7.1f} ms   range {min(cost):+.1f} .. {max(cost):+.1f} ms")
    print(f"resume cost, CPU of the agent process (10 ms ticks) median {statistics.median(cpu_cost):+5.0f} ms   "
          f"range {min(cpu_cost):+.0f} .. {max(cpu_cost):+.0f} ms   (steadier than wall on a busy machine)")
    print(f"target: resume cost <= {TARGET_MS:.0f} ms (wall median)           {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
