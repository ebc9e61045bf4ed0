"""Reading what the agent published: every message of the JetStream stream AGENT, in stream order."""

from __future__ import annotations

import asyncio
import json

import nats
import nats.errors
from nats.js.api import DeliverPolicy

from agent import contract
from tests.conftest import nats_options


def read_stream(url: str, expected: int | None = None, quiet: float = 0.5, **connect) -> list[tuple[str, dict, dict]]:
    """(subject, body, headers) of every message, until `expected` were read or none came for `quiet` s.
    `connect` goes to `nats.connect` (credentials)."""

    async def main():
        nc = await nats.connect(url, **(connect or nats_options(url)))
        try:
            sub = await nc.jetstream().subscribe(
                ">", stream=contract.STREAM_NAME, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
            out = []
            while expected is None or len(out) < expected:
                try:
                    msg = await sub.next_msg(timeout=quiet)
                except nats.errors.TimeoutError:
                    break
                out.append((msg.subject, json.loads(msg.data), dict(msg.headers or {})))
            return out
        finally:
            await nc.close()

    return asyncio.run(main())
