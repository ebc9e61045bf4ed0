"""Finding 3 of issue 9, replayed: any agent could command, forge and read every other agent over NATS.

Now NATS demands credentials (operator mode, `functions.devstack.nats_auth`), and the launcher
mints each task two users of its own (agent, snapshotter) that may publish only on the task's
`events.agent.<id>` and `logs.agent.<id>`, subscribe only to its `cmd.agent.<id>` and its reply
inbox, and answer the requests they receive (`functions.core.nats_jwt.task_permissions`).

The stack is `dockyard dev` over HTTP with real agents and its embedded nats-server. Two tasks
run a scripted model that waits inside `execute` until the test releases it: the victim, and the
attacker. The attacks use what the attacker's own commands can read: its credentials file (the
path its agent was given) or nothing at all. Each asserts the server refused, and that the victim
ran on, undisturbed, to its own end.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
import yaml

from agent import contract
from functions.cli import client
from functions.core.nats_jwt import decode_claims
from tests.conftest import eventually
from tests.dev_process import DevServer
from tests.agent.agent_stream import read_stream

FORGED = "forged-by-the-attacker"
# Waits inside `execute` until `<task folder>/home/release` exists (the task's home, which its sandbox shows).
GATED = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["wait"], "objective": "wait for the test"}}]},
    {"tool_calls": [{"name": "execute", "args": {
        "command": "echo started > started.flag; while [ ! -e ~/release ]; do sleep 0.1; done; echo released"}}]},
    {"content": "released"},
    {"tool_calls": [{"name": "finish", "args": {"summary": "ran to its own end"}}]},
]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts")
    (scripts / "gated.yaml").write_text(yaml.safe_dump(GATED))
    server = DevServer(tmp_path_factory.mktemp("dev-bus"), env={"DOCKYARD_SCRIPTS_DIR": str(scripts)}).start()
    yield server
    server.stop()


def submit_gated(dev: DevServer, task_id: str) -> Path:
    """Submit a gated task and wait until it waits inside `execute`; returns its folder."""
    client.submit_task(dev.url, {"prompt": "wait", "model": "scripted:gated", "task_id": task_id}, dev.token)
    folder = dev.data_dir / "tasks" / task_id
    eventually(lambda: (folder / "workspace" / "started.flag").exists(), f"task {task_id} to wait in execute", detail=dev.output)
    return folder


def record(dev: DevServer, task_id: str) -> dict:
    return httpx.get(f"{dev.url}/api/tasks/{task_id}", headers=dev.headers, timeout=10).json()


def release_and_finish(dev: DevServer, folder: Path) -> dict:
    (folder / "home" / "release").touch()
    return eventually(lambda: (r := record(dev, folder.name)).get("finished_uids") and r,
                      f"job_finished to record task {folder.name}'s end", detail=dev.output)


class Attacker:
    """A NATS client as the attacker's commands could open one; `refusals` collects what the server said."""

    def __init__(self, url: str, **connect):
        self.url, self.connect_options, self.refusals = url, connect, []

    async def __aenter__(self):
        async def on_error(exc: Exception) -> None:
            self.refusals.append(str(exc))

        self.nc = await nats.connect(self.url, error_cb=on_error, allow_reconnect=False, **self.connect_options)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    def refused(self, kind: str, subject: str) -> bool:
        said = f'permissions violation for {kind} to "{subject}"'.lower()  # nats-py lower-cases the server's -ERR
        return any(said in r.lower() for r in self.refusals)

    async def settle(self) -> None:
        await self.nc.flush(timeout=5)  # the server's -ERR lines for everything sent so far are in


def status_forgery(task_id: str) -> bytes:
    return json.dumps({"type": contract.EV_STATUS, "task_id": task_id, "ts": contract.iso_utc(), "state": contract.STATE_FINISHED,
                       "outcome": contract.OUTCOME_DONE, FORGED: True}).encode()


async def attack_the_victim(url: str, creds: Path, victim: str) -> Attacker:
    """Everything finding 3 did, with the attacker task's own credentials."""
    async with Attacker(url, user_credentials=str(creds)) as a:
        try:
            await a.nc.request(contract.subject_cmd(victim), b'{"op": "cancel"}', timeout=1)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            pass  # refused: no answer
        await a.nc.publish(contract.subject_cmd(victim), json.dumps({"op": "message", "text": FORGED}).encode())
        await a.nc.publish(contract.subject_events(victim), status_forgery(victim))
        await a.nc.publish(contract.subject_logs(victim), json.dumps({"msg": FORGED}).encode())
        for subject in ("events.agent.>", contract.subject_events(victim), contract.subject_cmd(victim), ">"):
            await a.nc.subscribe(subject)
        js = a.nc.jetstream(timeout=1)
        for read in (lambda: js.stream_info(contract.STREAM_NAME), lambda: js.key_value(contract.KV_BUCKET),
                     lambda: js.subscribe(contract.subject_events(victim), stream=contract.STREAM_NAME)):
            with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
                await read()
        await a.settle()
        return a


