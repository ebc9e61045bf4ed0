"""Download a task's 500 MB workspace archive through the stream app, against a plain read of the same object.

    .venv/bin/python bench/bench_download.py [--size-mb 500] [--rounds 3] [--s3]

In the same run, rounds alternating (who goes first alternates too):

* ours: GET /api/tasks/{id}/workspace.tar.gz from the stream app (`python -m
  functions.stream`, its own process, as the `stream` NATS user, a read token),
  read to the end by an httpx client in this process: registry look-up, the
  store's chunked read, Starlette's streaming response, uvicorn, HTTP on loopback;
* baseline: the same object read in 1 MB chunks straight from the store in this
  process: `open().read()` on the file store, or with --s3 boto3's
  `get_object()["Body"].iter_chunks()` against moto's S3 server (its own process,
  over HTTP) — what any download costs at least.

Prints each round's seconds and MB/s, the median ratio ours/baseline, and the
app's memory: its RSS before the first download and its peak (VmHWM) after the
last, i.e. what streaming 500 MB cost it. The object is random bytes (an archive
does not compress further). The issue sets no target: prints only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from bench_fanout import BENCH_TOKEN, start_app  # noqa: E402  (this folder is on sys.path when run as a script)

from agent import contract  # noqa: E402
from agent.storage import open_store  # noqa: E402
from functions.core.bus import Bus  # noqa: E402
from functions.core.registry import new_record  # noqa: E402
from functions.devstack import nats_auth  # noqa: E402
from functions.devstack.nats_embedded import EmbeddedNats  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402

TASK = "bench-download"
MB = 1 << 20


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_object(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MB):
            chunk = os.urandom(MB)
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def through_app(base: str) -> tuple[float, str]:
    digest = hashlib.sha256()
    start = time.perf_counter()
    with httpx.stream("GET", f"{base}/api/tasks/{TASK}/workspace.tar.gz", headers={"Authorization": f"Bearer {BENCH_TOKEN}"}, timeout=120) as r:
        r.raise_for_status()
        for chunk in r.iter_raw(MB):
            digest.update(chunk)
    return time.perf_counter() - start, digest.hexdigest()


def plain_read(store_root: Path | None, s3: tuple | None) -> tuple[float, str]:
    digest = hashlib.sha256()
    key = contract.final_archive_key(TASK)
    start = time.perf_counter()
    if s3 is None:
        with open(store_root.joinpath(*key.split("/")), "rb") as f:
            while chunk := f.read(MB):
                digest.update(chunk)
    else:
        client, bucket = s3
        for chunk in client.get_object(Bucket=bucket, Key=f"tasks/{key}")["Body"].iter_chunks(MB):
            digest.update(chunk)
    return time.perf_counter() - start, digest.hexdigest()


async def register(nats_url: str, creds: str) -> None:
    bus = await Bus.open(nats_url, creds=creds)
    try:
        if await bus.registry.get(TASK) is None:
            await bus.registry.create(TASK, new_record(TASK, task=None, spec_hash=None, now=contract.iso_utc()))
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="the store is moto's S3 server (its own process, HTTP)")
    args = parser.parse_args()
    size = args.size_mb * MB

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        moto = None
        s3 = None
        if args.s3:
            import boto3

            port = free_port()
            moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            wait_for_port(port)
            endpoint = f"http://127.0.0.1:{port}"
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                              DOCKYARD_S3_ENDPOINT=endpoint)  # fmt: skip
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket="bench")
            s3 = (client, "bench")
            store_url = "s3://bench/tasks"
        else:
            store_url = (tmp / "store").as_uri()
        os.environ["DOCKYARD_STORE"] = store_url  # the app's store (start_app passes this environment on)

        source = tmp / "workspace.tar.gz"
        expected = write_object(source, size)
        open_store(store_url).put_file(contract.final_archive_key(TASK), source, move=True)

        auth = nats_auth.ensure(tmp / "auth")
        app = None
        try:
            with EmbeddedNats(tmp, config=auth.server_conf) as server:
                asyncio.run(register(server.url, str(auth.creds("admin"))))
                app, base = start_app(server.url, str(auth.creds("stream")), tmp / "app", factory=None)
                rss_start = proc_kb(app.pid, "VmRSS")
                through_app(base)  # warm: imports (boto3 with --s3), NATS connect, the page cache
                rss_before = proc_kb(app.pid, "VmRSS")
                ours, plain = [], []
                for i in range(args.rounds):
                    order = (("ours", ours), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("ours", ours))
                    for name, into in order:
                        seconds, sha = through_app(base) if name == "ours" else plain_read(tmp / "store", s3)
                        assert sha == expected, f"{name}: the bytes differ"
                        into.append(seconds)
                        print(f"round {i + 1} {name:5}: {seconds:6.2f} s  {size / MB / seconds:7.1f} MB/s")
                peak = proc_kb(app.pid, "VmHWM")
        finally:
            if app is not None:
                app.terminate()
                app.wait(10)
            if moto is not None:
                moto.terminate()
                moto.wait(10)

    ratios = [o / p for o, p in zip(ours, plain, strict=True)]
    where = "moto S3 over HTTP" if args.s3 else "file store"
    print(f"\n{args.size_mb} MB from the {where}, {args.rounds} rounds")
    print(f"ours (stream app, HTTP): median {statistics.median(ours):.2f} s ({size / MB / statistics.median(ours):.0f} MB/s)")
    print(f"plain read             : median {statistics.median(plain):.2f} s ({size / MB / statistics.median(plain):.0f} MB/s)")
    print(f"ratio ours/plain       : median {statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"stream app memory      : RSS {rss_start / 1024:.1f} MB started, {rss_before / 1024:.1f} MB after one download; "
          f"peak (VmHWM) {peak / 1024:.1f} MB after {args.rounds + 1} downloads of {args.size_mb} MB "
          f"(+{(peak - rss_start) / 1024:.1f} MB over the started RSS)")  # fmt: skip


if __name__ == "__main__":
    main()
