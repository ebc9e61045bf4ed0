"""A fork's unpacking of its parent's workspace: `agent.fork.unpack_workspace` against plain tarfile.

Builds a workspace archive as the snapshotter writes it (`snapshot.write_workspace_archive`) of
N files (1 KB each, 100 per directory, a few symlinks), then, alternating round by round who goes
first, unpacks it into an empty directory:

* ours: `fork.unpack_workspace` (two passes, its own member rules, tarfile's "data" filter, the
  sweep of links that lead out);
* baseline: `tarfile.extractall(filter="data")`, Python's own safe extraction, in one pass.

Prints the medians and the median of the per-round ratios (no target is gated: the issue sets none;
the cost of the care is what this shows).

    .venv/bin/python bench/bench_fork_restore.py [--files 10000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import fork, snapshot  # noqa: E402


def build_archive(root: Path, files: int) -> Path:
    workspace = root / "parent"
    for i in range(files):
        path = workspace / "repo" / f"d{i // 100:03d}" / f"f{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((f"line {i}\n" * 128)[:1024].encode())
    for i in range(0, files, 1000):
        os.symlink(f"f{i:05d}.txt", workspace / "repo" / f"d{i // 100:03d}" / "link")
    archive = root / "workspace.tar.gz"
    snapshot.write_workspace_archive(workspace, archive)
    return archive


def ours(archive: Path, dest: Path) -> float:
    began = time.perf_counter()
    report = fork.unpack_workspace(archive, dest)
    elapsed = time.perf_counter() - began
    assert not report.skipped, report.skipped[:3]
    return elapsed


def baseline(archive: Path, dest: Path) -> float:
    began = time.perf_counter()
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(dest, filter="data")
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fork-") as tmp:
        root = Path(tmp)
        archive = build_archive(root, args.files)
        times = {"ours": [], "baseline": []}
        ratios = []
        for round_ in range(args.rounds):
            order = ("ours", "baseline") if round_ % 2 == 0 else ("baseline", "ours")
            for name in order:
                dest = root / f"{name}-{round_}"
                dest.mkdir()
                times[name].append((ours if name == "ours" else baseline)(archive, dest))
                shutil.rmtree(dest)
            ratios.append(times["ours"][-1] / times["baseline"][-1])
        size = archive.stat().st_size
        print(f"archive: {args.files} files, {size / 1e6:.1f} MB gzip")
        for name, values in times.items():
            print(f"{name:9s} median {statistics.median(values) * 1000:7.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})")
        print(f"ratio ours/baseline: median {statistics.median(ratios):.2f}x over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
