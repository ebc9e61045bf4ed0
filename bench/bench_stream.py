"""How fast the stream app delivers a task's trace, against nats-py reading the same stream.

    .venv/bin/python bench/bench_stream.py [--records 50000] [--clients 50] [--rate 1000] [--seconds 5] [--app FACTORY]
    .venv/bin/python bench/bench_stream.py --responses [--writes 200000] [--repeats 5]

(a) replay: N log records already in the stream, read by one SSE client through
    the stream app versus one raw nats-py ordered consumer: records/s and ratio
    (target >= 0.7x).
(b) fan-out: C SSE clients follow one task while R records/s are published for
    S seconds: delivered records/s in total and the publish-to-client latency
    (the publish time is embedded in each record; target p99 <= 50 ms).
(c) the response alone (`--responses`, no server, no network): the CPU time
    per write of functions.stream.sse.EventStream, of starlette's
    StreamingResponse and, if installed, of sse-starlette's
    EventSourceResponse carrying the same framed chunks, against a bare loop
    of ASGI sends (the baseline), alternated and repeated: CPU time of this
    one process, so other load on the machine barely moves it.

nats-server (authenticated as deployed, operator mode) and the stream app (`python -m functions.stream`
as the `stream` user, or uvicorn on the app factory `--app`, its own process) start on free ports;
the publisher and the raw consumer connect as `admin`;
the clients and the publisher run in this process. In (a) the SSE path spreads
its work over two processes (app and client) where the raw consumer has one,
so on two or more cores it can beat the baseline. The app is warmed up first
(it imports nats-py on first use). Prints figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import nats  # noqa: E402
from bench_fanout import BENCH_AUTH, start_app  # noqa: E402  (this folder is on sys.path when run as a script)
from nats.js.api import ConsumerConfig, DeliverPolicy  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from agent import contract  # noqa: E402
from functions.core.bus import ensure_stream  # noqa: E402
from functions.devstack import nats_auth  # noqa: E402
from functions.devstack.nats_embedded import EmbeddedNats  # noqa: E402


def cpu_seconds(pid: int | None = None) -> float:
    """User+system CPU time of a process (this one by default), from /proc on Linux."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def publish_logs(nc, js, task_id: str, n: int) -> int:
    """Publish n log records without waiting for acks; returns the last stream sequence."""
    subject = contract.subject_logs(task_id)
    for i in range(n):
        record = {"ts": time.time(), "level": "INFO", "logger": "bench", "msg": f"record {i} " + "x" * 80, "task_id": task_id}
        await nc.publish(subject, json.dumps(record).encode())
        if i % 5000 == 4999:
            await nc.flush()
    await nc.flush()
    while True:  # wait until the stream has stored them all
        try:
            last = await js.get_last_msg(contract.STREAM_NAME, subject)
            if json.loads(last.data)["msg"].startswith(f"record {n - 1} "):
                return last.seq
        except NotFoundError:
            pass
        await asyncio.sleep(0.05)


async def raw_replay(js, task_id: str, n: int) -> float:
    config = ConsumerConfig(
        filter_subjects=[contract.subject_events(task_id), contract.subject_logs(task_id)],
        deliver_policy=DeliverPolicy.ALL,
    )
    start = time.perf_counter()
    sub = await js.subscribe(contract.subject_events(task_id), stream=contract.STREAM_NAME, config=config, ordered_consumer=True)
    for _ in range(n):
        msg = await sub.next_msg(timeout=10)
        json.loads(msg.data)
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return elapsed


async def sse_replay(base: str, task_id: str, n: int) -> float:
    from functions.cli.sse_client import follow

    start = time.perf_counter()
    count = 0
    async for _message in follow(f"{base}/api/stream/{task_id}", headers=BENCH_AUTH):
        count += 1
        if count == n:
            break
    return time.perf_counter() - start


