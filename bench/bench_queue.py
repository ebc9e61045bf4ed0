"""Fair queueing of the local runtime: 20 tasks submitted at once, queued (N = cores) vs unqueued, same run.

    .venv/bin/python bench/bench_queue.py [--tasks 20] [--repeats 2] [--max-running N]

`dockyard dev` as a user starts it (tests/dev_process.py: its own process, the
embedded nats-server, real agents `python -m agent` with the scripted example
model `scripted:example`, the bytecode `scripts/setup` compiled). Per repetition:
(0) one task alone, under the queued server: what one task costs (its processes'
    peak RSS) and how soon its first tool call comes when nothing competes;
(1) `--tasks` tasks POSTed at once (one thread each, over connections opened
    beforehand) to `dockyard dev --max-running N` (N: the cores unless given),
    then `--probes` more one by one while the batch is queued (submit latency
    with a full queue);
(2) the same to `dockyard dev --max-running 1000`: every task starts at once, the
    behaviour before admission control.
Measured: first tool call after submit (the `tool` event on NATS) of the first
submitted task and the earliest of any (the submits race: the earliest is "the
first task" of the target); the makespan (first submit to the last task
finished in its `supervisor.json`, the probes included on both sides); the
submit answer's latency p50/p99/max (at once, and one by one); the peak RSS of
the task processes (every descendant of dev except nats-server and dev itself)
and of the whole tree, sampled every 50 ms from /proc. One task's RSS is the
largest peak of one task's own processes (those whose working directory is in
its folder), alone and in the queued batch. `--also 4,6` runs the queued batch
with more N too: the trade-off of makespan against memory. Targets (issue 13)
are printed beside the figures; the ratios are against (2) and (0) of the same
repetition.
Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import contract  # noqa: E402
from tests.dev_process import DevServer  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MODEL = "scripted:example"
PROMPT = json.loads((ROOT / "agent" / "examples" / "example_task.json").read_text())["prompt"]
TARGET_FIRST_TOOL = 2.0
TARGET_MAKESPAN = 1.1
TARGET_SUBMIT_P99_MS = 50.0


# --- the process tree's memory ---------------------------------------------------------


def _tree(root: int) -> list[tuple[int, str, int]]:
    """(pid, name or the task its working directory is in, rss bytes) of `root` and every descendant."""
    parents, names = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)], names[int(entry)] = int(fields[1]), name
    wanted, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in wanted:
                wanted.add(child)
                frontier.append(child)
    out = []
    for pid in wanted:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                rss = int(fh.read().split()[1]) * PAGE
            cwd = Path(os.readlink(f"/proc/{pid}/cwd")).parts
            name = cwd[cwd.index("tasks") + 1] if "tasks" in cwd[:-1] else names.get(pid, "?")  # a task's processes run in its workspace
            out.append((pid, name, rss))
        except OSError:
            continue
    return out


class RssSampler:
    """Peak RSS of dev's task processes and of its whole tree, sampled in a thread."""

    def __init__(self, root: int, interval: float = 0.05):
        self.root, self.interval = root, interval
        self.peak_tasks = self.peak_all = 0
        self.per_task: dict[str, int] = {}  # each task's own peak: its processes' RSS summed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = _tree(self.root)
            tasks = sum(rss for pid, name, rss in tree if pid != self.root and "nats-server" not in name)
            self.peak_tasks = max(self.peak_tasks, tasks)
            self.peak_all = max(self.peak_all, sum(rss for _, _, rss in tree))
            now: dict[str, int] = {}
            for pid, name, rss in tree:
                if pid != self.root and "nats-server" not in name:
                    now[name] = now.get(name, 0) + rss
            for name, rss in now.items():
                self.per_task[name] = max(self.per_task.get(name, 0), rss)
            self._stop.wait(self.interval)


def submission(task_id: str) -> tuple[dict, bytes]:
    """A task_submitted CloudEvent, structured mode, as `dockyard submit` posts it."""
    from cloudevents.conversion import to_structured
    from cloudevents.http import CloudEvent

    data = {"task_id": task_id, "prompt": PROMPT, "model": MODEL, "limits": {"deadline_seconds": 600, "retries": 1}}
    return to_structured(CloudEvent({"type": contract.EVENT_TASK_SUBMITTED, "source": contract.EVENT_SOURCE_CLI}, data))


