"""Idle CPU of 20 waiting tasks (gateway + agent + snapshotter; target <= 2 % of one core in total), same run.

    .venv/bin/python bench/bench_idle.py [--tasks 20] [--window 30] [--delay 120] [--threads]

`dockyard dev --max-running <tasks>` as a user starts it (tests/dev_process.py: its own process, the
embedded nats-server, the model gateway, the warm template, Squid and the socat bridge, bubblewrap),
with DOCKYARD_SCRIPTS_DIR set to a scripted model whose first turn waits `--delay` seconds
(`delay_seconds`): every agent sits in its first model call, as an agent waits on a slow model.
(1) Baseline: dev with no task, `--window` seconds, right before the tasks are submitted.
(2) `--tasks` tasks submitted at once; each is waiting once its trace says so (the `phase`
    `strategic` event, published right before the first model call) and its agent's main thread is in
    the call (blocked in `clock_nanosleep`, /proc/<pid>/syscall) and its snapshotter listens on NATS (its log
    says `listening on`); then `--window` seconds measured, in `--parts` parts (steady or not).
CPU time is utime+stime from /proc/<pid>/stat summed over each kind's process tree (a process's
descendants count with it; a child that ends in the window counts through its parent's cutime):
the agents (forked from the warm template), the snapshotters, the gateway; and for scale, separately,
the dev process itself, nats-server, the warm template and the egress (Squid, socat). Printed: CPU %
of one core per kind in both windows, the total (gateway + agents + snapshotters), per task, the
target; and where it goes: per kind and thread, CPU and wake-ups per second (voluntary + involuntary
context switches, /proc/<pid>/task/<tid>/status), with the syscall the thread sleeps in. CPU time
is what the processes used, whatever else the machine does; the load average is printed. Then the
tasks are cancelled and dev stopped with Ctrl-C (SIGINT). Exit 1 when the total is over 2 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import contract  # noqa: E402
from functions.cli import client  # noqa: E402
from tests.dev_process import DevServer  # noqa: E402

TARGET_PERCENT = 2.0
TICK = os.sysconf("SC_CLK_TCK")
MEASURED = ("gateway", "agent", "snapshotter")
SCALE = ("dev", "nats-server", "template", "egress")
WAIT_SECONDS = 90.0  # for all tasks to be in their model call
SYSCALLS = {"0": "read", "7": "poll", "23": "select", "35": "nanosleep", "202": "futex", "230": "clock_nanosleep",
            "232": "epoll_wait", "281": "epoll_pwait", "271": "ppoll", "61": "wait4", "247": "waitid", "441": "epoll_pwait2"}


# --- /proc ---------------------------------------------------------------------------


def _stat(path: str) -> list[str] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from the state on: [0] state, [1] ppid, [11] utime


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes(root: int) -> dict[int, dict]:
    """Every process under `root` (itself included): ppid, start time, cpu (ticks), children's cpu, kind."""
    table: dict[int, dict] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (f := _stat(f"/proc/{entry}/stat")):
            table[int(entry)] = {"ppid": int(f[1]), "start": int(f[19]), "cpu": int(f[11]) + int(f[12]), "ccpu": int(f[13]) + int(f[14])}
    tree: dict[int, dict] = {}

    def kind_of(pid: int) -> str | None:
        if pid == root:
            return "dev"
        parent = table.get(pid, {}).get("ppid")
        if parent is None or parent <= 1:
            return None
        if pid in tree:
            return tree[pid]["kind"]
        above = kind_of(parent)
        if above is None:
            return None
        if above == "dev":  # a child of dev: what it runs says its kind
            argv = _comm(pid)
            return next((k for k, words in KINDS if any(w in argv for w in words)), "dev-other")
        return "agent" if above == "template" else above  # the template's children are the forked agents

    for pid in table:
        if (kind := kind_of(pid)) is not None:
            tree[pid] = {**table[pid], "kind": kind}
    return tree


KINDS = (("nats-server", ("nats-server",)), ("gateway", ("-m gateway",)), ("snapshotter", ("agent snapshotter",)),
         ("template", ("agent template",)), ("egress", ("squid", "socat")))