async def warm_up(js, base: str) -> None:
    """One short stream first: the app imports nats-py on first use."""
    finished = {"type": contract.EV_STATUS, "task_id": "bench-warmup", "state": contract.STATE_FINISHED}
    await js.publish(contract.subject_events("bench-warmup"), json.dumps(finished).encode())
    async with httpx.AsyncClient(timeout=30, headers=BENCH_AUTH) as client:
        await client.get(f"{base}/api/stream/bench-warmup")


async def bench_replay(nc, js, base: str, n: int) -> None:
    task_id = "bench-replay"
    await publish_logs(nc, js, task_id, n)
    await warm_up(js, base)
    raw = await raw_replay(js, task_id, n)
    sse = await sse_replay(base, task_id, n)
    print(f"(a) replay of {n} records to one client")
    print(f"    raw nats-py ordered consumer: {n / raw:10.0f} records/s")
    print(f"    SSE through the stream app:   {n / sse:10.0f} records/s")
    print(f"    ratio SSE / raw:              {raw / sse:10.2f}x   (target >= 0.7x)")


async def follower(base: str, task_id: str, after: int, latencies: list[float], ready: asyncio.Event, counts: list[int], index: int):
    from functions.cli.sse_client import follow

    async for message in follow(f"{base}/api/stream/{task_id}", after=after, read_timeout=30, headers=BENCH_AUTH):
        received = time.time()
        if message.event == "end":
            return
        if message.event != "log":
            continue
        if message.data.get("msg") == "warmup":
            ready.set()
            counts[index] = -1
            continue
        latencies.append(received - message.data["ts"])
        counts[index] += 1


async def bench_fanout(nc, js, base: str, clients: int, rate: int, seconds: float, app_pid: int, nats_pid: int) -> None:
    task_id = "bench-fanout"
    subject = contract.subject_logs(task_id)
    after = (await js.publish(subject, b'{"msg":"before"}')).seq
    latencies: list[float] = []
    counts = [0] * clients
    readies = [asyncio.Event() for _ in range(clients)]
    tasks = [
        asyncio.create_task(follower(base, task_id, after, latencies, readies[i], counts, i)) for i in range(clients)
    ]
    await js.publish(subject, json.dumps({"msg": "warmup", "ts": time.time()}).encode())
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
    counts[:] = [0] * clients

    cpu_before = {name: cpu_seconds(pid) for name, pid in (("app", app_pid), ("nats-server", nats_pid), ("clients", None))}
    total = int(rate * seconds)
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = {"ts": time.time(), "level": "INFO", "logger": "bench", "msg": f"live {i}", "task_id": task_id}
        await nc.publish(subject, json.dumps(record).encode())
    finished = {"type": contract.EV_STATUS, "task_id": task_id, "ts": time.time(), "state": contract.STATE_FINISHED, "outcome": "done"}
    await js.publish(contract.subject_events(task_id), json.dumps(finished).encode())
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    elapsed = time.perf_counter() - start
    cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in (("app", app_pid), ("nats-server", nats_pid), ("clients", None))}

    delivered = sum(counts)
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    print(f"(b) {clients} SSE clients on one task, {rate} records/s published for {seconds:g}s")
    print(f"    delivered: {delivered} of {total * clients} records, {delivered / elapsed:.0f} records/s in total")
    print(f"    latency publish -> client: p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms (target p99 <= 50 ms)")
    print(f"    mean {statistics.fmean(latencies) * 1000:.1f} ms")
    print("    CPU used (cores): " + ", ".join(f"{name} {share:.2f}" for name, share in cpu.items()) + f" of {os.cpu_count()}")


FRAME = b'id: 123456\nevent: log\ndata: {"ts": 1.0, "level": "INFO", "logger": "bench", "msg": "' + b"x" * 80 + b'"}\n\n'


async def frames(n: int):
    for _ in range(n):
        yield FRAME


async def no_send(message) -> None:
    pass