# --- one batch ---------------------------------------------------------------------------


async def batch(dev: DevServer, tasks: int, tag: str, probes: int = 0) -> dict:
    """Submit `tasks` tasks at once, then `probes` more one by one (while the others are queued), and wait for
    all to finish; the figures."""
    import nats

    ids = [f"{tag}-{i:02d}" for i in range(tasks)]
    probe_ids = [f"{tag}-p{i:02d}" for i in range(probes)]
    first_tool: dict[str, float] = {}
    queued_events = 0

    async def on_event(msg) -> None:
        nonlocal queued_events
        event = json.loads(msg.data)
        if event.get("type") == contract.EV_TOOL and event.get("task_id") in ids:
            first_tool.setdefault(event["task_id"], time.monotonic())
        if event.get("type") == contract.EV_STATUS and event.get("source") == "runtime" and event.get("state") == contract.STATE_QUEUED:
            queued_events += 1

    nc = await nats.connect(dev.nats_url, **dev.nats_connect_options)
    await nc.subscribe("events.agent.>", cb=on_event)
    await nc.flush()
    submitted: dict[str, float] = {}
    latencies: list[float] = []
    probe_latencies: list[float] = []

    bodies = {t: submission(t) for t in ids + probe_ids}  # built before the clock starts: the client's own work is not the server's

    def submit(task_id: str) -> None:
        headers, body = bodies[task_id]
        began = time.monotonic()
        submitted[task_id] = began
        response = client.post(dev.url + "/", headers={**headers, **dev.headers}, content=body)
        latencies.append(time.monotonic() - began)
        if response.status_code >= 300:
            raise RuntimeError(f"submit {task_id}: HTTP {response.status_code} {response.text[:200]}")


    client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks))
    with ThreadPoolExecutor(max_workers=tasks) as pool:  # open the connections first, as a busy client has them
        list(pool.map(lambda _: client.get(dev.url + "/healthz"), range(tasks)))
    with RssSampler(dev.proc.pid) as rss:
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=tasks) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, submit, t) for t in ids))
        for task_id in probe_ids:  # one at a time, the batch queued behind the first N
            await loop.run_in_executor(None, submit, task_id)
            probe_latencies.append(latencies.pop())
        while not all_finished(dev, ids + probe_ids):
            await asyncio.sleep(0.1)
            if time.monotonic() - start > 600:
                raise RuntimeError(f"{tag}: not all tasks finished within 600 s")
        makespan = time.monotonic() - start
    client.close()
    await asyncio.sleep(0.3)  # the last tool events are long in; the subscription drains
    await nc.close()
    outcomes = {dev.supervisor_state(t)["outcome"] for t in ids + probe_ids}
    firsts = {t: first_tool[t] - submitted[t] for t in ids if t in first_tool}
    return {
        **figures(ids[0], firsts, latencies, probe_latencies),
        "makespan": makespan,
        "peak_tasks": rss.peak_tasks,
        "peak_all": rss.peak_all,
        "task_peak_median": statistics.median(rss.per_task.values()) if rss.per_task else float("nan"),
        "task_peak_max": max(rss.per_task.values(), default=float("nan")),
        "queued_events": queued_events,
        "outcomes": ",".join(sorted(o or "?" for o in outcomes)),
    }


def all_finished(dev: DevServer, ids: list[str]) -> bool:
    try:
        return all(dev.supervisor_state(task_id)["state"] == contract.STATE_FINISHED for task_id in ids)
    except (OSError, ValueError):
        return False


def figures(first_id: str, firsts: dict[str, float], latencies: list[float], probe_latencies: list[float]) -> dict:
    nan = float("nan")
    lat = sorted(latencies)
    probe = sorted(probe_latencies) or [nan]
    return {
        "first_of_first": firsts.get(first_id, nan),
        "first_any": min(firsts.values(), default=nan),
        "first_median": statistics.median(firsts.values()) if firsts else nan,
        "submit_p50": statistics.median(lat) * 1000,
        "submit_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "submit_max": lat[-1] * 1000,
        "probe_p50": statistics.median(probe) * 1000,
        "probe_max": probe[-1] * 1000,
    }


