"""Snapshot a live checkpoint database: time against SQLite's own backup, writer stalls, snapshotter RSS.

Builds a checkpoint-like SQLite WAL database (LangGraph's `checkpoints` and
`writes` tables with blobs), then, in the same run and alternating:

* while a writer thread commits small transactions continuously: snapshots
  (online backup, then one read of the copy that hashes and uploads it, to a
  file:// store, or to a moto S3 server process over HTTP with --s3) and the
  floor, Python's `sqlite3.Connection.backup` of the same database into a file
  (one step); plus a plain `shutil.copyfile` for reference; with --s3 also that
  backup followed by boto3's `upload_file` of it (what an upload costs anyway);
* with the writer paused (one commit before each round, so every snapshot is
  new): snapshots and `sqlite3 DB ".backup FILE"` (the CLI; under a running
  writer its 100-page steps restart on every foreign commit).

Targets: snapshot time <= 1.3x the backup's (both baselines printed), writer
commit stall p99 <= 50 ms during snapshots (with the figure without a snapshot).
With --rss: the idle VmRSS of `python -m agent snapshotter` connected to an
authenticated nats-server (target <= 25 MB), and the floor of the interpreter
with asyncio (ssl) and nats-py imported.

    .venv/bin/python bench/bench_snapshot.py [--size-mb 200] [--s3] [--repeat 5] [--rss]
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
from agent.snapshot import backup_database, prune_snapshots, take_snapshot  # noqa: E402
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


def python_backup(db: Path, dest: Path) -> None:
    """The floor: SQLite's backup API in one step (one read lock, no restart), into a plain file."""
    src = sqlite3.connect(db)
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst, pages=-1)
    finally:
        dst.close()
        src.close()


def cli_backup(db: Path, dest: Path) -> None:
    subprocess.run(["sqlite3", str(db), f".backup '{dest}'"], check=True, capture_output=True, timeout=600)


