"""Input hardening (issue 9, part D), replayed against a real `dockyard dev` over HTTP.

Finding 5 (bad input that slips through or crashes) and the command-execution half of
finding 2 (task A clones a repository holding a script, task B names that script as its
model by a relative path): each is refused with 400 naming the field, and nothing is
launched. The Host/Origin check and the tokens of part A are a second wall in front of
this one; these tests send ordinary requests, so they hold without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from agent import contract
from functions.devstack.broker import DEAD_LETTER_FILE, DEAD_LETTER_MAX_BYTES
from tests.conftest import REPO_ROOT, agent_environment, eventually
from tests.dev_process import DevServer

STRUCTURED = {"Content-Type": "application/cloudevents+json"}
FINISH = [{"tool_calls": [{"name": "plan", "args": {"todos": ["finish"], "objective": "finish"}}]},
          {"content": "done"}, {"tool_calls": [{"name": "finish", "args": {"summary": "done"}}]}]


def envelope(type_: str, data: object) -> dict:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/security", "type": type_, "data": data}


def post(server: DevServer, event: dict, **headers: str) -> httpx.Response:
    """POST an event to the dev ingress with the dev token: these attacks come from a token holder's input."""
    return httpx.post(server.url + "/", content=json.dumps(event), headers={**STRUCTURED, **server.headers, **headers}, timeout=30)


def submit(server: DevServer, data: dict, **headers: str) -> httpx.Response:
    return post(server, envelope(contract.EVENT_TASK_SUBMITTED, data), **headers)


def refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field, response.text


def task_ids(server: DevServer) -> set[str]:
    return {record["task_id"] for record in httpx.get(f"{server.url}/api/tasks", headers=server.headers, timeout=10).json()}


def launched(dev: DevServer) -> set[str]:
    """Task folders the local runtime created: what it launched."""
    tasks = dev.data_dir / "tasks"
    return {p.name for p in tasks.iterdir()} if tasks.exists() else set()


def evil_repo(tmp_path: Path, marker: Path) -> Path:
    """A repository whose turns.yaml makes a scripted model run a command on the host."""
    repo = tmp_path / "evilrepo"
    repo.mkdir()
    turns = [{"tool_calls": [{"name": "execute", "args": {"command": f"id > {marker}"}}]}]
    (repo / "turns.yaml").write_text(yaml.safe_dump(turns))
    git = ["git", "-c", "user.email=e@example.com", "-c", "user.name=e", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "evil"], check=True)
    return repo


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> Path:
    scripts = tmp_path_factory.mktemp("scripts")
    (scripts / "finish.yaml").write_text(yaml.safe_dump(FINISH))
    escapes = "printf 'a\\033]0;pwned\\007b\\033[2Jc\\033[1A\\r\\000d\\n'"
    (scripts / "escapes.yaml").write_text(yaml.safe_dump([
        {"tool_calls": [{"name": "plan", "args": {"todos": ["print"], "objective": "print \x1b[31mred\x1b[0m"}}]},
        {"tool_calls": [{"name": "execute", "args": {"command": escapes}}]},
        {"content": "printed"},
        {"tool_calls": [{"name": "finish", "args": {"summary": "done \x1b]0;title\x07"}}]},
    ]))
    return scripts


@pytest.fixture(scope="module")
def dev(tmp_path_factory, scripts):
    """`dockyard dev` as a user starts it: no file:// repositories."""
    server = DevServer(tmp_path_factory.mktemp("dev-input"), env={"DOCKYARD_SCRIPTS_DIR": str(scripts)}).start()
    yield server
    server.stop()


# --- finding 2: command execution through a cloned script --------------------------------


def test_a_script_cloned_by_one_task_cannot_be_the_model_of_another(dev, tmp_path):
    marker = tmp_path / "pwned"
    repo = evil_repo(tmp_path, marker)
    before = launched(dev)

    refused(submit(dev, {"task_id": "evil-a", "prompt": "clone", "repo": {"url": repo.as_uri()}}), "repo.url")
    for model in (
        "scripted:../../evil-a/workspace/repo/turns.yaml",  # relative to B's workspace, as in the finding
        f"scripted:{repo / 'turns.yaml'}",
        "scripted:../scripts/finish.yaml",
    ):
        refused(submit(dev, {"task_id": "evil-b", "prompt": "run", "model": model}), "model")

    assert launched(dev) == before and not {"evil-a", "evil-b"} & task_ids(dev)
    assert not marker.exists()


