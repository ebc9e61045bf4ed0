"""Fan-out of one busy task to many SSE clients, with and without a stalled client among them.

    .venv/bin/python bench/bench_fanout.py [--clients 200] [--rate 2000] [--seconds 5]
                                           [--client-procs 2] [--repeats 5] [--control]

One nats-server, authenticated as deployed (operator mode: the app connects as the `stream` user, the
publisher as `admin`), and one stream app, served as deployed (`python -m
functions.stream`, its own process; `--app` serves another app factory under
uvicorn instead, e.g. bench/sse_starlette_app.py). Each run publishes R log records/s for S
seconds on a fresh task:
(1) one SSE client: the baseline, measured in the same run;
(2) C clients;
(3) C-1 clients plus one stalled client (a socket with a small receive buffer
    that sends its request and never reads), connected before publishing.
(2) and (3) alternate `--repeats` times (at least 5); each pair gives one ratio p99(3) / p99(2), and the
MEDIAN of those ratios is held to the target, with their spread (min..max) printed: on a small machine one
run's ratio swings 0.8-3.0x on its own. The p99 pooled over all records is printed too.
`--control` runs (3) without its stalled client, to show what noise alone does.
Printed per run: records delivered (and to how many clients in full),
delivered records/s in total and per client, publish-to-client latency p50 /
p99 / max, and the CPU each process used; then the ratios: per-client rate and
p99 against the single client, and p99 with the stalled client against
without (target <= 1.2x, median of the interleaved runs). Exit status 1 when the target is missed.

Clients run as asyncio tasks in separate processes (`--client-procs`), each
reading its socket raw, counting every record and timing every SAMPLE-th one
with one regular expression per read: a full SSE parser per client would make
the clients, not the app, the thing measured. On two cores the clients still
compete with the app and nats-server: the CPU line says who used what.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import free_port  # noqa: E402

BUCKETS_PER_SECOND = 10_000  # latency histogram resolution: 0.1 ms
SAMPLE = 5  # clients time every 5th record (still ~400,000 samples per run of 200 clients): cheaper clients
TS_RE = re.compile(rb'"ts": ?([0-9.]+)')
WARMUP = b'"msg": "warmup"'
REPORT_LIMIT = 64 * 1024 * 1024  # a client's report is one JSON line; its histogram grows with the latency spread


# --- the client processes -----------------------------------------------------


async def one_client(host: str, port: int, path: str, hist: Counter, results: list, ready: asyncio.Event, waiting: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\nAuthorization: Bearer {BENCH_TOKEN}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    count, last, warm = 0, 0.0, False
    rest = b""
    while True:
        data = await reader.read(262144)
        if not data:
            break
        now = time.time()
        rest += data
        cut = rest.rfind(b"\n\n")
        if cut < 0:
            continue
        done, rest = rest[: cut + 2], rest[cut + 2 :]
        if not warm and WARMUP in done:
            warm = True
            waiting[0] -= 1
            if waiting[0] == 0:
                ready.set()
        found = TS_RE.findall(done)
        for ts in found[-count % SAMPLE :: SAMPLE]:  # every SAMPLE-th record of the stream
            hist[int((now - float(ts)) * BUCKETS_PER_SECOND)] += 1
        count += len(found)
        last = now
        if b"event: end" in done:
            break
    writer.close()
    results.append((count, last))


async def client_main(url: str, clients: int) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    hist: Counter = Counter()
    results: list = []
    ready = asyncio.Event()
    waiting = [clients]
    tasks = [asyncio.create_task(one_client(parts.hostname, parts.port, path, hist, results, ready, waiting)) for _ in range(clients)]
    await ready.wait()
    print("ready", flush=True)
    cpu0 = os.times()
    await asyncio.gather(*tasks)
    cpu1 = os.times()
    print(json.dumps({
        "counts": [c for c, _ in results],
        "last": max(t for _, t in results),
        "hist": hist,
        "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }), flush=True)  # fmt: skip


# --- the benchmark --------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BENCH_TOKEN = "dy_bench-token"  # the app's tokens file (start_app) holds its hash
BENCH_AUTH = {"Authorization": f"Bearer {BENCH_TOKEN}"}


def start_app(nats_url: str, creds: str, data_dir: Path, factory: str | None) -> tuple[subprocess.Popen, str]:
    """The stream app as deployed (`python -m functions.stream`), or uvicorn on another app factory."""
    import httpx

    from functions.stream.auth import token_line

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "api-tokens").write_text(token_line("bench", "read", BENCH_TOKEN) + "\n")

    port = free_port()
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DOCKYARD_NATS_URL": nats_url, "DOCKYARD_NATS_CREDS": creds, "DOCKYARD_DATA_DIR": str(data_dir), "PYTHONPATH": pythonpath,
           "DOCKYARD_STREAM_MAX_PER_IP": "0", "DOCKYARD_API_TOKENS_FILE": str(data_dir / "api-tokens")}  # fmt: skip
    if factory is None:
        command = [sys.executable, "-m", "functions.stream", "--host", "127.0.0.1", "--port", str(port), "--no-tracker"]
    else:
        command = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the stream app did not start")


def percentile(hist: Counter, q: float) -> float:
    total = sum(hist.values())
    rank = q * (total - 1)
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen > rank:
            return bucket / BUCKETS_PER_SECOND
    return float("nan")


async def run(name: str, nc, js, base: str, task_id: str, clients: int, procs: int, rate: int, seconds: float,
              app_pid: int, nats_pid: int, stalled: bool = False, control: bool = False) -> dict:  # fmt: skip
    from agent import contract

    subject = contract.subject_logs(task_id)
    after = (await js.publish(subject, b'{"msg": "hello"}')).seq  # the task exists; clients start after this
    url = f"{base}/api/stream/{task_id}?after={after}"
    healthy = clients - 1 if stalled else clients
    procs = max(1, min(procs, healthy))
    shares = [healthy // procs + (1 if i < healthy % procs else 0) for i in range(procs)]
    children = [
        await asyncio.create_subprocess_exec(sys.executable, __file__, "client", url, str(n), stdout=subprocess.PIPE, cwd=ROOT,
                                             limit=REPORT_LIMIT)
        for n in shares
    ]
    stuck = None
    if stalled and not control:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        stuck.sendall(f"GET /api/stream/{task_id}?after={after} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {BENCH_TOKEN}\r\n\r\n".encode())
    await asyncio.sleep(0.5)
    await nc.publish(subject, b'{"msg": "warmup"}')
    for child in children:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.strip() == b"ready", line

    pids = {"app": app_pid, "nats-server": nats_pid, "publisher": None}
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    total = int(rate * seconds)
    start_wall = time.time()
    start = time.perf_counter()
    pad = "x" * 90
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await nc.publish(subject, b'{"ts": %.6f, "level": "INFO", "logger": "bench", "msg": "live %d %s"}' % (time.time(), i, pad.encode()))
    published_in = time.perf_counter() - start
    finished = {"type": contract.EV_STATUS, "task_id": task_id, "state": contract.STATE_FINISHED, "outcome": "done"}
    await js.publish(contract.subject_events(task_id), json.dumps(finished).encode())
    reports = [json.loads(await asyncio.wait_for(child.stdout.readline(), 120)) for child in children]
    for child in children:
        await child.wait()
    used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    if stuck is not None:
        stuck.close()

    hist: Counter = Counter()
    counts: list[int] = []
    for report in reports:
        hist.update({int(k): v for k, v in report["hist"].items()})
        counts += report["counts"]
    elapsed = max(r["last"] for r in reports) - start_wall
    used["clients"] = sum(r["cpu"] for r in reports)
    delivered = sum(counts)
    result = {
        "name": name, "clients": healthy, "delivered": delivered, "expected": total * healthy,
        "full": sum(c == total for c in counts), "rate": delivered / elapsed, "per_client": delivered / elapsed / healthy,
        "p50": percentile(hist, 0.50), "p99": percentile(hist, 0.99), "max": max(hist) / BUCKETS_PER_SECOND,
        "cpu": {k: v / elapsed for k, v in used.items()}, "published_in": published_in, "hist": hist,
    }  # fmt: skip
    print(f"({name}) {healthy} client{'s' if healthy > 1 else ''}{(' + 1 idle slot (control)' if control else ' + 1 stalled') if stalled else ''}, "
          f"{rate} records/s for {seconds:g}s (published in {published_in:.2f}s)")  # fmt: skip
    print(f"    delivered {delivered} of {total * healthy} records; {result['full']} of {healthy} clients got all")
    print(f"    {result['rate']:.0f} records/s in total, {result['per_client']:.0f} per client")
    print(f"    latency publish -> client: p50 {result['p50'] * 1000:.1f} ms, p99 {result['p99'] * 1000:.1f} ms, max {result['max'] * 1000:.1f} ms")
    print("    CPU (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu"].items()) + f" of {os.cpu_count()}")
    return result


TARGET = 1.2


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="runs of (2) and (3), alternated (at least 5)")
    parser.add_argument("--control", action="store_true", help="(3) without the stalled client: how far noise alone moves the ratio")
    parser.add_argument("--app", help="an app factory for uvicorn --factory instead of `python -m functions.stream`")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats: at least 5 (the median of fewer interleaved runs is not steady enough)")

    import nats

    from functions.core.bus import ensure_stream
    from functions.devstack import nats_auth
    from functions.devstack.nats_embedded import EmbeddedNats

    with tempfile.TemporaryDirectory() as tmp:
        auth = nats_auth.ensure(Path(tmp) / "auth")
        server = EmbeddedNats(Path(tmp), config=auth.server_conf).start()
        nc = await nats.connect(server.url, user_credentials=str(auth.creds("admin")))
        js = nc.jetstream()
        await ensure_stream(js)
        app, base = start_app(server.url, str(auth.creds("stream")), Path(tmp) / "app", args.app)
        try:
            common = dict(procs=args.client_procs, rate=args.rate, seconds=args.seconds, app_pid=app.pid, nats_pid=server.proc.pid)
            await run("warm-up", nc, js, base, "bench-warmup", 2, rate=200, seconds=0.5, procs=1, app_pid=app.pid, nats_pid=server.proc.pid)
            print()
            one = await run("1", nc, js, base, "bench-one", 1, **common)
            many, stalled = [], []
            for r in range(args.repeats):  # alternated: drift and noise hit both alike
                many.append(await run(f"2.{r + 1}", nc, js, base, f"bench-many-{r}", args.clients, **common))
                stalled.append(await run(f"3.{r + 1}", nc, js, base, f"bench-stalled-{r}", args.clients, stalled=True, control=args.control, **common))
        finally:
            app.terminate()
            try:
                app.wait(10)
            except subprocess.TimeoutExpired:  # reported, not hidden: the figures below still hold
                print("NOTE: the stream app did not exit within 10 s of SIGTERM; killed", flush=True)
                app.kill()
                app.wait(10)
            await nc.close()
            server.stop()

    def median(results: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in results)

    def pooled_p99(results: list[dict]) -> float:
        """The p99 over every record of every run: steadier than any one run's."""
        return percentile(sum((r["hist"] for r in results), Counter()), 0.99)

    print()
    print(f"over {args.repeats} alternated runs of (2) and (3):")
    print(f"per-client rate, {args.clients} clients vs 1:                 {median(many, 'per_client') / one['per_client']:.2f}x")
    print(f"p99 latency, {args.clients} clients vs 1:                     {pooled_p99(many) / one['p99']:.2f}x"
          f"   ({pooled_p99(many) * 1000:.1f} ms vs {one['p99'] * 1000:.1f} ms)")
    ratios = [s["p99"] / m["p99"] for m, s in zip(many, stalled, strict=True)]
    ratio = statistics.median(ratios)
    ok = ratio <= TARGET
    print(f"p99 latency, with a stalled client vs without, pooled: {pooled_p99(stalled) / pooled_p99(many):.2f}x"
          f"   ({pooled_p99(stalled) * 1000:.1f} ms vs {pooled_p99(many) * 1000:.1f} ms)")
    print("    run by run:                                    " + ", ".join(f"{r:.2f}x" for r in ratios))
    print(f"    median of {len(ratios)} interleaved runs:                {ratio:.2f}x   spread {min(ratios):.2f}x .. {max(ratios):.2f}x")
    print(f"per-client rate, with a stalled client vs without:  {median(stalled, 'per_client') / median(many, 'per_client'):.2f}x")
    print(f"target: p99 with a stalled client <= {TARGET}x without (median of the runs): {'PASS' if ok else 'FAIL'}"
          + ("   (--control: no stalled client, noise alone)" if args.control else ""))
    return 0 if ok else 1

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        asyncio.run(client_main(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(asyncio.run(main()))
