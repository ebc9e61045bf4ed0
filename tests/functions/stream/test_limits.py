"""The per-address cap: 429 with Retry-After beyond it, a slot freed when a stream ends, listings uncounted."""

from __future__ import annotations

import httpx
import pytest

from functions.stream import limits
from functions.stream.limits import AddressCap, TooManyStreams
from tests.conftest import eventually_async
from tests.functions.stream.support import AUTH, OpenStream, log_record, publish

pytestmark = pytest.mark.timeout(90)


def test_the_cap_counts_each_stream_once_and_releases_it_once():
    cap = AddressCap(2)
    first, second = cap.admit("10.0.0.1"), cap.admit("10.0.0.1")
    cap.admit("10.0.0.2")  # another address has its own count
    with pytest.raises(TooManyStreams) as caught:
        cap.admit("10.0.0.1")
    assert (caught.value.status, caught.value.field, caught.value.retry_after) == (429, "client", limits.RETRY_AFTER_SECONDS)
    first()
    first()  # a second release of the same stream frees nothing more
    assert cap.open["10.0.0.1"] == 1
    cap.admit("10.0.0.1")
    second()
    assert AddressCap(0).admit("10.0.0.1") and all(AddressCap(0).admit("x") for _ in range(100))  # 0: no cap


async def test_streams_per_address_are_capped_with_429_and_retry_after(bus, serve):
    server = await serve(stream_max_per_ip=2)
    task = "t-cap"
    await publish(bus.js, task, log_record(task, "hi"))
    url = f"{server.url}/api/stream/{task}"
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
        held = [await OpenStream(client, url).first_message() for _ in range(2)]
        refused = await client.get(url)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(limits.RETRY_AFTER_SECONDS)
        assert refused.json()["field"] == "client" and "127.0.0.1" in refused.json()["error"]
        assert (await client.get(f"{server.url}/api/tasks")).status_code == 200  # listings are not streams
        await held[0].close()  # one closes: once the server noticed, a new one is let in
        await eventually_async(lambda: server.app.cap.open["127.0.0.1"] == 1, "the closed stream's slot is free")
        again = await OpenStream(client, url).first_message()
        await again.close()
        await held[1].close()
