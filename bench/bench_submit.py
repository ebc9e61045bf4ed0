"""What task_submitted adds to a launch: the function's handling time versus the runtime's launch alone.

    .venv/bin/python bench/bench_submit.py [--tasks 500]

The function's side includes validation, the registry create (one JetStream
KV write, acked) and the `queued` event (one JetStream publish, acked) on a
real nats-server started here. Target: <= 1.2x of launch alone.

Two runtimes, each measured alone and under the function in the same run:
- kubernetes: the real KubernetesRuntime creating Job + PVC over HTTP against
  the API emulator of the tests (the launch the cluster does; a real API
  server is slower still, which only improves the ratio);
- in-memory: a dict, so the ratio is all NATS overhead; printed for the
  absolute cost per submit.
Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudevents.http import CloudEvent  # noqa: E402

from agent import contract  # noqa: E402
from functions.handlers import task_submitted  # noqa: E402
from functions.core.bus import Bus  # noqa: E402
from functions.main import Context  # noqa: E402
from functions.devstack.nats_embedded import EmbeddedNats  # noqa: E402
from functions.core.settings import Settings  # noqa: E402
from functions.core.task import parse_task  # noqa: E402


class InMemoryRuntime:
    """The cheapest runtime that keeps the Runtime contract: a dict of spec hashes."""

    def __init__(self):
        self.specs: dict[str, str] = {}

    async def launch(self, task) -> bool:
        if task.task_id in self.specs:
            return False
        self.specs[task.task_id] = task.spec_hash
        return True

    async def cancel(self, task_id):
        raise NotImplementedError

    async def finished_job(self, task_id):
        return None


def event(i: int, run: str) -> CloudEvent:
    return CloudEvent(
        {"type": contract.EVENT_TASK_SUBMITTED, "source": "bench", "id": f"{run}-{i}"},
        {"prompt": f"task number {i}: make the tests pass", "limits": {"deadline_seconds": 600}},
    )


async def timed(coros) -> list[float]:
    times = []
    for make in coros:
        start = time.perf_counter()
        await make()
        times.append(time.perf_counter() - start)
    return times


async def measure(bus, settings, make_runtime, tasks: int, run: str) -> tuple[list[float], list[float]]:
    """Launch alone and task_submitted over a runtime of the same kind, interleaved task by task,
    so a runtime that slows as it fills (the emulator does) weighs on both sides alike."""
    baseline_runtime = await make_runtime()
    ctx = Context(settings, bus, await make_runtime())
    launch, handle = [], []
    for i in range(tasks):
        e = event(i, f"{run}-base")
        task = parse_task(e.get_data(), source=e["source"], event_id=e["id"])
        launch += await timed([lambda task=task: baseline_runtime.launch(task)])
        handle += await timed([lambda i=i: task_submitted.handle(event(i, f"{run}-fn"), ctx)])
    return launch, handle


async def kubernetes_figures(bus, settings, tasks: int) -> tuple[list[float], list[float]]:
    sys.path.insert(0, str(ROOT / "tests" / "functions"))
    from conftest_kube import api_client_for
    from kmock import Server
    from kube_emulator import KubeEmulator

    from functions.runtime.kubernetes import KubernetesRuntime

    async with KubeEmulator() as emulator, Server(emulator):
        api = api_client_for(str(emulator.url))

        async def make():
            return KubernetesRuntime(Settings(), api)

        await measure(bus, settings, make, 20, "kwarm")
        return await measure(bus, settings, make, tasks, "k8s")


async def main(tasks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        settings = Settings(nats_url=server.url, data_dir=Path(tmp) / "data")
        bus = await Bus.open(settings.nats_url)
        try:
            # Warm up both paths (imports, JetStream stream and bucket lookups).
            warm = Context(settings, bus, InMemoryRuntime())
            for i in range(20):
                await task_submitted.handle(event(i, "warm"), warm)

            baseline_runtime = InMemoryRuntime()
            parsed = [parse_task(e.get_data(), source=e["source"], event_id=e["id"]) for e in (event(i, "base") for i in range(tasks))]
            launch = await timed([lambda t=t: baseline_runtime.launch(t) for t in parsed])

            ctx = Context(settings, bus, InMemoryRuntime())
            handle = await timed([lambda i=i: task_submitted.handle(event(i, "fn"), ctx) for i in range(tasks)])

            redelivered = await timed([lambda i=i: task_submitted.handle(event(i, "fn"), ctx) for i in range(min(tasks, 200))])
            k8s_launch, k8s_handle = await kubernetes_figures(bus, settings, min(tasks, 300))
        finally:
            await bus.close()

    def ms(values):
        return statistics.median(values) * 1000

    overhead = ms(handle) - ms(launch)
    print(f"kubernetes runtime (Job + PVC over HTTP, API emulator), {min(tasks, 300)} tasks:")
    print(f"  runtime.launch alone      median {ms(k8s_launch):8.3f} ms")
    print(f"  task_submitted.handle     median {ms(k8s_handle):8.3f} ms")
    print(f"  ratio handle / launch     {ms(k8s_handle) / ms(k8s_launch):8.2f}x   (target <= 1.2x)")
    print(f"in-memory runtime, {tasks} tasks (sequential, one process, nats-server on localhost):")
    print(f"runtime.launch alone        median {ms(launch):8.4f} ms   mean {statistics.mean(launch) * 1000:8.4f} ms")
    print(f"task_submitted.handle       median {ms(handle):8.4f} ms   mean {statistics.mean(handle) * 1000:8.4f} ms")
    print(f"  redelivery (same events) median {ms(redelivered):8.4f} ms")
    print(f"ratio handle / launch       {ms(handle) / ms(launch):8.1f}x   (all NATS overhead; no real launch)")
    print(f"overhead per submit         {overhead:8.3f} ms  (registry create + queued event: two acked NATS round trips)")
    print(f"launch time for <= 1.2x     {overhead / 0.2:8.2f} ms  (a real launch must take at least this for the target to hold)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    asyncio.run(main(parser.parse_args().tasks))
