"""`dockyard diff` on a task finished by a real `dockyard dev`, and its rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from agent import changes, contract
from functions.cli import diff
from tests.agent.test_changes import make_origin
from tests.conftest import REPO_ROOT, eventually
from tests.dev_process import DevServer

EDIT = "printf 'first\\nsecond changed\\n' > repo/edit.txt && echo added > repo/added.txt && rm repo/gone.txt"
SCRIPT = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["edit"], "objective": "edit"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": EDIT}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": "seq 1 100000"}}]},  # a long output, kept whole
    {"content": "edited"},
    {"tool_calls": [{"name": "finish", "args": {"summary": "edited"}}]},
]


def dockyard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "functions.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def finished_task(tmp_path_factory):
    """A repository task that edits, adds and deletes a file, run to its end by `dockyard dev`."""
    root = tmp_path_factory.mktemp("diff")
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "edit.yaml").write_text(yaml.safe_dump(SCRIPT))
    origin = make_origin(root / "origin", {"edit.txt": "first\nsecond\n", "gone.txt": "bye\n"})
    server = DevServer(root / "data", env={"DOCKYARD_SCRIPTS_DIR": str(scripts)}, args=("--allow-file-repos",)).start()
    try:
        task = {"task_id": "diff-me", "prompt": "edit", "repo": {"url": origin.as_uri()}, "model": "scripted:edit"}
        answer = dockyard("submit", task["prompt"], "--task-id", task["task_id"], "--repo", origin.as_uri(), "--model", task["model"], "--url", server.url, "--data-dir", str(server.data_dir))
        assert answer.returncode == 0, answer.stderr

        def finished() -> dict | None:
            record = httpx.get(f"{server.url}/api/tasks/diff-me", headers=server.headers, timeout=5).json()
            stored = server.data_dir / "store" / contract.final_result_key("diff-me")
            return record if record.get("state") in contract.TERMINAL_STATES and stored.exists() else None

        record = eventually(finished, "task diff-me to finish with its final set stored", 120)
        assert record["outcome"] == contract.OUTCOME_DONE, record
        yield server
    finally:
        server.stop()


def test_diff_prints_the_patch_plain_when_piped(finished_task):
    done = dockyard("diff", "diff-me", "--data-dir", str(finished_task.data_dir))
    assert done.returncode == 0, done.stderr
    assert "-second\n+second changed\n" in done.stdout
    assert "+++ b/added.txt" in done.stdout and "deleted file mode" in done.stdout
    assert "\x1b[" not in done.stdout
    result = json.loads((finished_task.data_dir / "store" / contract.final_result_key("diff-me")).read_text())
    assert result["changes_patch_key"] == changes.patch_key("diff-me")


def test_diff_colours_on_request_and_stat_lists_the_files(finished_task):
    coloured = dockyard("diff", "diff-me", "--color", "always", "--data-dir", str(finished_task.data_dir))
    assert f"{diff.GREEN}+second changed{diff.RESET}" in coloured.stdout
    assert f"{diff.RED}-second{diff.RESET}" in coloured.stdout
    stat = dockyard("diff", "diff-me", "--stat", "--data-dir", str(finished_task.data_dir))
    assert stat.returncode == 0, stat.stderr
    rows = {line.split()[-1]: line.split()[:3] for line in stat.stdout.splitlines()[1:-1]}
    assert rows == {"edit.txt": ["modified", "1", "1"], "added.txt": ["added", "1", "0"], "gone.txt": ["deleted", "0", "1"]}
    assert stat.stdout.splitlines()[-1].startswith("3 files, +2 -2 against commit ")


def test_diff_of_a_task_without_a_change_set_says_why(finished_task):
    done = dockyard("diff", "never-ran", "--data-dir", str(finished_task.data_dir))
    assert done.returncode == 1 and done.stdout == ""
    assert "task never-ran has no change set yet: it has not finished" in done.stderr


def test_why_none_names_a_failed_computation(tmp_path):
    from agent.storage import open_store

    store = open_store(tmp_path.as_uri())
    store.put_bytes(contract.final_result_key("t"), json.dumps({"outcome": "done", "changes_error": "git add timed out"}).encode())
    assert diff.why_none(store, "t") == "task t has no change set: it could not be computed (git add timed out)"


def test_a_coloured_line_carries_no_control_characters_of_the_patch():
    line = diff.colour_line("+evil \x1b]0;title\x07\x1b[2J text\n")
    assert line == f"{diff.GREEN}+evil ]0;title[2J text{diff.RESET}\n" and line.count("\x1b") == 2  # ours only
    assert diff.colour_line(" context\n") == " context\n"


def test_stat_table_of_a_cut_patch():
    summary = {
        "base": {"verified": False, "note": "no repository: every file is new"},
        "files": [{"path": "b.bin", "status": "added", "binary": True}, {"path": "n", "old_path": "o", "status": "renamed", "added_lines": 2, "deleted_lines": 1}],
        "totals": {"files": 2, "added_lines": 2, "deleted_lines": 1},
        "cut": True,
    }
    assert diff.format_stat(summary).splitlines() == [
        "STATUS     +    -  PATH",
        "added    bin  bin  b.bin",
        "renamed    2    1  o -> n",
        "2 files, +2 -1 against the empty tree (no repository: every file is new); the patch was cut, this list is complete",
    ]


def test_the_diff_command_is_registered():
    from functions.cli.main import build_parser

    args = build_parser().parse_args(["diff", "t", "--stat"])
    assert args.run is diff.run and args.stat is True and Path(args.data_dir) == Path(".dockyard")


def test_diff_colours_by_itself_on_a_terminal(finished_task):
    import os

    leader, follower = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "functions.cli", "diff", "diff-me", "--data-dir", str(finished_task.data_dir)],
        cwd=REPO_ROOT, stdout=follower, stderr=subprocess.PIPE, env=env,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    text = output.decode().replace("\r\n", "\n")
    assert f"{diff.GREEN}+second changed{diff.RESET}" in text and f"{diff.BOLD}diff --git" in text
