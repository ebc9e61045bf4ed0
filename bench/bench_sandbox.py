"""Start-up the bubblewrap sandbox adds to one `execute`, against the same `execute` without it, in the same run.

    .venv/bin/python bench/bench_sandbox.py [--runs 40]

Each side is `WorkTools.execute("true")`, the agent's own tool, timed from the call to its answer:
- plain:   the command as in the pod (`--sandbox container`): a process group, the subreaper sweep;
- bwrap:   as under `dockyard dev` (agent/sandbox.py): bubblewrap with its namespaces and mounts, the
           socat forwarder to the egress proxy started and listened on before the command, and the
           wait for the namespace's PID 1 to be gone. The egress proxy is the real one
           (functions/devstack/egress_proxy.py: Squid and its Unix socket bridge);
- bwrap, no network: the same without the forwarder (a sandbox with no egress socket), to show
           what the forwarder costs.
Rounds are interleaved (plain, bwrap, bwrap without network, ...); medians and p90 of --runs each.
Also, for the forwarder choice: the start of `socat -V` against `/usr/bin/python3 -I -c "import socket, selectors"`
(a minimal Python forwarder's start before it could listen), medians of the same number of runs.
Target (issue 10, part 4): bwrap − plain ≤ 50 ms per execute (median). Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sandbox import Sandbox, SandboxUnavailable, check  # noqa: E402
from agent.tools import WorkTools  # noqa: E402
from functions.devstack.egress_proxy import EgressProxy  # noqa: E402

TARGET_MS = 50.0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    try:
        bwrap = check(egress=True)
    except SandboxUnavailable as exc:
        print(f"bench_sandbox: {exc}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="dockyard-bench-sandbox-"))
    proxy = EgressProxy(root / "egress").start()
    try:
        workspace, home = root / "workspace", root / "home"
        workspace.mkdir()
        home.mkdir()
        sides = {
            "plain": WorkTools(workspace, home),
            "bwrap": WorkTools(workspace, home, sandbox=Sandbox(workspace, home, proxy.socket, bwrap=bwrap)),
            "bwrap, no network": WorkTools(workspace, home, sandbox=Sandbox(workspace, home, None, bwrap=bwrap)),
        }
        for tools in sides.values():  # warm up: caches, the first fork of each path
            assert tools.call("execute", {"command": "true"}).ok
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.runs):
            for name, tools in sides.items():
                times[name].append(timed(lambda tools=tools: tools.call("execute", {"command": "true"})))
        starts = {"socat -V": ["socat", "-V"], "python3 forwarder imports": ["/usr/bin/python3", "-I", "-c", "import socket, selectors"]}
        start_times: dict[str, list[float]] = {name: [] for name in starts}
        for _ in range(args.runs):
            for name, argv in starts.items():
                start_times[name].append(timed(lambda argv=argv: subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)))
    finally:
        proxy.stop()
        shutil.rmtree(root, ignore_errors=True)

    plain = statistics.median(times["plain"])
    print(f"execute('true'), {args.runs} interleaved runs each, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:18} median {median:6.1f} ms  p90 {p90(values):6.1f} ms  ratio {median / plain:4.2f}x  added {median - plain:+6.1f} ms")
    print("forwarder start (process start to exit):")
    for name, values in start_times.items():
        print(f"  {name:26} median {statistics.median(values):6.1f} ms")
    added = statistics.median(times["bwrap"]) - plain
    verdict = "met" if added <= TARGET_MS else "MISSED"
    print(f"sandbox added per execute: {added:.1f} ms (target <= {TARGET_MS:.0f} ms): {verdict}")
    return 0 if added <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