def show(name: str, r: dict) -> None:
    print(f"  {name:<22} first task's first tool call {r['first_of_first']:6.2f} s (earliest {r['first_any']:.2f}, median {r['first_median']:.2f})"
          f" | makespan {r['makespan']:6.2f} s | submit p50 {r['submit_p50']:6.1f} ms p99 {r['submit_p99']:6.1f} ms max {r['submit_max']:6.1f} ms"
          f" | one by one after: p50 {r['probe_p50']:.1f} ms max {r['probe_max']:.1f} ms"
          f" | peak RSS tasks {r['peak_tasks'] / 2**20:6.0f} MiB, all {r['peak_all'] / 2**20:6.0f} MiB"
          f" | queued events {r['queued_events']} | outcomes {r['outcomes']}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--probes", type=int, default=5, help="tasks submitted one by one right after the batch (in both runs)")
    parser.add_argument("--also", default="", help="more N to run queued, comma-separated (the trade-off: makespan against RSS)")
    args = parser.parse_args()
    n = args.max_running
    print(f"bench_queue: {args.tasks} tasks at once, N={n} (cores: {os.cpu_count()}), model {MODEL}, {args.repeats} repetition(s)")
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        for rep in range(1, args.repeats + 1):
            results = {}
            extra = [(f"queued N={m}", m) for m in map(int, filter(None, args.also.split(",")))]
            for label, limit in (("queued", n), ("unqueued", 1000), *extra):
                dev = DevServer(Path(tmp) / f"{label.replace(' ', '-').replace('=', '')}-{rep}", args=("--max-running", str(limit), "--model", MODEL)).start()
                try:
                    if label == "queued":
                        results["alone"] = await batch(dev, 1, f"alone{rep}")
                    results[label] = await batch(dev, args.tasks, f"{label.split()[-1].replace('=', '').lower()}{rep}", args.probes)
                finally:
                    dev.stop()
            alone, queued, unqueued = results["alone"], results["queued"], results["unqueued"]
            print(f"repetition {rep}:")
            show("one task alone", alone)
            show(f"{args.tasks} queued (N={n})", queued)
            show(f"{args.tasks} unqueued", unqueued)
            for label, _ in extra:
                show(f"{args.tasks} {label}", results[label])
            print(f"  first task's first tool call (the earliest of the batch): queued {queued['first_any']:.2f} s vs unqueued {unqueued['first_any']:.2f} s"
                  f" (one task alone {alone['first_any']:.2f} s: the floor)   target <= {TARGET_FIRST_TOOL:.1f} s")
            print(f"  makespan queued / unqueued: {queued['makespan'] / unqueued['makespan']:.2f}x   target <= {TARGET_MAKESPAN:.1f}x")
            print(f"  submit, {args.tasks} at once: p99 {queued['submit_p99']:.1f} ms (unqueued {unqueued['submit_p99']:.1f} ms);"
                  f" one by one with >= {args.tasks - n} queued: max {queued['probe_max']:.1f} ms (unqueued, all running: {unqueued['probe_max']:.1f} ms)"
                  f"   target p99 <= {TARGET_SUBMIT_P99_MS:.0f} ms")
            one = max(alone["peak_tasks"], queued["task_peak_max"])  # one task's peak, sampled alone and in each queued task
            print(f"  peak RSS of the tasks: queued {queued['peak_tasks'] / 2**20:.0f} MiB = {queued['peak_tasks'] / one:.2f}x one task's"
                  f" ({one / 2**20:.0f} MiB: the largest of one task's own peaks, alone {alone['peak_tasks'] / 2**20:.0f} MiB,"
                f" per task in the queued batch median {queued['task_peak_median'] / 2**20:.0f} max {queued['task_peak_max'] / 2**20:.0f} MiB),"
                f" unqueued {unqueued['peak_tasks'] / one:.2f}x   target <= N = {n}x", flush=True)
            for label, m in extra:
                r = results[label]
                print(f"  {label}: makespan {r['makespan'] / unqueued['makespan']:.2f}x unqueued, peak RSS {r['peak_tasks'] / one:.2f}x one task's"
                      f" (N = {m}), submit p99 {r['submit_p99']:.1f} ms, earliest first tool call {r['first_any']:.2f} s", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
