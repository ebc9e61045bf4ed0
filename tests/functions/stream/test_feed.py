"""The shared feed of a task and its consumers, against a real nats-server, through the app over HTTP.

One consumer per followed task, shared by its clients and deleted when the
last one leaves; clients behind a feed that forgets fast still get
everything once; a NATS restart neither loses nor repeats a message, and
does not replay the task's history into the feed.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agent import contract
from functions.cli.sse_client import SSEMessage
from functions.stream import consumers, feed
from tests.conftest import eventually_async
from tests.functions.stream.support import (
    AUTH,
    OpenStream,
    collect_into,
    consumer_count,
    ev,
    finished,
    log_record,
    publish,
    publish_when_back,
)

pytestmark = pytest.mark.timeout(90)


async def test_consumers_are_shared_per_task_and_released_after_disconnect(bus, serve, monkeypatch):
    # Only the app's own deletes may bring the count back: the server's reaping is far off,
    # and a release waits for NATS as long as the loaded machine needs.
    monkeypatch.setattr(consumers, "CONSUMER_INACTIVE_SECONDS", 600.0)
    monkeypatch.setattr(consumers, "RELEASE_SECONDS", 20.0)
    server = await serve()
    task = "t-release"
    for i in range(5):
        await publish(bus.js, task, log_record(task, f"history {i}"))
    before = await consumer_count(bus.js)

    async def consumers_are(n: int) -> bool:
        return await consumer_count(bus.js) == n

    url = f"{server.url}/api/stream/{task}"
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as one, httpx.AsyncClient(headers=AUTH, timeout=30) as two:
        streams = [await OpenStream(one, url).first_message(), await OpenStream(two, url).first_message()]
        # Both caught up from history on consumers of their own, released since, and now share one.
        await eventually_async(lambda: server.feed(task) is not None and server.feed(task).waiting == 2, "both clients wait on the feed")
        await eventually_async(lambda: consumers_are(before + 1), "one consumer: the feed's")
        assert server.feed(task).clients == 2
        for stream in streams:
            await stream.close()
    await eventually_async(lambda: server.feed(task) is None, "the feed is closed after its last client left")
    await eventually_async(lambda: consumers_are(before), "the feed's consumer is deleted")


async def test_clients_behind_a_small_feed_still_get_everything_once(bus, serve, monkeypatch):
    monkeypatch.setattr(feed, "MAX_FEED_FRAMES", 8)  # the feed forgets fast: late clients catch up on their own
    server = await serve()
    task = "t-fanout"
    url = f"{server.url}/api/stream/{task}"
    seqs = [await publish(bus.js, task, ev(task, contract.EV_STATUS, state=contract.STATE_STARTED))]
    early: list[SSEMessage] = []
    followers = [asyncio.create_task(collect_into(url, early))]
    await eventually_async(lambda: len(early) == 1, "the early client has the first message")
    late_lists: list[list[SSEMessage]] = []
    for i in range(60):
        seqs.append(await publish(bus.js, task, log_record(task, f"record {i}")))
        if i % 15 == 14:  # a new client joins from the start while the feed is ahead, and more is published
            late = []
            late_lists.append(late)
            followers.append(asyncio.create_task(collect_into(url, late)))
            await eventually_async(lambda late=late: len(late) > 0, "the late client is reading")
    seqs.append(await publish(bus.js, task, finished(task)))
    await asyncio.wait_for(asyncio.gather(*followers), 30)
    for received in [early, *late_lists]:
        assert [m.id for m in received] == seqs + [None]


async def test_follower_gets_everything_once_across_a_nats_restart(bus, serve, nats_server, monkeypatch):
    monkeypatch.setattr(consumers, "CONSUMER_IDLE_HEARTBEAT_SECONDS", 0.5)  # notice the lost consumer quickly
    server = await serve(heartbeat_seconds=0.5)
    task = "t-nats-restart"
    seqs = [await publish(bus.js, task, log_record(task, f"before {i}")) for i in range(5)]
    received: list[SSEMessage] = []
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received, read_timeout=5, max_retries=None))
    await eventually_async(lambda: len(received) == 5, "the follower has the history")

    await asyncio.to_thread(nats_server.restart)
    for i in range(5):
        seqs.append(await publish_when_back(bus.js, task, log_record(task, f"after {i}")))
    seqs.append(await publish_when_back(bus.js, task, finished(task)))

    await asyncio.wait_for(follower, 60)
    assert [m.id for m in received] == seqs + [None]


async def test_a_nats_restart_does_not_replay_the_task_into_its_feed(bus, serve, nats_server, monkeypatch):
    """The feed's consumer starts at the task's newest message, so nats-py recreates it after that one, not at 1."""
    monkeypatch.setattr(consumers, "CONSUMER_IDLE_HEARTBEAT_SECONDS", 0.5)
    server = await serve()
    task = "t-no-replay"
    history = [await publish(bus.js, task, log_record(task, f"history {i}")) for i in range(20)]
    await publish(bus.js, "t-other", log_record("t-other", "after the task's newest"))
    received: list[SSEMessage] = []
    # One response throughout (no heartbeat due, no read timeout): no second feed, no catch-up consumer.
    follower = asyncio.create_task(collect_into(f"{server.url}/api/stream/{task}", received))
    await eventually_async(lambda: len(received) == 20 and server.feed(task) and server.feed(task).waiting == 1, "the follower waits on the feed")

    await asyncio.to_thread(nats_server.restart)  # before any message reached the feed
    infos = await eventually_async(lambda: _consumers_after_restart(bus.js), "the feed's consumer is recreated")
    assert [i.config.opt_start_seq for i in infos] == [history[-1] + 1]

    last = await publish_when_back(bus.js, task, finished(task))
    await asyncio.wait_for(follower, 60)
    assert [m.id for m in received] == history + [last, None]


async def _consumers_after_restart(js):
    try:
        infos = await js.consumers_info(contract.STREAM_NAME)
    except Exception:  # NATS not back yet
        return None
    return infos or None