def threads(pid: int) -> dict[int, dict]:
    """A process's threads: cpu (ticks), context switches, the syscall it sleeps in."""
    out: dict[int, dict] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        f = _stat(f"{base}/stat")
        if f is None:
            continue
        switches = 0
        try:
            for line in Path(f"{base}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
            name = Path(f"{base}/comm").read_text().strip()
        except OSError:
            continue
        out[int(tid)] = {"cpu": int(f[11]) + int(f[12]), "switches": switches, "name": name, "syscall": syscall(f"{base}/syscall")}
    return out


def syscall(path: str) -> str:
    try:
        number = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return "?"
    return SYSCALLS.get(number, number)


# --- a window ------------------------------------------------------------------------


def snapshot(root: int) -> tuple[dict[int, dict], dict[int, dict[int, dict]]]:
    tree = processes(root)
    return tree, threads_of(tree)


def window(root: int, seconds: float, parts: int) -> dict:
    """CPU ticks per kind over `seconds` (and in each of `parts` equal parts: steady or not), processes that
    came and went, and the per-thread breakdown."""
    first, first_threads = snapshot(root)
    marks = [first]
    for _ in range(parts):
        time.sleep(seconds / parts)  # the measured window itself: nothing of ours runs in it
        marks.append(processes(root))
    last, last_threads = marks[-1], threads_of(marks[-1])
    counts = defaultdict(int)
    for p in last.values():
        counts[p["kind"]] += 1
    return {"seconds": seconds, "ticks": used(first, last), "parts": [used(a, b) for a, b in zip(marks, marks[1:], strict=False)],
            "counts": dict(counts), "gone": sum(1 for pid, p in first.items() if last.get(pid, {}).get("start") != p["start"]),
            "born": sum(1 for pid, p in last.items() if first.get(pid, {}).get("start") != p["start"]),
            "threads": thread_rows(last, first_threads, last_threads)}


def threads_of(tree: dict[int, dict]) -> dict[int, dict[int, dict]]:
    return {pid: threads(pid) for pid in tree}


def used(before: dict[int, dict], after: dict[int, dict]) -> dict[str, int]:
    """CPU ticks per kind between two readings: a process alive at both counts its difference and its reaped
    children's; one born in between all it used."""
    ticks: dict[str, int] = defaultdict(int)
    for pid, p in after.items():
        old = before.get(pid)
        same = old is not None and old["start"] == p["start"]
        ticks[p["kind"]] += p["cpu"] - old["cpu"] + p["ccpu"] - old["ccpu"] if same else p["cpu"]
    return dict(ticks)


def thread_rows(after: dict, before_threads: dict, after_threads: dict) -> dict[tuple, dict]:
    """Per (kind, thread place): CPU ticks and wake-ups summed over the kind's processes. A thread's place
    is its rank in its process (0 = the main thread) with its name and the syscall it sleeps in."""
    rows: dict[tuple, dict] = defaultdict(lambda: {"cpu": 0, "switches": 0, "n": 0})
    for pid, p in after.items():
        old = before_threads.get(pid, {})
        for rank, (tid, t) in enumerate(sorted(after_threads.get(pid, {}).items())):
            o = old.get(tid)
            if o is None:
                continue
            row = rows[(p["kind"], rank, t["name"], t["syscall"])]
            row["cpu"] += t["cpu"] - o["cpu"]
            row["switches"] += t["switches"] - o["switches"]
            row["n"] += 1
    return dict(rows)


def percent(w: dict, kinds, ticks: dict | None = None, seconds: float | None = None) -> float:
    return sum((w["ticks"] if ticks is None else ticks).get(k, 0) for k in kinds) / TICK / (seconds or w["seconds"]) * 100


def template_ready(root: int) -> bool:
    """The warm template has imported what it preloads and waits for launch requests (`poll`)."""
    return any(p["kind"] == "template" and syscall(f"/proc/{pid}/task/{pid}/syscall") == "poll" for pid, p in processes(root).items())


# --- the tasks -----------------------------------------------------------------------


SCRIPT = """\
- content: "Waiting on the model."
  delay_seconds: {delay}
  tool_calls:
    - name: finish
      args: {{summary: waited}}
"""


def in_model_call(dev: DevServer, task_id: str) -> bool:
    """The task's agent (its process group, from supervisor.json) has its main thread asleep in the call."""
    try:
        pgid = dev.supervisor_state(task_id)["pgids"]["agent"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return syscall(f"/proc/{pgid}/task/{pgid}/syscall") == "clock_nanosleep"  # the forked agent leads its group


def snapshotter_listening(dev: DevServer, task_id: str) -> bool:
    """The task's snapshotter is connected to NATS and subscribed (its log says so): its start is over."""
    try:
        return "listening on" in (dev.data_dir / "tasks" / task_id / "logs" / "snapshotter.log").read_text()
    except OSError:
        return False


def all_waiting(dev: DevServer, ids: list[str], strategic: set[str]) -> bool:
    return strategic >= set(ids) and all(in_model_call(dev, t) and snapshotter_listening(dev, t) for t in ids)


async def submit_and_wait(dev: DevServer, ids: list[str]) -> float:
    """Submit the tasks at once; seconds until every agent waits in its model call (trace + /proc) and every
    snapshotter listens (its log)."""
    import nats

    strategic: set[str] = set()

    async def on_event(msg) -> None:
        event = json.loads(msg.data)
        if event.get("type") == contract.EV_PHASE and event.get("phase") == contract.PHASE_STRATEGIC:
            strategic.add(event.get("task_id"))

    nc = await nats.connect(dev.nats_url, **dev.nats_connect_options)
    await nc.subscribe("events.agent.>", cb=on_event)
    await nc.flush()
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(None, submit, dev, t) for t in ids))
    try:
        while not all_waiting(dev, ids, strategic):
            if time.monotonic() - start > WAIT_SECONDS:
                missing = sorted(set(ids) - strategic)
                raise RuntimeError(f"not all tasks waiting on the model within {WAIT_SECONDS:.0f} s; no strategic phase yet: {missing}")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return time.monotonic() - start


