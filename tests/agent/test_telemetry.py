"""Telemetry against a real nats-server: order, outages, commands, redaction, drops."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import nats
import pytest

from agent import contract
from agent.redact import REPLACEMENT, Redactor
from agent.telemetry import Telemetry
from tests.conftest import eventually, free_port, nats_options
from tests.agent.agent_stream import read_stream

TASK = "t-telemetry"
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def request(url: str, subject: str, payload: bytes, timeout: float = 1.0):
    async def main():
        nc = await nats.connect(url, **nats_options(url))
        try:
            return json.loads((await nc.request(subject, payload, timeout=timeout)).data)
        finally:
            await nc.close()

    return asyncio.run(main())


@pytest.fixture
def task_logger():
    log = logging.getLogger(f"dockyard.test.telemetry.{time.monotonic_ns()}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)


def simulate_run(tel: Telemetry, log: logging.Logger, steps: int, start: int = 0) -> list[tuple[str, str]]:
    """Interleaved events and logs; returns the expected (kind, key) sequence."""
    expected = []
    for i in range(start, start + steps):
        tel.event(contract.EV_PHASE, phase=contract.PHASE_TACTICAL, step=i)
        expected.append(("event", f"step-{i}"))
        log.info("tool call %d", i)
        expected.append(("log", f"tool call {i}"))
        if i % 5 == 0:
            log.debug("detail %d", i)
            expected.append(("log", f"detail {i}"))
    return expected


def keys_of(messages) -> list[tuple[str, str]]:
    out = []
    for subject, body, _ in messages:
        if subject == contract.subject_events(TASK):
            out.append(("event", f"step-{body['step']}"))
        else:
            assert subject == contract.subject_logs(TASK)
            out.append(("log", body["msg"]))
    return out


def test_run_arrives_in_order(nats_server, task_logger):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    task_logger.addHandler(tel.log_handler(logging.DEBUG))
    expected = simulate_run(tel, task_logger, 300)
    tel.close()

    messages = read_stream(nats_server.url, len(expected))
    assert keys_of(messages) == expected
    assert tel.published == len(expected) and tel.dropped == 0 and tel.written_stdout == 0

    subject, event, headers = messages[0]
    assert event["type"] == contract.EV_PHASE and event["task_id"] == TASK and TS_RE.match(event["ts"])
    assert event["phase"] == contract.PHASE_TACTICAL
    assert headers.get("Nats-Msg-Id")
    _, record, _ = messages[1]
    assert set(record) == {"ts", "level", "logger", "msg", "task_id"}
    assert record["level"] == "INFO" and record["logger"] == task_logger.name and TS_RE.match(record["ts"])

    async def stream_config():
        nc = await nats_server.connect()
        try:
            return (await nc.jetstream().stream_info(contract.STREAM_NAME)).config
        finally:
            await nc.close()

    config = asyncio.run(stream_config())
    assert sorted(config.subjects) == sorted(contract.STREAM_SUBJECTS)
    assert config.max_age == contract.STREAM_MAX_AGE_SECONDS


def test_exception_is_logged_with_traceback(nats_server, task_logger):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    task_logger.addHandler(tel.log_handler())
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        task_logger.exception("tool failed")
    tel.close()
    [(_, record, _)] = read_stream(nats_server.url, 1)
    assert record["level"] == "ERROR" and record["msg"] == "tool failed"
    assert "RuntimeError: boom" in record["exc"] and "Traceback" in record["exc"]


def test_existing_stream_with_other_config_is_fine(nats_server, task_logger):
    async def create():
        nc = await nats_server.connect()
        try:
            await nc.jetstream().add_stream(name=contract.STREAM_NAME, subjects=list(contract.STREAM_SUBJECTS),
                                            max_age=3600)
        finally:
            await nc.close()

    asyncio.run(create())
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth, stream_max_age_seconds=60).start()
    tel.event(contract.EV_STATUS, state=contract.STATE_STARTED, step=0)
    tel.close()
    assert [b["state"] for _, b, _ in read_stream(nats_server.url, 1)] == [contract.STATE_STARTED]


def test_nats_down_at_start_goes_to_stdout(capsys, task_logger):
    tel = Telemetry(TASK, f"nats://127.0.0.1:{free_port()}").start()
    task_logger.addHandler(tel.log_handler())
    expected = simulate_run(tel, task_logger, 20)
    started = time.monotonic()
    tel.close(timeout=5.0)
    assert time.monotonic() - started < 2.0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    got = [("event", f"step-{b['step']}") if "type" in b else ("log", b["msg"]) for b in lines]
    assert got == [e for e in expected if e[1].startswith(("step", "tool"))]  # handler level INFO: no debug
    assert tel.written_stdout == len(got) and tel.published == 0


def test_no_nats_url_prints_live_and_in_order(capsys):
    tel = Telemetry(TASK, None).start()
    for i in range(50):
        tel.event(contract.EV_TOOL, step=i)
    eventually(lambda: tel.written_stdout == 50, "50 records on stdout")  # printed while running, not only at exit
    tel.close()
    tel.close()  # idempotent
    tel.event(contract.EV_RESULT, step=50)  # after close: still visible
    steps = [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()]
    assert steps == list(range(51))


def test_nats_restarted_mid_run(nats_server, task_logger):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    task_logger.addHandler(tel.log_handler(logging.DEBUG))
    expected = simulate_run(tel, task_logger, 50)
    eventually(lambda: tel.published == len(expected), "the first records acked")

    nats_server.stop()
    eventually(lambda: not tel.connected, "the connection lost")
    # Enqueued during the outage: held (hold_seconds) and delivered after the reconnect.
    expected += simulate_run(tel, task_logger, 50, start=50)
    nats_server.start()
    eventually(lambda: tel.connected, "reconnected")
    expected += simulate_run(tel, task_logger, 50, start=100)
    tel.close(timeout=10)

    messages = read_stream(nats_server.url)
    assert keys_of(messages) == expected  # complete, in order, no duplicates
    assert tel.reconnects >= 1 and tel.written_stdout == 0 and tel.dropped == 0


def test_commands_reply_and_none_means_no_reply(nats_server):
    seen = []

    def handle(request):
        seen.append(request)
        if request.get("op") == "snapshot":
            return None  # the snapshotter answers that one
        if request.get("op") == "explode":
            raise ValueError("nope")
        return {"ok": True, "op": request.get("op"), "token": "ghp_" + "x" * 36}

    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth)
    tel.on_command(handle)  # before start
    tel.start()
    eventually(lambda: tel.connected, "connected")
    subject = contract.subject_cmd(TASK)
    reply = request(nats_server.url, subject, json.dumps({"op": "status"}).encode())
    assert reply == {"ok": True, "op": "status", "token": REPLACEMENT}
    with pytest.raises(nats.errors.TimeoutError):
        request(nats_server.url, subject, json.dumps({"op": "snapshot"}).encode(), timeout=0.3)
    bad = request(nats_server.url, subject, b"{not json")
    assert bad["ok"] is False and "error" in bad
    failed = request(nats_server.url, subject, json.dumps({"op": "explode"}).encode())
    assert failed == {"ok": False, "error": "ValueError: nope"}
    assert [r["op"] for r in seen] == ["status", "snapshot", "explode"]

    # Replaced after start, and still served after a reconnect.
    tel.on_command(lambda request: {"ok": True, "second": True})
    nats_server.restart()
    eventually(lambda: tel.reconnects >= 1 and tel.connected, "reconnected")
    assert request(nats_server.url, subject, b'{"op": "cancel"}') == {"ok": True, "second": True}
    tel.close()


def test_on_command_after_start(nats_server):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    eventually(lambda: tel.connected, "connected")
    tel.on_command(lambda request: {"ok": True, "got": request["op"]})

    def answered():  # the subscription is made on the telemetry thread, soon after
        try:
            return request(nats_server.url, contract.subject_cmd(TASK), b'{"op": "message"}')
        except nats.errors.NoRespondersError:
            return None

    assert eventually(answered, "an answer on the command subject") == {"ok": True, "got": "message"}
    tel.close()


def test_secrets_are_redacted_before_publishing(nats_server, task_logger, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "api-key").write_text("s3cr3t-model-key-value\n")
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth, redactor=Redactor.from_secrets_dir(tmp_path)).start()
    task_logger.addHandler(tel.log_handler())
    token = "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8"
    task_logger.info("calling model with key s3cr3t-model-key-value")
    task_logger.warning("cloning with %s", token)
    tel.event(contract.EV_TOOL, step=0, args={"env": ["TOKEN=" + token]}, note="s3cr3t-model-key-value")
    tel.close()
    messages = read_stream(nats_server.url, 3)
    raw = json.dumps([body for _, body, _ in messages])
    assert "s3cr3t-model-key-value" not in raw and token not in raw
    assert messages[0][1]["msg"] == f"calling model with key {REPLACEMENT}"
    assert messages[1][1]["msg"] == f"cloning with {REPLACEMENT}"
    assert messages[2][1]["args"] == {"env": [f"TOKEN={REPLACEMENT}"]} and messages[2][1]["note"] == REPLACEMENT


def test_buffer_full_drops_are_counted(capsys):
    tel = Telemetry(TASK, None, buffer_size=10)  # not started: nothing drains the queue
    for i in range(25):
        tel.event(contract.EV_TODO, step=i)
    assert tel.dropped == 15
    tel.close()
    steps = [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()]
    assert steps == list(range(10))


def test_buffer_full_while_publishing(nats_server, task_logger):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth, buffer_size=100).start()
    task_logger.addHandler(tel.log_handler())
    for i in range(5000):
        task_logger.info("burst %d", i)
    tel.close()
    stored = read_stream(nats_server.url)
    assert tel.dropped > 0
    assert len(stored) + tel.dropped == 5000 == tel.published + tel.dropped
    numbers = [int(body["msg"].split()[1]) for _, body, _ in stored]
    assert numbers == sorted(numbers)  # what was kept is in order


def test_restart_while_records_are_in_flight(nats_server, task_logger):
    """Unacked records at the moment NATS goes away are resent in order; dedup drops the stored ones."""
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth)
    task_logger.addHandler(tel.log_handler())
    total = 10_000
    for i in range(total):  # queued before start: the publisher keeps its ack window full while draining
        task_logger.info("n %d", i)
    tel.start()
    eventually(lambda: tel.published > 1_000, "1,000 records acked", interval=0.001)
    nats_server.restart()
    tel.close(timeout=15)
    numbers = [int(body["msg"].split()[1]) for _, body, _ in read_stream(nats_server.url, total + 1)]
    assert tel.dropped == 0 and tel.written_stdout == 0 and tel.resent > 0
    assert numbers == list(range(total))  # complete, in order, no duplicates


def test_long_outage_falls_back_to_stdout(nats_server, capsys):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth, hold_seconds=0.2).start()
    tel.event(contract.EV_STATUS, step=0)
    eventually(lambda: tel.published == 1, "the first record acked")
    nats_server.stop()
    eventually(lambda: not tel.connected, "the connection lost")
    tel.event(contract.EV_STATUS, step=1)
    tel.event(contract.EV_STATUS, step=2)
    eventually(lambda: tel.written_stdout == 2, "2 records on stdout")  # held for hold_seconds, then printed
    started = time.monotonic()
    tel.close(timeout=1.0)
    assert time.monotonic() - started < 1.5
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [1, 2]


def test_rejected_record_is_given_up_and_the_rest_flows(nats_server, capsys):
    async def create():
        nc = await nats_server.connect()
        try:
            await nc.jetstream().add_stream(name=contract.STREAM_NAME, subjects=list(contract.STREAM_SUBJECTS),
                                            max_msg_size=512)
        finally:
            await nc.close()

    asyncio.run(create())
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    tel.event(contract.EV_TOOL, step=0)
    tel.event(contract.EV_TOOL, step=1, output="x" * 2000)  # rejected by the stream: too big
    tel.event(contract.EV_TOOL, step=2)
    eventually(lambda: tel.failed == 1, "the rejected record given up")
    tel.close()
    assert [b["step"] for _, b, _ in read_stream(nats_server.url)] == [0, 2]
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [1]
    assert tel.published == 2 and "maximum" in tel.last_error


def test_stream_deleted_mid_run_is_recreated(nats_server):
    tel = Telemetry(TASK, nats_server.url, auth=nats_server.agent_auth).start()
    tel.event(contract.EV_TOOL, step=0)
    eventually(lambda: tel.published == 1, "the first record acked")

    async def delete():
        nc = await nats_server.connect()
        try:
            await nc.jetstream().delete_stream(contract.STREAM_NAME)
        finally:
            await nc.close()

    asyncio.run(delete())
    for i in range(1, 4):
        tel.event(contract.EV_TOOL, step=i)
    tel.close()
    assert [b["step"] for _, b, _ in read_stream(nats_server.url)] == [1, 2, 3]
    assert tel.published == 4 and tel.failed == 0