def one_commit(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("INSERT INTO writes VALUES (?, '', ?, 'quiet', 0, 'messages', 'msgpack', ?)",
                 (TASK, f"quiet-{time.monotonic_ns()}", os.urandom(400)))
    conn.close()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def snapshot_once(db: Path, store) -> tuple[float, int]:
    start = time.perf_counter()
    result = take_snapshot(db, store, TASK)
    elapsed = time.perf_counter() - start
    assert result.uploaded, "every snapshot here is of a changed database"
    prune_snapshots(store, TASK, keep=1)  # like the baselines, do not let the store pile up
    return elapsed, result.size


def secs(values: list[float]) -> str:
    return ", ".join(f"{t:.2f}s" for t in values)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def bench_snapshots(args, work: Path) -> bool:
    workspace = work / "ws"
    db = workspace / contract.checkpoint_path(TASK)
    db.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_db(db, args.size_mb)
    print(f"database: {db.stat().st_size / 2**20:.1f} MB built in {time.perf_counter() - t0:.1f}s ({db})")
    store, server = open_bench_store(args, work)
    print(f"store: {store.describe()}")
    dest = work / "baseline.db"

    def fresh(fn):
        dest.unlink(missing_ok=True)
        elapsed = timed(lambda: fn(db, dest))
        dest.unlink()
        return elapsed

    try:
        writer = Writer(db, args.writer_pause_ms / 1000)
        writer.start()
        time.sleep(1.0)
        base_start = time.perf_counter()
        time.sleep(2.0)
        baseline = writer.window(base_start, time.perf_counter())

        snap_times, backup_times, copy_times, ours, uploads, windows = [], [], [], [], [], []

        def backup_and_upload(a: Path, b: Path) -> None:
            """With --s3, the floor of a snapshot that uploads: a backup, then boto3's own upload of it."""
            python_backup(a, b)
            store._client.upload_file(str(b), store.bucket, f"{store.prefix}/baseline/upload.db")

        for _ in range(args.repeat):
            if args.s3:
                uploads.append(fresh(backup_and_upload))
                time.sleep(0.3)
            copy_times.append(fresh(lambda a, b: shutil.copyfile(a, b)))
            time.sleep(0.3)
            ours.append(fresh(backup_database))
            time.sleep(0.3)
            backup_times.append(fresh(python_backup))
            time.sleep(0.3)
            start = time.perf_counter()
            elapsed, size = snapshot_once(db, store)
            snap_times.append(elapsed)
            windows.append(writer.window(start, start + elapsed))
            time.sleep(0.3)
        writer.stop.set()
        writer.join(30)
        if writer.error:
            raise writer.error

        quiet_snaps, cli_times = [], []
        have_cli = shutil.which("sqlite3") is not None
        for _ in range(args.repeat):
            one_commit(db)
            if have_cli:
                cli_times.append(fresh(cli_backup))
            quiet_snaps.append(snapshot_once(db, store)[0])
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)

    during = [lat for w in windows for lat in w]
    p99 = pct(during, 99)
    snap_s, backup_s = statistics.median(snap_times), statistics.median(backup_times)
    ratio = snap_s / backup_s
    print(f"with the writer running ({args.repeat} rounds, {size / 2**20:.1f} MB):")
    print(f"  snapshots            {secs(snap_times)}")
    print(f"  Connection.backup    {secs(backup_times)}")
    print(f"  shutil.copyfile      {secs(copy_times)} (reference only: not a consistent copy)")
    print(f"  the snapshot's backup step alone (stepped, one read transaction) {secs(ours)}")
    print(f"  writer without snapshot: {len(baseline)} commits, p50 {ms(pct(baseline, 50))} ms, "
          f"p99 {ms(pct(baseline, 99))} ms, max {ms(max(baseline, default=0))} ms")
    print(f"  writer during snapshots: {len(during)} commits, p50 {ms(pct(during, 50))} ms, "
          f"p99 {ms(p99)} ms, max {ms(max(during, default=0))} ms")
    print(f"  writer commit stall p99: {ms(p99)} ms (target <= 50 ms) {verdict(p99 <= 0.050)}")
    print(f"  snapshot / Connection.backup: {ratio:.2f}x (medians; target <= 1.3x) {verdict(ratio <= 1.3)}; "
          f"snapshot / plain copy {snap_s / statistics.median(copy_times):.2f}x")
    ok = p99 <= 0.050 and ratio <= 1.3
    if uploads:  # uploading costs what it costs: the target is against a backup plus a bare upload
        up_ratio = snap_s / statistics.median(uploads)
        print(f"  backup + upload_file {secs(uploads)} (S3's floor: the backup, then boto3 uploads it)")
        print(f"  snapshot / (backup + upload_file): {up_ratio:.2f}x (medians; target <= 1.3x) {verdict(up_ratio <= 1.3)}")
        ok = p99 <= 0.050 and up_ratio <= 1.3
    print(f"with the writer paused ({args.repeat} rounds, one commit before each):")
    print(f"  snapshots            {secs(quiet_snaps)}")
    if cli_times:
        cli_ratio = statistics.median(quiet_snaps) / statistics.median(cli_times)
        print(f"  sqlite3 .backup      {secs(cli_times)} (the CLI, process start included)")
        if args.s3:
            print(f"  snapshot / sqlite3 .backup: {cli_ratio:.2f}x (medians; with the upload, for information)")
        else:
            print(f"  snapshot / sqlite3 .backup: {cli_ratio:.2f}x (medians; target <= 1.3x) {verdict(cli_ratio <= 1.3)}")
            ok = ok and cli_ratio <= 1.3
    else:
        print("  sqlite3 CLI not found: that baseline is skipped")
    return ok


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def bench_rss(work: Path, runs: int = 2) -> bool:
    """Idle VmRSS of the snapshotter once it listens on NATS (no snapshot taken yet), and the floor."""
    from tests.conftest import NatsServer

    (work / "nats").mkdir()
    server = NatsServer(work / "nats").start()
    try:
        creds = server.launch_creds("rss-task", "snapshotter")
        (work / "rss-ws").mkdir()
        figures = []
        for run in range(runs):
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "snapshotter", "--task-id", "rss-task", "--workspace",
                 str(work / "rss-ws"), "--store", (work / "rss-store").as_uri(), "--nats", server.url,
                 "--nats-creds", creds],
                stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
            )
            try:
                for line in proc.stderr:
                    if "listening on" in line:
                        break
                else:
                    raise RuntimeError("the snapshotter exited before listening")
                time.sleep(2.0)  # idle
                figures.append(vm_rss_mb(proc.pid))
            finally:
                proc.terminate()
                proc.wait(30)
            print(f"snapshotter idle VmRSS, run {run + 1}: {figures[-1]:.1f} MB")
        floor_code = ("import asyncio, sys; sys.modules.setdefault('aiohttp', None); import nats, nkeys; "
                      "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))")
        floor = int(subprocess.run([sys.executable, "-c", floor_code], capture_output=True, text=True,
                                   check=True).stdout) / 1024
        bare = int(subprocess.run([sys.executable, "-c", floor_code.split(";")[-1].strip()], capture_output=True,
                                  text=True, check=True).stdout) / 1024
        worst = max(figures)
        print(f"floor: the interpreter {bare:.1f} MB; with asyncio (ssl), nats-py without aiohttp and nkeys "
              f"imported {floor:.1f} MB")
        print(f"snapshotter idle VmRSS: {worst:.1f} MB (target <= 25 MB) {verdict(worst <= 25)}")
        return worst <= 25
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200, help="database size to build (default 200)")
    parser.add_argument("--s3", action="store_true", help="upload to moto S3 over HTTP instead of a file:// store")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of snapshot and baselines (default 5, median)")
    parser.add_argument("--writer-pause-ms", type=float, default=1.0, help="pause between writer commits (default 1)")
    parser.add_argument("--rss", action="store_true", help="measure the idle snapshotter's RSS instead")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed afterwards)")
    args = parser.parse_args(argv)

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ok = bench_rss(work) if args.rss else bench_snapshots(args, work)
        return 0 if ok else 1
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