def submit(dev: DevServer, task_id: str) -> None:
    client.submit_task(dev.url, {"prompt": "wait on the model", "model": "scripted:wait", "task_id": task_id}, dev.token)


def cancel(dev: DevServer, ids: list[str]) -> None:
    for task_id in ids:
        client.post_event(dev.url, contract.EVENT_TASK_COMMAND, {"task_id": task_id, "op": "cancel"}, dev.token)


# --- the report ----------------------------------------------------------------------


def show(base: dict, busy: dict, tasks: int) -> float:
    print(f"CPU % of one core over {busy['seconds']:.0f} s ({busy['counts'].get('agent', 0)} agent, {busy['counts'].get('snapshotter', 0)} snapshotter"
          f" processes; {busy['born']} started, {busy['gone']} ended in the window) vs dev idle with no task ({base['seconds']:.0f} s):")
    for kind in (*MEASURED, *SCALE, "dev-other"):
        if kind in busy["ticks"] or kind in base["ticks"]:
            print(f"  {kind:<12} {percent(busy, [kind]):6.2f} %   (no task: {percent(base, [kind]):5.2f} %)"
                  f"{'' if kind in MEASURED else '   for scale, not in the total'}")
    total, idle = percent(busy, MEASURED), percent(base, MEASURED)
    print(f"  total (gateway + agents + snapshotters): {total:.2f} % of one core (no task: {idle:.2f} %; added {total - idle:+.2f} %),"
          f" per task {total / tasks:.3f} %   target <= {TARGET_PERCENT:.1f} % in total: {'met' if total <= TARGET_PERCENT else 'MISSED'}")
    step = busy["seconds"] / len(busy["parts"])
    print(f"  the total in each {step:.0f} s of the window (steady?): "
          + ", ".join(f"{percent(busy, MEASURED, part, step):.2f} %" for part in busy["parts"])
          + "; no task: " + ", ".join(f"{percent(base, MEASURED, part, step):.2f} %" for part in base["parts"]))
    all_kinds = percent(busy, [*MEASURED, *SCALE, "dev-other"])
    print(f"  everything dev started, dev itself included: {all_kinds:.2f} % (no task: {percent(base, [*MEASURED, *SCALE, 'dev-other']):.2f} %)")
    return total