def test_with_file_repos_allowed_the_clone_works_and_the_script_still_cannot_run(tmp_path, scripts):
    """`dockyard dev --allow-file-repos`: task A clones the repository; task B still cannot name its script."""
    marker = tmp_path / "pwned"
    repo = evil_repo(tmp_path, marker)
    server = DevServer(tmp_path / "data", env={"DOCKYARD_SCRIPTS_DIR": str(scripts)}, args=("--allow-file-repos",)).start()
    try:
        answer = submit(server, {"task_id": "evil-a", "prompt": "clone", "repo": {"url": repo.as_uri()}, "model": "scripted:finish"})
        assert answer.status_code == 202, answer.text
        refused(submit(server, {"task_id": "evil-b", "prompt": "run", "model": "scripted:../../evil-a/workspace/repo/turns.yaml"}), "model")

        def finished() -> dict | None:
            record = httpx.get(f"{server.url}/api/tasks/evil-a", headers=server.headers, timeout=5).json()
            return record if record.get("state") in contract.TERMINAL_STATES else None

        record = eventually(finished, "task evil-a to finish", 120)
        assert record["outcome"] == contract.OUTCOME_DONE, record
        assert (server.data_dir / "tasks" / "evil-a" / "workspace" / "repo" / "turns.yaml").exists()
        assert launched(server) == {"evil-a"} and "evil-b" not in task_ids(server)
        assert not marker.exists()
    finally:
        server.stop()


# --- finding 5: bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data, field",
    [
        ({"prompt": "x", "model": "openai:gpt\x00-4o"}, "model"),  # was 202 and a task queued forever
        ({"prompt": "x", "task_id": "x\n"}, "task_id"),  # was 503 and a dead letter
        ({"prompt": "x", "task_id": "x\r"}, "task_id"),
        ({"prompt": "x", "repo": {"url": "https://example.com/r.git\n--upload-pack=id"}}, "repo.url"),
        ({"prompt": "x", "repo": {"url": "https://example.com/r.git", "ref": "main\x1b[2J"}}, "repo.ref"),
        ({"prompt": "x", "model": "scripted:/etc/passwd"}, "model"),
    ],
)
def test_control_characters_and_paths_in_a_submitted_task_are_a_400(dev, data, field):
    before = launched(dev)
    refused(submit(dev, data), field)
    assert launched(dev) == before


@pytest.mark.parametrize("op, field", [("cancel\n", "op"), ("cancel\x00", "op")])
def test_control_characters_in_a_command_are_a_400(dev, op, field):
    refused(post(dev, envelope(contract.EVENT_TASK_COMMAND, {"task_id": "any-task", "op": op})), field)
    refused(post(dev, envelope(contract.EVENT_TASK_COMMAND, {"task_id": "any-task\n", "op": "cancel"})), "task_id")


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_json_nested_a_thousand_levels_is_a_400_not_a_500(dev, mode):
    nested = "[" * 1000 + "]" * 1000  # 2 KB
    if mode == "structured":
        body = '{"specversion":"1.0","id":"deep","source":"s","type":"%s","data":%s}' % (contract.EVENT_TASK_SUBMITTED, nested)
        answer = httpx.post(dev.url + "/", content=body, headers={**STRUCTURED, **dev.headers}, timeout=30)
        refused(answer, "body")
    else:
        headers = {"ce-specversion": "1.0", "ce-id": "deep", "ce-source": "s", "ce-type": contract.EVENT_TASK_SUBMITTED,
                   "content-type": "application/json"}
        refused(httpx.post(dev.url + "/", content=nested, headers={**headers, **dev.headers}, timeout=30), "data")
    assert httpx.get(dev.url + "/healthz", timeout=5).status_code == 200


def test_forty_large_rejected_requests_do_not_grow_the_dead_letter_file_without_bound(dev):
    """Was: 40 rejected requests added 9.8 MB. Each is dead-lettered, without its data."""
    big = {"prompt": "x" * (200 * 1024)}  # under the ingress limit, over the prompt limit: the function answers 413
    for _ in range(40):
        assert submit(dev, big).status_code == 413
    path = dev.data_dir / DEAD_LETTER_FILE
    assert path.stat().st_size < DEAD_LETTER_MAX_BYTES // 10
    assert len(path.read_text().splitlines()) >= 40


def test_dockyard_logs_prints_no_escape_sequences(dev):
    answer = submit(dev, {"task_id": "escapes", "prompt": "print \x1b[31mcolours\x1b[0m", "model": "scripted:escapes"})
    assert answer.status_code == 202, answer.text

    def done() -> bool:
        record = httpx.get(f"{dev.url}/api/tasks/escapes", headers=dev.headers, timeout=5).json()
        return record.get("state") in contract.TERMINAL_STATES

    eventually(done, "task escapes to finish", 120)
    env = agent_environment()
    proc = subprocess.run([sys.executable, "-m", "functions.cli", "logs", "escapes", "--url", dev.url, "--token", dev.token],
                          cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "finished" in out and "pwned" in out  # the text is there, the control characters are not
    assert not [c for c in out if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F], repr(out)
    tasks = subprocess.run([sys.executable, "-m", "functions.cli", "tasks", "--url", dev.url, "--token", dev.token],
                           cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert b"\x1b" not in tasks.stdout
