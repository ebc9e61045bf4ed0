"""Issue 10, part 3: the agent container mounts no secret; its NATS goes through the pod's `nats-leaf` sidecar.

Before, the agent container mounted its task's `agent.creds`: any command the agent ran could read the JWT and
seed and use them from anywhere until they expired. Now only the leaf sidecar mounts them, and a command in the
pod reaches NATS only as a client of the leaf (no auth on loopback). What crosses the leaf connection the hub
checks against the task's agent user. Replayed here with real nats-servers (the hub in operator mode, the leaf
started with the factory's own command and configuration) and on the rendered Job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.errors
import pytest

from agent import contract
from functions.core import factory
from functions.core.nats_jwt import decode_claims
from functions.core.settings import Settings
from functions.core.task import parse_task
from tests.conftest import NatsServer, eventually_async
from tests.nats_leaf import NATS_SETTINGS, NatsLeaf

ATTACKER, VICTIM = "t-attacker", "t-victim"
FORGED = b"forged-through-the-leaf"


@pytest.fixture
def leaf(hub, tmp_path):
    node = NatsLeaf(hub, ATTACKER, tmp_path).start()
    node.wait_connected()
    yield node
    node.stop()


async def _through_the_leaf(hub: NatsServer, leaf: NatsLeaf) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """A command in the attacker's pod, on the leaf without credentials, tries the victim's subjects while the
    hub's admin watches everything. Returns (what the hub saw, what the attacker received)."""
    watcher = await hub.connect()
    seen: list[tuple[str, bytes]] = []

    async def watch(msg):
        seen.append((msg.subject, msg.data))

    await watcher.subscribe(">", cb=watch)
    await watcher.flush()
    attacker = await nats.connect(leaf.url, allow_reconnect=False)
    received: list[tuple[str, bytes]] = []

    async def got(msg):
        received.append((msg.subject, msg.data))

    try:
        for subject in (contract.subject_cmd(VICTIM), contract.subject_events("*"), contract.subject_cmd("*"),
                        ">", "_INBOX.>", f"{contract.inbox_prefix(VICTIM)}.>"):
            await attacker.subscribe(subject, cb=got)
        await attacker.flush()
        # Forge the victim's trace, command it, answer or ack in its place, call the JetStream API.
        for subject in (contract.subject_events(VICTIM), contract.subject_logs(VICTIM), contract.subject_cmd(VICTIM),
                        f"{contract.inbox_prefix(VICTIM)}.ack", f"{contract.command_reply_prefix(VICTIM)}.x",
                        "_INBOX.functions.reply", f"$JS.API.STREAM.INFO.{contract.STREAM_NAME}",
                        f"$JS.API.STREAM.PURGE.{contract.STREAM_NAME}", f"$KV.{contract.KV_BUCKET}.{VICTIM}"):
            await attacker.publish(subject, FORGED)
        with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
            await attacker.request(f"$JS.API.STREAM.INFO.{contract.STREAM_NAME}", b"", timeout=1)
        # The control: its own task's subject does cross (so the watch would have seen the rest).
        await attacker.publish(contract.subject_events(ATTACKER), b"own")
        await attacker.flush()
        await eventually_async(lambda: (contract.subject_events(ATTACKER), b"own") in seen, "the hub to see the attacker's own event")
        # The hub side commands and feeds the victim: nothing of it may reach the attacker's pod.
        for subject in (contract.subject_cmd(VICTIM), contract.subject_events(VICTIM), f"{contract.inbox_prefix(VICTIM)}.x"):
            await watcher.publish(subject, b"for the victim only")
        await watcher.publish(contract.subject_cmd(ATTACKER), b"for the attacker")  # the control: its own commands do
        await watcher.flush()
        await eventually_async(lambda: (contract.subject_cmd(ATTACKER), b"for the attacker") in received,
                               "the attacker's own command to reach its pod")
        await attacker.flush()
        await watcher.flush()
        return list(seen), list(received)
    finally:
        await attacker.close()
        await watcher.close()


def test_a_command_on_the_leaf_cannot_forge_command_or_read_another_task(hub, leaf):
    seen, received = asyncio.run(_through_the_leaf(hub, leaf))
    forged = [subject for subject, data in seen if data == FORGED]
    assert forged == [], f"the hub got {forged} from the attacker's leaf"
    # What the pod received from the hub: its own command only (its own forgeries echo inside the leaf: local).
    from_hub = {(s, d) for s, d in received if d.startswith(b"for the ")}
    assert from_hub == {(contract.subject_cmd(ATTACKER), b"for the attacker")}, from_hub


def test_the_leaf_serves_loopback_only_without_jetstream_and_its_user_is_the_tasks_agent(hub, leaf):
    conf = leaf.conf
    assert f'listen: "127.0.0.1:{leaf.port}"' in conf and f'http: "127.0.0.1:{leaf.monitor_port}"' in conf
    assert "jetstream" not in conf.lower() and "authorization" not in conf
    # The leaf's remote is the task's agent user: the hub lists one leaf connection in its account, and the
    # credentials file is the one the launcher minted for the agent role.
    claims = decode_claims(Path(leaf.creds).read_text().split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0])
    assert claims["name"] == f"task-{ATTACKER}-agent"
    assert claims["nats"]["pub"]["allow"] == [contract.subject_events(ATTACKER), contract.subject_logs(ATTACKER),
                                                   f"{contract.command_reply_prefix(ATTACKER)}.>"]


def _job(nats: bool) -> dict:
    task = parse_task({"prompt": "p", "task_id": ATTACKER}, source="test", event_id="e1")
    return factory.render_job(task, Settings(**(NATS_SETTINGS if nats else {})))


@pytest.mark.parametrize("nats", [False, True])
def test_the_agent_container_mounts_no_secret_and_reads_none_from_env(nats):
    """`cat /var/secrets/nats/agent.creds` in the agent's container found the task's NATS user. Now no volume
    backed by a Secret (directly or projected) is mounted into the agent container, and no env var refers to one."""
    spec = _job(nats)["spec"]["template"]["spec"]
    secret_volumes = {v["name"] for v in spec["volumes"]
                      if "secret" in v or any("secret" in s for s in v.get("projected", {}).get("sources", []))}
    assert secret_volumes  # there are secrets in the pod (object store, model, NATS): just not in the agent
    (agent,) = spec["containers"]
    assert agent["name"] == "agent"
    assert [m["name"] for m in agent["volumeMounts"] if m["name"] in secret_volumes] == []
    assert not [m for m in agent["volumeMounts"] if m["mountPath"].startswith(contract.SECRETS_DIR)]
    assert "envFrom" not in agent and all("valueFrom" not in e for e in agent["env"])
    assert "--nats-creds" not in agent["args"] and "--nats-nkey" not in agent["args"]
    if nats:
        assert agent["args"][agent["args"].index("--nats") + 1] == factory.NATS_LEAF_URL == "nats://127.0.0.1:4222"
        holders = [c["name"] for c in spec["initContainers"] + spec["containers"]
                   if any(m["name"] == "nats-agent" for m in c["volumeMounts"])]
        assert holders == [factory.CONTAINER_NATS_LEAF]