def show_threads(w: dict, top: int) -> None:
    """Where it goes: the busiest (kind, thread) rows, CPU and wake-ups per second (each summed over the kind's processes)."""
    rows = sorted(w["threads"].items(), key=lambda kv: (kv[1]["cpu"], kv[1]["switches"]), reverse=True)[:top]
    print(f"where it goes, per kind and thread (rank in its process, 0 = main; summed over the kind's processes; {w['seconds']:.0f} s):")
    for (kind, rank, name, call), r in rows:
        print(f"  {kind:<12} thread {rank:<2} {name:<16} in {call:<16} x{r['n']:<3} CPU {r['cpu'] / TICK / w['seconds'] * 100:6.2f} %"
              f"  wake-ups {r['switches'] / w['seconds']:7.1f}/s ({r['switches'] / w['seconds'] / max(r['n'], 1):5.2f}/s each)")
    for kind in MEASURED:  # what the threads alive at both ends do not explain: threads that ended or began in the window
        rest = w["ticks"].get(kind, 0) - sum(r["cpu"] for key, r in w["threads"].items() if key[0] == kind)
        if rest:
            print(f"  {kind:<12} threads that ended or began in the window: CPU {rest / TICK / w['seconds'] * 100:6.2f} %")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def run(args, tmp: Path) -> float:
    scripts = tmp / "scripts"
    scripts.mkdir()
    (scripts / "wait.yaml").write_text(SCRIPT.format(delay=args.delay))
    ids = [f"idle-{i:02d}" for i in range(args.tasks)]
    dev = DevServer(tmp / "data", env={"DOCKYARD_SCRIPTS_DIR": str(scripts)}, args=("--max-running", str(args.tasks))).start()
    try:
        began = time.monotonic()
        while not template_ready(dev.proc.pid):  # dev's own start-up (the template's imports) out of the baseline
            if time.monotonic() - began > WAIT_SECONDS:
                raise RuntimeError("the warm template is not waiting for launch requests")
            time.sleep(0.2)
        print(f"the warm template ready {time.monotonic() - began:.1f} s after dev answered", flush=True)
        time.sleep(args.settle)  # the last of dev's start-up (its first NATS round trips)
        print(f"load average {load()} before the baseline", flush=True)
        base = window(dev.proc.pid, args.window, args.parts)
        waited = await submit_and_wait(dev, ids)
        print(f"{args.tasks} tasks submitted; all waiting on their model after {waited:.1f} s; load average {load()}", flush=True)
        busy = window(dev.proc.pid, args.window, args.parts)
        print(f"load average {load()} after the window", flush=True)
        total = show(base, busy, args.tasks)
        show_threads(busy, args.top)
        if args.threads:
            show_threads(base, args.top)
        cancel(dev, ids)
    finally:
        began = time.monotonic()
        code = dev.stop()
        print(f"tasks cancelled; dev stopped with Ctrl-C in {time.monotonic() - began:.1f} s (exit {code})")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured, with the tasks and without (default 30)")
    parser.add_argument("--delay", type=float, default=120.0, help="the scripted model's wait, seconds (default 120)")
    parser.add_argument("--parts", type=int, default=3, help="the window's parts, each printed: steady or not (default 3)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after the template is ready before the baseline (default 1)")
    parser.add_argument("--top", type=int, default=14, help="rows of the per-thread breakdown (default 14)")
    parser.add_argument("--threads", action="store_true", help="also the breakdown of the baseline window")
    args = parser.parse_args()
    print(f"bench_idle: {args.tasks} tasks waiting on a scripted model ({args.delay:.0f} s), dockyard dev --max-running {args.tasks},"
          f" windows of {args.window:.0f} s; cores {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        total = asyncio.run(run(args, Path(tmp)))
    return 1 if total > TARGET_PERCENT else 0


if __name__ == "__main__":
    sys.exit(main())