async def never_disconnects():
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


def responses() -> dict:
    """The responses to compare: name -> a coroutine function running one over `n` frames."""
    from functions.stream.sse import EventStream

    scope = {"type": "http", "method": "GET", "headers": [], "path": "/", "query_string": b""}

    async def bare(n: int) -> None:  # the least any ASGI streaming response does per write
        await no_send({"type": "http.response.start", "status": 200, "headers": EventStream.headers})
        async for chunk in frames(n):
            await no_send({"type": "http.response.body", "body": chunk, "more_body": True})
        await no_send({"type": "http.response.body", "body": b"", "more_body": False})

    async def own(n: int) -> None:
        await EventStream(frames(n), heartbeat=15, send_timeout=30, max_seconds=540, closing=asyncio.Event())(scope, never_disconnects, no_send)

    async def streaming(n: int) -> None:  # starlette's plain streaming response: no heartbeat, no timeouts
        from starlette.responses import StreamingResponse

        await StreamingResponse(frames(n), media_type="text/event-stream")(scope, never_disconnects, no_send)

    found = {"bare ASGI sends (baseline)": bare, "starlette StreamingResponse": streaming, "EventStream (own)": own}
    try:
        from sse_starlette.sse import EventSourceResponse
    except ImportError:
        print("    sse-starlette is not installed: uv pip install --python .venv/bin/python sse-starlette==3.7.0")
        return found

    async def sse_starlette(n: int) -> None:
        await EventSourceResponse(frames(n), ping=15, send_timeout=30)(scope, never_disconnects, no_send)

    found["sse-starlette EventSourceResponse"] = sse_starlette
    return found


async def bench_responses(writes: int, repeats: int) -> None:
    candidates = responses()
    spent: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):  # alternated: drift hits all alike
        for name, run in candidates.items():
            start = time.process_time()
            await run(writes)
            spent[name].append((time.process_time() - start) / writes)
    base = statistics.median(spent["bare ASGI sends (baseline)"])
    print(f"(c) one response writing {writes} frames of {len(FRAME)} bytes, one frame per write; median of {repeats} runs")
    for name, costs in spent.items():
        cost = statistics.median(costs)
        print(f"    {name:36s} {cost * 1e6:6.2f} us CPU per write   {cost / base:5.2f}x the baseline")
    if "sse-starlette EventSourceResponse" in spent:
        ratio = statistics.median(spent["sse-starlette EventSourceResponse"]) / statistics.median(spent["EventStream (own)"])
        print(f"    sse-starlette / EventStream: {ratio:.2f}x CPU per write")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--app", help="an app factory for uvicorn --factory instead of `python -m functions.stream`")
    parser.add_argument("--responses", action="store_true", help="only (c): the response classes alone, in this process")
    parser.add_argument("--writes", type=int, default=200_000, help="(c): frames per response")
    parser.add_argument("--repeats", type=int, default=5, help="(c): runs of each response, alternated")
    args = parser.parse_args()
    if args.responses:
        await bench_responses(args.writes, args.repeats)
        return

    with tempfile.TemporaryDirectory() as tmp:
        auth = nats_auth.ensure(Path(tmp) / "auth")
        with EmbeddedNats(Path(tmp), config=auth.server_conf) as server:
            await run_server_benches(args, server, auth, Path(tmp))


async def run_server_benches(args, server, auth, tmp: Path) -> None:
    nc = await nats.connect(server.url, user_credentials=str(auth.creds("admin")))
    js = nc.jetstream()
    await ensure_stream(js)
    app, base = start_app(server.url, str(auth.creds("stream")), tmp / "app", factory=args.app)  # as deployed unless --app
    try:
        await bench_replay(nc, js, base, args.records)
        await bench_fanout(nc, js, base, args.clients, args.rate, args.seconds, app.pid, server.proc.pid)
    finally:
        app.terminate()
        app.wait(10)
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
