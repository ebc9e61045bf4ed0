"""The agent's NATS through the pod's `nats-leaf` sidecar: real nats-servers, the hub in operator mode, the leaf
started with the factory's own command and configuration, the agent's Telemetry connected to it WITHOUT
credentials (as the agent container runs: it mounts none)."""

from __future__ import annotations

import asyncio

import pytest

from agent import contract
from agent.telemetry import Telemetry
from functions.core.bus import Bus
from functions.errors import NoReply
from tests.agent.agent_stream import read_stream
from tests.conftest import NatsServer, eventually
from tests.nats_leaf import NatsLeaf

TASK = "t-leaf"


@pytest.fixture
def leaf(hub, tmp_path):
    node = NatsLeaf(hub, TASK, tmp_path).start()
    yield node
    node.stop()


def answer(request: dict) -> dict:
    return {"ok": True, "echo": request.get("text")}


async def command(hub: NatsServer, body: dict, **kw) -> dict:
    """A command as the functions send it (`functions.handlers.task_command`), as the functions' user on the hub."""
    bus = await Bus.open(hub.url, creds=hub.creds("functions"))
    try:
        return await bus.request(contract.subject_cmd(TASK), body, timeout=kw.pop("timeout", 10), **kw)
    finally:
        await bus.close()


def test_events_land_acked_in_the_hub_stream_and_commands_are_answered_through_the_leaf(hub, leaf):
    leaf.wait_connected()
    tel = Telemetry(TASK, leaf.url).start()  # no auth: the leaf holds the agent's user
    try:
        tel.on_command(answer)
        for i in range(5):
            tel.event(contract.EV_PHASE, phase=f"p{i}")
        eventually(lambda: tel.published == 5, "the hub's stream to acknowledge the 5 events", detail=lambda: str(tel.stats()))

        trace = read_stream(hub.url, expected=5, **hub.connect_options)
        assert [(s, b["phase"]) for s, b, _ in trace] == [(contract.subject_events(TASK), f"p{i}") for i in range(5)]

        # A command from the hub side (the functions' user) reaches the agent and its answer comes back.
        reply = asyncio.run(command(hub, {"op": "message", "text": "hello"}, reply_prefix=contract.command_reply_prefix(TASK)))
        assert reply == {"ok": True, "echo": "hello"}
        assert tel.stats()["failed"] == 0 and tel.dropped == 0
    finally:
        tel.close()


def test_a_reply_to_the_requesters_own_inbox_does_not_cross_the_leaf(hub, leaf):
    """Why commands name a reply subject under the task's inbox: a leaf forwards only what its user may publish,
    and a response permission does not cross it (nats-io/nats-server#2949)."""
    leaf.wait_connected()
    tel = Telemetry(TASK, leaf.url).start()
    try:
        tel.on_command(answer)
        eventually(lambda: asyncio.run(_answered(hub)), "the agent to answer on the task's reply prefix")
        with pytest.raises(NoReply):
            asyncio.run(command(hub, {"op": "message", "text": "x"}, timeout=2))
    finally:
        tel.close()


async def _answered(hub: NatsServer) -> bool:
    try:
        return (await command(hub, {"op": "message", "text": "x"}, timeout=2,
                              reply_prefix=contract.command_reply_prefix(TASK))).get("ok") is True
    except NoReply:
        return False


def test_events_published_before_the_leaf_reaches_the_hub_are_kept_and_land_in_order(hub, tmp_path):
    """The startupProbe gates the agent on a connected leaf; should the leaf lose the hub anyway, the agent's
    telemetry keeps its records (503: no stream interest yet) and sends them once the hub is there."""
    node = NatsLeaf(hub, TASK, tmp_path)  # its user minted and the stream created while the hub runs
    hub.stop()
    node.start()
    try:
        assert not node.probe()  # the hub is down: the sidecar is not started, the agent would wait
        tel = Telemetry(TASK, node.url).start()
        try:
            for i in range(3):
                tel.event(contract.EV_PHASE, phase=f"early{i}")
            eventually(lambda: tel.connected, "the telemetry connected to the leaf")
            assert tel.published == 0
            hub.start()
            node.wait_connected()
            tel.event(contract.EV_PHASE, phase="late")
            eventually(lambda: tel.published == 4, "all four events acknowledged", detail=lambda: str(tel.stats()))
        finally:
            tel.close()
        trace = read_stream(hub.url, expected=4, **hub.connect_options)
        assert [b["phase"] for _, b, _ in trace] == ["early0", "early1", "early2", "late"]
    finally:
        node.stop()
