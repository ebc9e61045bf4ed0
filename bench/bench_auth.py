"""What per-task NATS credentials cost the agent (issue 9, part B).

Run: .venv/bin/python bench/bench_auth.py [--records 50000] [--rounds 2]

Baselines measured in the same run, on two embedded nats-servers side by side:
(a) the agent's telemetry (`agent.telemetry.Telemetry`: encode, redact, publish,
    ack) publishing `--records` events into stream AGENT: with the task's own
    JWT user (operator mode, per-subject permissions) vs an unauthenticated
    server (the baseline). Printed as records/s and the ratio.
(b) one connect + close, as the agent's reconnects do it: task user vs none (ms).
"""
import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nats  # noqa: E402
from agent import contract  # noqa: E402
from agent.telemetry import NatsAuth, Telemetry  # noqa: E402
from functions.core.bus import ensure_stream  # noqa: E402
from functions.core.nats_jwt import write_secret_file  # noqa: E402
from functions.devstack import nats_auth  # noqa: E402
from functions.devstack.nats_embedded import EmbeddedNats  # noqa: E402

N = 50_000


def run(url, auth, task):
    tel = Telemetry(task, url, auth=auth).start()
    t0 = time.perf_counter()
    for i in range(N):
        tel.event(contract.EV_TOOL, step=i)
    tel.close()
    dt = time.perf_counter() - t0
    assert tel.published == N, tel.stats()
    return N / dt



async def mkstream(url, **kw):
    nc = await nats.connect(url, **kw)
    await ensure_stream(nc.jetstream())
    await nc.close()


def connect_time(url, auth, task, n=30):
    async def main():
        t0 = time.perf_counter()
        for _ in range(n):
            nc = await nats.connect(url, inbox_prefix=contract.inbox_prefix(task), **auth.connect_options())
            await nc.close()
        return (time.perf_counter() - t0) / n * 1000
    return asyncio.run(main())



def main() -> None:
    global N
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=N)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    N = args.records
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chain = nats_auth.ensure(tmp / "auth")
        with EmbeddedNats(tmp / "open") as open_srv, EmbeddedNats(tmp / "closed", config=chain.server_conf) as auth_srv:
            asyncio.run(mkstream(open_srv.url))
            asyncio.run(mkstream(auth_srv.url, user_credentials=str(chain.creds("functions"))))
            for rnd in range(args.rounds):
                task = f"bench-{rnd}"
                creds = write_secret_file(tmp / f"{task}.creds", chain.issuer().task_creds(task, "agent"))
                base = run(open_srv.url, NatsAuth(), task)
                scoped = run(auth_srv.url, NatsAuth.load(str(creds)), task)
                c0 = connect_time(open_srv.url, NatsAuth(), task)
                c1 = connect_time(auth_srv.url, NatsAuth.load(str(creds)), task)
                print(f"round {rnd}: (a) publish {scoped:,.0f}/s with the task's user vs {base:,.0f}/s unauthenticated: "
                      f"{scoped / base:.2f}x; (b) connect {c1:.2f} ms vs {c0:.2f} ms")


if __name__ == "__main__":
    main()
