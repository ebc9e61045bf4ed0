"""The `dockyard` CLI against real local HTTP servers, and the terminal rendering of a trace."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent import contract
from functions.cli import main as cli
from functions.core import cloudevent
from functions.cli import render


class FakeServer:
    """A real HTTP server on 127.0.0.1 whose answers a test sets; it records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.answer = (202, {"accepted": True})
        self.sse: list[str] = []  # SSE messages (already framed) for GET /api/stream/...
        self.drop_after: int | None = None  # close the first stream after this many messages
        self.tasks: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, answer = server.answer
                self._json(status, answer)

            def do_GET(self):
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": b""})
                if self.path == "/api/tasks":
                    return self._json(200, server.tasks)
                if not self.path.startswith("/api/stream/"):
                    return self._json(404, {"error": "no such path", "field": None})
                after = int(self.headers.get("Last-Event-ID") or 0)
                pending = [m for i, m in enumerate(server.sse, 1) if i > after or m.startswith("event: end")]
                streams = sum(1 for r in server.requests if r["path"].startswith("/api/stream/"))
                if server.drop_after is not None and streams == 1:
                    pending = pending[: server.drop_after]
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for message in pending:
                    self.wfile.write(message.encode())
                    self.wfile.flush()

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def add_event(self, event: str, data: dict) -> None:
        seq = len(self.sse) + 1
        self.sse.append(f"id: {seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n")

    def end(self) -> None:
        self.sse.append(f"event: end\ndata: {json.dumps({'last_id': len(self.sse)})}\n\n")


# --- submit ----------------------------------------------------------------------


def test_submit_posts_a_structured_cloudevent_and_prints_the_derived_id(server, capsys):
    code = cli.main(["submit", "write fizzbuzz", "--model", "scripted:example", "--repo", "https://example.com/r.git", "--ref", "main", "--retries", "1",
                     "--max-tokens", "5000", "--max-cost-usd", "1.5", "--url", server.url])
    assert code == 0
    (request,) = server.requests
    assert request["path"] == "/"
    event = cloudevent.parse(request["headers"], request["body"])  # the functions' own parser accepts it
    assert request["headers"]["content-type"].startswith(cloudevent.STRUCTURED)
    assert event["type"] == contract.EVENT_TASK_SUBMITTED
    assert event["source"] == contract.EVENT_SOURCE_CLI
    assert event.get_data() == {
        "prompt": "write fizzbuzz",
        "model": "scripted:example",
        "repo": {"url": "https://example.com/r.git", "ref": "main"},
        "limits": {"retries": 1, "max_tokens": 5000, "max_cost_usd": 1.5},
    }
    assert capsys.readouterr().out.strip() == contract.derive_task_id(event["source"], event["id"])


def test_submit_push_asks_for_a_branch_and_needs_a_repo(server, capsys):
    url = "https://example.com/r.git"
    assert cli.main(["submit", "x", "--repo", url, "--push", "--url", server.url]) == 0
    assert cloudevent.parse(server.requests[-1]["headers"], server.requests[-1]["body"]).get_data()["repo"] == {"url": url, "push": {}}
    assert cli.main(["submit", "x", "--repo", url, "--push", "fix/it", "--url", server.url]) == 0
    assert cloudevent.parse(server.requests[-1]["headers"], server.requests[-1]["body"]).get_data()["repo"]["push"] == {"branch": "fix/it"}
    sent = len(server.requests)
    assert cli.main(["submit", "x", "--push", "--url", server.url]) == 2
    assert "--push needs --repo" in capsys.readouterr().err and len(server.requests) == sent


def test_submit_prints_the_id_the_broker_answers(server, capsys):
    server.answer = (202, {"accepted": True, "results": {"task_submitted": {"task_id": "given-id", "status": "submitted"}}})
    assert cli.main(["submit", "x", "--url", server.url]) == 0
    assert capsys.readouterr().out.strip() == "given-id"
    server.answer = (202, {})
    assert cli.main(["submit", "x", "--task-id", "mine", "--url", server.url]) == 0
    assert capsys.readouterr().out.strip() == "mine"


