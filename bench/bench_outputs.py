"""What keeping a command's whole output costs: `WorkTools.execute` with the `.dockyard/outputs` file
(agent.outputs, written chunk by chunk as it is read) against the same call without it, alternated
in the same run, on outputs of 600 KB and 200 MB. Also the agent's peak memory growth while a 200 MB
output streams through (it must stay near the 16 KB the model sees, not the output's size).

    .venv/bin/python bench/bench_outputs.py [--rounds 7]

No target in the issue: prints the ratio only.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.outputs import OutputStore  # noqa: E402
from agent.tools import WorkTools  # noqa: E402

SIZES = {"600 KB": 600_000, "200 MB": 200_000_000}


def timed(tools: WorkTools, size: int, call_id: str | None) -> float:
    started = time.perf_counter()
    result = tools.call("execute", {"command": f"head -c {size} /dev/zero"}, call_id=call_id)
    took = time.perf_counter() - started
    assert result.ok and result.output_bytes == size, result.output[:200]
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        kept = WorkTools(workspace, Path(tmp) / "home", outputs=OutputStore(workspace, max_bytes=250_000_000))
        plain = WorkTools(workspace, Path(tmp) / "home")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for label, size in SIZES.items():
            with_file, without = [], []
            for n in range(args.rounds):
                without.append(timed(plain, size, None))
                with_file.append(timed(kept, size, f"call_{n}"))
            a, b = statistics.median(with_file), statistics.median(without)
            print(f"{label:>7}: with the file {a * 1000:8.1f} ms, without {b * 1000:8.1f} ms (medians of {args.rounds}), "
                  f"ratio {a / b:.2f}x, {size / a / 1e6:.0f} MB/s kept")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        print(f"peak RSS growth over every run: {grown / 1024:.1f} MB (outputs up to {max(SIZES.values()) / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
