"""Benchmark of the agent's log/event telemetry against a real nats-server.

Run: .venv/bin/python bench/bench_logs.py [--seconds 3] [--rate 50000] [--skip-core]

(a) cost on the calling thread per log record: `logger.info(...)` through the
    Telemetry handler vs through a plain logging.FileHandler, same run, same
    records. Reported as wall time and as CPU time of the calling thread (the
    wall time includes waiting for the GIL while the publisher thread works).
    Target: the handler adds <= 20 us per record.
(b) sustained rate: `--rate` records/s for `--seconds` through the handler with
    NATS up, then close(); records emitted vs records found in stream AGENT.
    Target: zero lost.
(c) baseline for the choice of publishing method: a burst of plain core
    `nc.publish` calls into the stream's subjects, records sent vs stored.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import nats  # noqa: E402

from agent import contract  # noqa: E402
from agent.telemetry import Telemetry  # noqa: E402
from tests.conftest import NatsServer  # noqa: E402

MSG = "tool %s finished in %.3fs with exit code %d; wrote %d bytes to %s"
ARGS = ("execute", 0.234, 0, 1832, "/workspace/repo/src/module.py")


def stream_count(url: str, subject: str | None = None) -> int:
    async def main():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            if subject is None:
                return (await js.stream_info(contract.STREAM_NAME)).state.messages
            info = await js.stream_info(contract.STREAM_NAME, subjects_filter=subject)
            return (info.state.subjects or {}).get(subject, 0)
        finally:
            await nc.close()

    return asyncio.run(main())


def new_logger(name: str, handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def time_burst(log: logging.Logger, n: int) -> tuple[float, float]:
    """(wall seconds, calling-thread CPU seconds) for n records."""
    info = log.info
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        info(MSG, *ARGS)
    return time.perf_counter() - w0, time.thread_time() - c0


def bench_caller_cost(url: str, tmp: Path, rounds: int, per_round: int) -> None:
    tel = Telemetry("bench-caller", url).start()
    deadline = time.monotonic() + 5
    while not tel.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    file_handler = logging.FileHandler(tmp / "bench.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    file_log = new_logger("bench.file", file_handler)
    nats_log = new_logger("bench.nats", tel.log_handler())
    null_log = new_logger("bench.null", logging.NullHandler())

    totals = {"null": [0.0, 0.0], "file": [0.0, 0.0], "nats": [0.0, 0.0]}
    for _ in range(rounds):  # alternate, so all see the same machine state
        for name, log in (("null", null_log), ("file", file_log), ("nats", nats_log)):
            wall, cpu = time_burst(log, per_round)
            totals[name][0] += wall
            totals[name][1] += cpu
            if name == "nats":  # let the publisher drain before the next round
                while tel.stats()["queued"] or tel.stats()["inflight"]:
                    time.sleep(0.005)
    tel.close()
    file_handler.close()

    n = rounds * per_round
    zw, zc = (v / n * 1e6 for v in totals["null"])
    fw, fc = (v / n * 1e6 for v in totals["file"])
    nw, nc_ = (v / n * 1e6 for v in totals["nats"])
    print(f"(a) per record on the calling thread, {n} records each, logger.info() with one handler")
    print(f"    NullHandler (logging) : wall {zw:6.2f} us   cpu {zc:6.2f} us   (stdlib logging's own cost)")
    print(f"    FileHandler (baseline): wall {fw:6.2f} us   cpu {fc:6.2f} us")
    print(f"    Telemetry handler     : wall {nw:6.2f} us   cpu {nc_:6.2f} us")
    print(f"    handler adds          : wall {nw - fw:+6.2f} us   cpu {nc_ - fc:+6.2f} us   "
          f"ratio wall {nw / fw:.2f}x cpu {nc_ / fc:.2f}x   target <= +20 us: "
          f"{'PASS' if nw - fw <= 20 else 'FAIL'} (wall)")
    print(f"    Telemetry handler alone (minus NullHandler run): wall {nw - zw:+6.2f} us   cpu {nc_ - zc:+6.2f} us")
    print(f"    published {tel.published}, dropped {tel.dropped}")


def bench_sustained(url: str, rate: int, seconds: float) -> bool:
    task = "bench-rate"
    tel = Telemetry(task, url).start()
    deadline = time.monotonic() + 5
    while not tel.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    log = new_logger("bench.rate", tel.log_handler())
    info = log.info
    total = int(rate * seconds)
    emitted = 0
    max_queued = 0
    t0 = time.perf_counter()
    while emitted < total:
        due = min(total, int((time.perf_counter() - t0) * rate) + 1)
        if due <= emitted:
            time.sleep(0.0005)
            continue
        while emitted < due:
            info(MSG, *ARGS)
            emitted += 1
        max_queued = max(max_queued, len(tel._q))
    produce = time.perf_counter() - t0
    behind = tel.stats()["queued"] + tel.stats()["inflight"]
    c0 = time.perf_counter()
    tel.close(timeout=60)
    drain = time.perf_counter() - c0
    stored = stream_count(url, contract.subject_logs(task))
    lost = emitted - stored
    print(f"(b) sustained: {emitted} records in {produce:.2f}s = {emitted / produce:,.0f} records/s offered "
          f"(target rate {rate:,}/s)")
    print(f"    publisher: {tel.published / (produce + drain):,.0f} records/s average; queue max {max_queued}, "
          f"{behind} still queued/in flight when producing stopped, drained in {drain:.2f}s by close()")
    print(f"    emitted {emitted}, acked {tel.published}, in stream {stored}, dropped (buffer full) {tel.dropped}, "
          f"stdout {tel.written_stdout}, resent {tel.resent}")
    print(f"    lost {lost} ({lost / emitted:.3%})   target 0 lost: {'PASS' if lost == 0 else 'FAIL'}")
    return lost == 0


def bench_core_publish(url: str, n: int) -> None:
    async def main():
        nc = await nats.connect(url)
        try:
            subject = contract.subject_logs("bench-core")
            payload = (b'{"ts":"2024-01-01T00:00:00.000Z","level":"INFO","logger":"bench","msg":"'
                       + (MSG % ARGS).encode() + b'","task_id":"bench-core"}')
            t0 = time.perf_counter()
            for _ in range(n):
                await nc.publish(subject, payload)
            await nc.flush(timeout=30)
            return time.perf_counter() - t0
        finally:
            await nc.close()

    elapsed = asyncio.run(main())
    time.sleep(1.0)
    stored = stream_count(url, contract.subject_logs("bench-core"))
    print(f"(c) core nc.publish burst (no acks): {n} sent in {elapsed:.2f}s = {n / elapsed:,.0f}/s, "
          f"in stream {stored}, lost {n - stored} ({(n - stored) / n:.1%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10_000)
    parser.add_argument("--core", type=int, default=1_000_000, help="records in the core publish burst")
    parser.add_argument("--skip-core", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server = NatsServer(tmp_path / "nats").start()
        try:
            print(f"nats-server {server.url}, python {sys.version.split()[0]}")
            bench_caller_cost(server.url, tmp_path, args.rounds, args.per_round)
            ok = bench_sustained(server.url, args.rate, args.seconds)
            if not args.skip_core:
                bench_core_publish(server.url, args.core)
        finally:
            server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