def test_submit_refused_prints_the_error_and_field(server, capsys):
    server.answer = (400, {"error": "task_id must be 1-40 characters", "field": "task_id"})
    assert cli.main(["submit", "x", "--task-id", "Bad_Id", "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert "task_id must be 1-40 characters" in err and "(field: task_id)" in err


def test_the_token_comes_from_the_flag_then_the_environment_then_the_data_dir(server, tmp_path, monkeypatch):
    def sent() -> str | None:
        return server.requests[-1]["headers"].get("Authorization")

    (tmp_path / "api-token").write_text("dy_from-file\n")
    monkeypatch.delenv("DOCKYARD_TOKEN", raising=False)
    assert cli.main(["tasks", "--url", server.url, "--data-dir", str(tmp_path)]) == 0
    assert sent() == "Bearer dy_from-file"
    monkeypatch.setenv("DOCKYARD_TOKEN", "dy_from-env")
    assert cli.main(["submit", "x", "--url", server.url, "--data-dir", str(tmp_path)]) == 0
    assert sent() == "Bearer dy_from-env"
    assert cli.main(["cancel", "t-1", "--url", server.url, "--token", "dy_from-flag"]) == 0
    assert sent() == "Bearer dy_from-flag"
    monkeypatch.delenv("DOCKYARD_TOKEN")
    assert cli.main(["tasks", "--url", server.url, "--data-dir", str(tmp_path / "none")]) == 0
    assert sent() is None


def test_token_create_prints_a_token_and_its_hashed_line(capsys):
    from functions.stream.auth import parse_tokens

    assert cli.main(["token", "create", "--name", "ci", "--scope", "read"]) == 0
    out = capsys.readouterr().out
    token = out.split("token: ", 1)[1].split()[0]
    line = out.split("tokens-file line: ", 1)[1].strip()
    (grant,) = parse_tokens(line).values()
    assert (grant.name, grant.scope) == ("ci", "read") and token not in line
    assert cli.main(["token", "create", "--name", "two words", "--scope", "read"]) == 2


def test_submit_to_nothing_says_what_to_do(capsys):
    assert cli.main(["submit", "x", "--url", "http://127.0.0.1:9"]) == 1
    assert "dockyard dev" in capsys.readouterr().err


def test_cancel_and_message_send_task_commands(server, capsys):
    server.answer = (202, {"accepted": True, "results": {"task_command": {"status": "cancelling"}}})
    assert cli.main(["cancel", "t-1", "--url", server.url]) == 0
    assert cli.main(["message", "t-1", "use python 3.12", "--url", server.url]) == 0
    events = [cloudevent.parse(r["headers"], r["body"]) for r in server.requests]
    assert [e["type"] for e in events] == [contract.EVENT_TASK_COMMAND] * 2
    assert [e.get_data() for e in events] == [
        {"task_id": "t-1", "op": "cancel"},
        {"task_id": "t-1", "op": "message", "text": "use python 3.12"},
    ]
    assert capsys.readouterr().out.splitlines()[0] == "cancel t-1: cancelling"


# --- logs and tasks ----------------------------------------------------------------


def sample_trace(server: FakeServer) -> None:
    server.add_event("status", {"type": "status", "state": "started", "model": "scripted:example"})
    server.add_event("phase", {"type": "phase", "phase": "STRATEGIC"})
    server.add_event("phase", {"type": "phase", "phase": "TACTICAL", "objective": "write it"})
    server.add_event("tool", {"type": "tool", "name": "execute", "stage": "start", "args": {"command": "pytest -q"}})
    server.add_event("status", {"type": "status", "state": "finished", "outcome": "done", "summary": "all good"})
    server.end()


def test_logs_prints_the_trace_and_stops_at_the_end(server, capsys):
    sample_trace(server)
    assert cli.main(["logs", "t-1", "--url", server.url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "-- started with model scripted:example",
        "== STRATEGIC ==",
        "== TACTICAL == write it",
        "$ execute: pytest -q",
        "-- finished: done - all good",
        "-- end of stream",
    ]
    assert server.requests[0]["path"] == "/api/stream/t-1"


def test_logs_follow_reconnects_with_last_event_id(server, capsys):
    sample_trace(server)
    server.drop_after = 2  # the first connection ends after two messages
    assert cli.main(["logs", "t-1", "-f", "--url", server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "-- started with model scripted:example" and out[-1] == "-- end of stream"
    assert len(out) == 6  # nothing twice, nothing lost
    streams = [r for r in server.requests if r["path"].startswith("/api/stream/")]
    assert len(streams) == 2 and streams[1]["headers"]["Last-Event-ID"] == "2"


def test_logs_without_follow_stops_when_caught_up(server, capsys):
    server.add_event("phase", {"type": "phase", "phase": "STRATEGIC"})  # a live task: no end yet
    server.drop_after = None
    assert cli.main(["logs", "t-1", "--idle", "0.2", "--url", server.url]) == 0
    assert "== STRATEGIC ==" in capsys.readouterr().out


def test_logs_json_and_after(server, capsys):
    sample_trace(server)
    assert cli.main(["logs", "t-1", "--json", "--after", "3", "--url", server.url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == [4, 5, None]
    assert server.requests[0]["headers"]["Last-Event-ID"] == "3"


def test_logs_of_an_unknown_task(server, capsys):
    assert cli.main(["logs", "t-1", "--url", server.url + "/nothing-here"]) == 2
    assert "no such path" in capsys.readouterr().err


def test_tasks_table(server, capsys):
    server.tasks = [
        {"task_id": "t-2", "state": "started", "phase": "TACTICAL", "outcome": None, "attempts": 1, "created_at": "2024-01-01T00:00:01Z"},
        {"task_id": "t-1", "state": "finished", "phase": "STRATEGIC", "outcome": "done", "attempts": 2, "created_at": "2024-01-01T00:00:00Z",
         "usage": {"calls": 3, "tokens": 12345, "cost_usd": 0.0421}},
        {"task_id": "t-0", "state": "finished", "phase": None, "outcome": "failed", "failure_class": "fatal", "attempts": 1,
         "created_at": "2024-01-01T00:00:00Z", "reason": "git clone failed: repository not found"},
    ]
    assert cli.main(["tasks", "--url", server.url]) == 0
    header, first, second, third = capsys.readouterr().out.splitlines()
    assert header.split() == ["TASK", "STATE", "PHASE", "OUTCOME", "ATTEMPTS", "TOKENS", "COST", "CREATED", "AT", "REASON"]
    assert first.split() == ["t-2", "started", "TACTICAL", "1", "2024-01-01T00:00:01Z"]
    assert second.split() == ["t-1", "finished", "STRATEGIC", "done", "2", "12,345", "$0.0421", "2024-01-01T00:00:00Z"]
    assert third.split() == ["t-0", "finished", "failed", "(fatal)", "1", "2024-01-01T00:00:00Z", *"git clone failed: repository not found".split()]


def test_the_command_registry_is_a_list_of_register_functions():
    def register(sub):
        sub.add_parser("extra").set_defaults(run=lambda args: 7)

    cli.COMMANDS.append(register)
    try:
        assert cli.main(["extra"]) == 7
    finally:
        cli.COMMANDS.remove(register)


# --- render ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event,data,text",
    [
        ("phase", {"type": "phase", "phase": "STRATEGIC"}, "== STRATEGIC =="),
        ("phase", {"type": "phase", "phase": "TACTICAL", "objective": "Write fizzbuzz.py"}, "== TACTICAL == Write fizzbuzz.py"),
        ("phase", {"type": "phase", "phase": "STRATEGIC", "report": "tests\npass"}, "== STRATEGIC == report: tests pass"),
        ("tool", {"type": "tool", "name": "execute", "stage": "start", "args": {"command": "ls -la", "timeout": 5}}, "$ execute: ls -la"),
        ("tool", {"type": "tool", "name": "write_file", "stage": "start", "args": {"path": "a.py", "content": "x"}}, "$ write_file: a.py"),
        ("tool", {"type": "tool", "name": "plan", "stage": "start", "args": {"n": 1}}, '$ plan: {"n":1}'),
        ("tool", {"type": "tool", "name": "execute", "stage": "end", "ok": True, "result": "exit code 0\nok", "seconds": 0.25}, "  -> ok 0.2s: exit code 0 ok"),
        ("tool", {"type": "tool", "name": "read_file", "stage": "end", "ok": False, "result": "outside the workspace"}, "  -> error: outside the workspace"),
        ("todo", {"type": "todo", "todos": ["one", "two"]}, "todo:\n  - one\n  - two"),
        ("status", {"type": "status", "state": "queued"}, "-- queued"),
        ("status", {"type": "status", "state": "resumed", "phase": "TACTICAL", "model_turns": 3, "tool_calls": 2}, "-- resumed from checkpoint in TACTICAL (3 model turns, 2 tool calls done)"),
        ("status", {"type": "status", "state": "retrying", "attempt": 2, "exit_code": 137, "backoff_seconds": 2.0}, "-- retrying: attempt 2 after exit code 137, in 2s"),
        ("status", {"type": "status", "state": "interrupted", "reason": "SIGTERM"}, "-- interrupted (SIGTERM)"),
        ("status", {"type": "status", "state": "finished", "outcome": "failed", "reason": "BackoffLimitExceeded"}, "-- finished: failed: BackoffLimitExceeded"),
        ("snapshot", {"type": "snapshot", "key": "jobs/t/checkpoints/1.db", "size": 2048, "uploaded": True, "final": False}, "snapshot: jobs/t/checkpoints/1.db (2.0 KiB)"),
        ("snapshot", {"type": "snapshot", "key": "k.db", "size": 10, "final": True, "archive_key": "jobs/t/final/workspace.tar.gz"}, "snapshot: final jobs/t/final/workspace.tar.gz (10 B)"),
        ("snapshot", {"type": "snapshot", "final": True, "archive_key": "a", "push": {"branch": "dockyard/t", "commit": "0123456789abcdef"}},
         "snapshot: final a; pushed branch dockyard/t at 0123456789ab"),
        ("snapshot", {"type": "snapshot", "final": True, "archive_key": "a", "push_error": "refused by the remote: no"},
         "snapshot: final a; push failed: refused by the remote: no"),
        ("result", {"type": "result", "outcome": "done", "summary": "ok"}, "result: done - ok"),
        ("message", {"type": "message", "text": "hurry"}, "> message to the agent: hurry"),
        ("warning", {"type": "warning", "message": "disk"}, "! warning: disk"),
        ("log", {"ts": "2024-05-01T12:00:01.123Z", "level": "WARNING", "logger": "agent", "msg": "slow"}, "12:00:01 WARNING agent: slow"),
        ("end", {"last_id": 3}, "-- end of stream"),
        ("custom", {"type": "custom", "task_id": "t", "ts": "x", "n": 1}, 'custom: {"n":1}'),
    ],
)
def test_render(event, data, text):
    assert render.render(event, data) == text


@pytest.mark.parametrize(
    "event, data",
    [
        ("log", {"ts": "2030-01-01T00:00:00Z", "level": "INFO", "logger": "x", "msg": "a\x1b]0;pwned\x07b\x1b[2Jc\x9b1md"}),
        ("log", {"msg": "ok", "exc": "Traceback\n  \x1b[31mred\x1b[0m\rover\x00"}),
        ("tool", {"type": "tool", "stage": "end", "ok": True, "result": "\x1b[1A\x1b[2Kfake line"}),
        ("status", {"type": "status", "state": "started", "model": "x\x1b[8m"}),
        ("status", {"type": "status", "state": "\x1b[5mblink"}),
        ("mystery", {"type": "\x1b[31mmystery", "text": "\x1b"}),
    ],
)
def test_render_strips_control_characters_for_the_terminal(event, data):
    """`dockyard logs` prints agent output: ESC (CSI, OSC), C1, CR and NUL never reach the terminal."""
    text = render.render(event, data)
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)


def test_render_cuts_long_results():
    line = render.render("tool", {"type": "tool", "stage": "end", "ok": True, "result": "x" * 500})
    assert len(line) < 130 and line.endswith("...")


def test_final_snapshot_location():
    assert render.final_snapshot_location("file:///tmp/store/", "t-1") == "file:///tmp/store/jobs/t-1/final/workspace.tar.gz"
