"""Cold start of the functions: a fresh interpreter importing functions.main and creating each target's app,
versus a bare functions-framework aio "hello" function created the same way.

    .venv/bin/python bench/bench_coldstart.py [--runs 9]

Both run in fresh subprocesses, interleaved, median of --runs each (target
<= 1.5x). Heavy libraries (nats, boto3, kubernetes) must not load at import:
the script also reports which of them a cold import pulled in.
Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HELLO = textwrap.dedent(
    """
    import functions_framework.aio

    @functions_framework.aio.http
    async def hello(request):
        return "hello"
    """
)

OURS = "import functions.main as m\nfor target in m.HANDLERS: m.create_app(target)"
HEAVY = ("nats", "boto3", "botocore", "kubernetes", "langgraph", "yaml")
REPORT_HEAVY = OURS + f"\nimport sys\nprint(','.join(sorted({{n.split('.')[0] for n in sys.modules}} & {set(HEAVY)!r})))"


def run(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(runs: int) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        hello = Path(tmp) / "hello.py"
        hello.write_text(HELLO)
        baseline_code = f"from functions_framework.aio import create_asgi_app\ncreate_asgi_app('hello', {str(hello)!r})"
        for code in (baseline_code, OURS):  # warm the OS page cache and .pyc files
            run(code, env)
        empty, baseline, ours = [], [], []
        for _ in range(runs):
            empty.append(run("pass", env))
            baseline.append(run(baseline_code, env))
            ours.append(run(OURS, env))
    heavy = subprocess.run(
        [sys.executable, "-c", REPORT_HEAVY], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()

    med = {name: statistics.median(v) * 1000 for name, v in (("empty", empty), ("baseline", baseline), ("ours", ours))}
    print(f"runs: {runs} each, interleaved, fresh interpreters")
    print(f"python -c pass                         median {med['empty']:7.1f} ms")
    print(f"functions-framework aio hello          median {med['baseline']:7.1f} ms")
    print(f"functions.main, 4 targets' apps        median {med['ours']:7.1f} ms")
    print(f"ratio ours / hello                     {med['ours'] / med['baseline']:7.2f}x   (target <= 1.5x)")
    above = (med["ours"] - med["empty"]) / (med["baseline"] - med["empty"])
    print(f"ratio without interpreter start-up     {above:7.2f}x")
    print(f"heavy modules loaded at import         {heavy or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    main(parser.parse_args().runs)