def test_without_credentials_nats_refuses_the_connection(dev):
    async def connect():
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(dev.nats_url, allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet)

    asyncio.run(connect())


@pytest.mark.parametrize("role", ["agent", "snapshotter"])
def test_another_task_can_neither_command_forge_nor_read_the_victim(dev, role):
    victim, attacker = f"victim-{role}", f"attacker-{role}"
    victim_folder, attacker_folder = submit_gated(dev, victim), submit_gated(dev, attacker)
    creds = attacker_folder / "secrets" / f"nats-{role}.creds"

    a = asyncio.run(attack_the_victim(dev.nats_url, creds, victim))

    cmd, events = contract.subject_cmd(victim), contract.subject_events(victim)
    assert a.refused("publish", cmd) and a.refused("publish", events) and a.refused("publish", contract.subject_logs(victim))
    for subject in ("events.agent.>", events, cmd, ">"):
        assert a.refused("subscription", subject), (subject, a.refusals)
    assert a.refused("publish", f"$JS.API.STREAM.INFO.{contract.STREAM_NAME}"), a.refusals
    assert a.refused("publish", f"$JS.API.STREAM.INFO.KV_{contract.KV_BUCKET}")

    # The victim was not cancelled, got no message, and its record and trace say nothing of the attack.
    assert record(dev, victim)["state"] != contract.STATE_FINISHED
    final = release_and_finish(dev, victim_folder)
    assert final["outcome"] == contract.OUTCOME_DONE and final["summary"] == "ran to its own end"
    trace = read_stream(dev.nats_url, **dev.nats_connect_options)
    mine = [body for subject, body, _ in trace if subject.endswith(f".{victim}")]
    assert mine and not any(FORGED in json.dumps(body) for body in mine)
    finished = [b for b in mine if b.get("type") == contract.EV_STATUS and b.get("state") == contract.STATE_FINISHED]
    assert finished and {b["outcome"] for b in finished} == {contract.OUTCOME_DONE}  # the agent's, then the platform's
    release_and_finish(dev, attacker_folder)


def test_a_task_forges_nothing_but_its_own_trace(dev):
    """On its own subject a task may say anything; the tracker and the stream take it as that task's word only."""
    victim_folder, attacker_folder = submit_gated(dev, "victim-own"), submit_gated(dev, "attacker-own")
    creds = attacker_folder / "secrets" / "nats-agent.creds"

    async def forge_on_own_subject():
        async with Attacker(dev.nats_url, user_credentials=str(creds), inbox_prefix=contract.inbox_prefix("attacker-own")) as a:
            ack = await a.nc.request(contract.subject_events("attacker-own"), status_forgery("victim-own"), timeout=5)
            return json.loads(ack.data)

    ack = asyncio.run(forge_on_own_subject())
    assert ack.get("stream") == contract.STREAM_NAME  # its own subject: stored

    # The tracker took it as the attacker's own end (the subject names the task), never the victim's.
    attacker_record = eventually(lambda: (r := record(dev, "attacker-own")).get("state") == contract.STATE_FINISHED and r,
                                 "the attacker's own record to take its own word")
    assert attacker_record["task_id"] == "attacker-own"
    assert record(dev, "victim-own")["state"] != contract.STATE_FINISHED
    assert release_and_finish(dev, victim_folder)["summary"] == "ran to its own end"
    (attacker_folder / "home" / "release").touch()


def test_each_process_of_a_task_has_its_own_narrow_user_in_a_private_file(dev):
    folder = submit_gated(dev, "narrow")
    secrets = folder / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    users = {}
    for role in ("agent", "snapshotter"):
        path = secrets / f"nats-{role}.creds"
        assert path.stat().st_mode & 0o777 == 0o600
        claims = decode_claims(path.read_text().split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0])
        users[role] = claims["sub"]
        nats_claims = claims["nats"]
        assert nats_claims["pub"]["allow"] == [contract.subject_events("narrow"), contract.subject_logs("narrow"),
                                               f"{contract.command_reply_prefix('narrow')}.>"]  # answers to its own commands
        assert nats_claims["sub"]["allow"] == [contract.subject_cmd("narrow"), f"{contract.inbox_prefix('narrow')}.>"]
        assert claims["exp"] > claims["iat"]
    assert users["agent"] != users["snapshotter"]
    # Not inside the workspace, which the snapshotter uploads to the object store.
    assert not list((folder / "workspace").rglob("*.creds"))
    release_and_finish(dev, folder)


async def _quiet(exc: Exception) -> None:
    pass
