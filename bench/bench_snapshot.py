"""Snapshot a live checkpoint database: writer stalls and throughput against a plain copy.

Builds a checkpoint-like SQLite WAL database (LangGraph's `checkpoints` and
`writes` tables with blobs), then, while a writer thread commits small
transactions continuously, takes snapshots (online backup + sha256 + upload to
a file:// store, or to a moto S3 server process over HTTP with --s3) and plain copies
(shutil.copyfile) of the same database file, alternating, in the same run.

Reports the writer's commit latency while snapshots run (p99 target <= 50 ms),
with the same figure without a snapshot as a baseline, and the snapshot
throughput as a ratio of the plain copy's (target >= 0.5x).

    .venv/bin/python bench/bench_snapshot.py [--size-mb 200] [--s3] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import contract  # noqa: E402
from agent.snapshot import prune_snapshots, take_snapshot  # noqa: E402
from agent.storage import open_store  # noqa: E402
from tests.conftest import free_port  # noqa: E402

TASK = "bench-snapshot"
SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    thread_id TEXT NOT NULL, checkpoint_ns TEXT NOT NULL DEFAULT '', checkpoint_id TEXT NOT NULL,
    parent_checkpoint_id TEXT, type TEXT, checkpoint BLOB, metadata BLOB,
    PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id));
CREATE TABLE IF NOT EXISTS writes (
    thread_id TEXT NOT NULL, checkpoint_ns TEXT NOT NULL DEFAULT '', checkpoint_id TEXT NOT NULL,
    task_id TEXT NOT NULL, idx INTEGER NOT NULL, channel TEXT NOT NULL, type TEXT, value BLOB,
    PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx));
"""


def blob(size: int) -> bytes:
    # Half random, half repetitive: serialized state compresses somewhat, but not entirely.
    half = size // 2
    return os.urandom(half) + b"{'messages': [...], 'todo': []}" * ((size - half) // 32 + 1)


def build_db(path: Path, size_mb: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    target = size_mb * 1024 * 1024
    step = 0
    conn.execute("BEGIN")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    while conn.execute("PRAGMA page_count").fetchone()[0] * page_size < target:
        for _ in range(200):
            step += 1
            cid = f"{step:012d}"
            conn.execute(
                "INSERT INTO checkpoints VALUES (?, '', ?, ?, 'msgpack', ?, ?)",
                (TASK, cid, f"{step - 1:012d}", blob(4000 + (step * 7919) % 12000), b'{"step": %d}' % step),
            )
            conn.executemany(
                "INSERT INTO writes VALUES (?, '', ?, ?, ?, 'messages', 'msgpack', ?)",
                [(TASK, cid, f"task-{step}", i, blob(300 + (step * 31 + i) % 2000)) for i in range(3)],
            )
        conn.execute("COMMIT")
        conn.execute("BEGIN")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


class Writer(threading.Thread):
    """The agent: one small transaction after another, each commit timed."""

    def __init__(self, path: Path, pause: float):
        super().__init__(daemon=True)
        self.path = path
        self.pause = pause
        self.latencies: list[tuple[float, float]] = []  # (start, seconds)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA synchronous=NORMAL")
            n = 0
            while not self.stop.is_set():
                n += 1
                start = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO writes VALUES (?, '', ?, 'live', ?, 'messages', 'msgpack', ?)",
                    (TASK, f"live-{n:09d}", 0, os.urandom(400)),
                )
                conn.execute("COMMIT")
                self.latencies.append((start, time.perf_counter() - start))
                if self.pause:
                    time.sleep(self.pause)
            conn.close()
        except BaseException as exc:
            self.error = exc

    def window(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in list(self.latencies) if start <= t < end]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def open_bench_store(args, work: Path):
    """A file:// store, or S3 on a moto server in its own process (not competing for our GIL)."""
    if not args.s3:
        return open_store((work / "store").as_uri()), None
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["DOCKYARD_S3_ENDPOINT"] = endpoint
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return open_store("s3://bench/dockyard", secrets_dir=work / "no-secrets"), server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200, help="database size to build (default 200)")
    parser.add_argument("--s3", action="store_true", help="upload to moto S3 over HTTP instead of a file:// store")
    parser.add_argument("--repeat", type=int, default=5, help="snapshots and plain copies each (default 5, median)")
    parser.add_argument("--writer-pause-ms", type=float, default=1.0, help="pause between writer commits (default 1)")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed afterwards)")
    args = parser.parse_args(argv)

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        workspace = work / "ws"
        db = workspace / contract.checkpoint_path(TASK)
        db.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_db(db, args.size_mb)
        size = db.stat().st_size
        print(f"database: {size / 2**20:.1f} MB built in {time.perf_counter() - t0:.1f}s ({db})")
        store, server = open_bench_store(args, work)
        print(f"store: {store.describe()}")

        writer = Writer(db, args.writer_pause_ms / 1000)
        writer.start()
        time.sleep(1.0)
        base_start = time.perf_counter()
        time.sleep(2.0)
        baseline = writer.window(base_start, time.perf_counter())

        snap_times, copy_times, windows, snap_sizes = [], [], [], []
        copy_dest = work / "plain-copy.db"
        for _ in range(args.repeat):
            start = time.perf_counter()
            shutil.copyfile(db, copy_dest)
            copy_times.append(time.perf_counter() - start)
            copy_size = copy_dest.stat().st_size
            copy_dest.unlink()
            time.sleep(0.3)

            start = time.perf_counter()
            result = take_snapshot(db, store, TASK)
            end = time.perf_counter()
            assert result.uploaded, "the writer kept committing, so every snapshot is new"
            snap_times.append(end - start)
            snap_sizes.append(result.size)
            windows.append(writer.window(start, end))
            prune_snapshots(store, TASK, keep=1)  # like the plain copy, do not let the store pile up
            time.sleep(0.3)
        writer.stop.set()
        writer.join(30)
        if writer.error:
            raise writer.error

        during = [lat for w in windows for lat in w]
        snap_s = statistics.median(snap_times)
        copy_s = statistics.median(copy_times)
        snap_mbps = statistics.median(snap_sizes) / 2**20 / snap_s
        copy_mbps = copy_size / 2**20 / copy_s
        ratio = snap_mbps / copy_mbps
        p99 = pct(during, 99)
        snaps = ", ".join(f"{t:.2f}s" for t in snap_times)
        copies = ", ".join(f"{t:.2f}s" for t in copy_times)
        print(f"snapshots: {args.repeat} x {statistics.median(snap_sizes) / 2**20:.1f} MB in {snaps}; plain copies in {copies}")
        print(f"writer without snapshot: {len(baseline)} commits, p50 {ms(pct(baseline, 50))} ms, "
              f"p99 {ms(pct(baseline, 99))} ms, max {ms(max(baseline, default=0))} ms")
        print(f"writer during snapshots: {len(during)} commits, p50 {ms(pct(during, 50))} ms, "
              f"p99 {ms(p99)} ms, max {ms(max(during, default=0))} ms")
        print(f"writer commit stall p99: {ms(p99)} ms (target <= 50 ms) {'OK' if p99 <= 0.050 else 'MISSED'}")
        print(f"snapshot throughput: {snap_mbps:.0f} MB/s; plain copy: {copy_mbps:.0f} MB/s; "
              f"ratio {ratio:.2f}x (target >= 0.5x) {'OK' if ratio >= 0.5 else 'MISSED'}")
        return 0 if p99 <= 0.050 and ratio >= 0.5 else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
