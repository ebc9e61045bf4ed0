"""Delivery of the change set as a branch, against a real git server on loopback.

The server is git's own `git http-backend` (smart HTTP) run as a CGI program by a small WSGI host
with HTTP basic auth, as a forge's front end runs it. The workspace is cloned from it by the agent's
own `clone_repo`, and the finalizer's real step (`upload_final` with a push request, and the
snapshotter process with `--push-url`) commits and pushes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import wsgiref.simple_server
from pathlib import Path

import pytest

from agent import changes, contract
from agent.push import PushRequest, default_branch
from agent.snapshot import upload_final
from agent.storage import open_store
from tests.conftest import eventually

TASK = "t-push"
USER, PASSWORD = "pusher", "s3cret-token-7f2a"
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def git(cwd: Path, *args: str, check: bool = True) -> str:
    env = {**os.environ, **GIT_ID, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=check, capture_output=True, text=True).stdout


# --- the server: git http-backend behind WSGI with basic auth ---------------------------------------


class _GitHTTP:
    """WSGI → CGI: every request runs `git http-backend` with the CGI variables it reads."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, user) as seen

    def __call__(self, environ, start_response):
        user = self._user(environ.get("HTTP_AUTHORIZATION", ""))
        self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), user))
        if user is None:
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"'), ("Content-Length", "0")])
            return [b""]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        cgi_env = {
            "PATH": os.environ["PATH"], "HOME": str(self.root), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1", "REMOTE_USER": user,
            "GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "PATH_INFO": environ.get("PATH_INFO", ""), "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""), "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": environ.get("HTTP_CONTENT_ENCODING", ""), "REMOTE_ADDR": "127.0.0.1",
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=cgi_env, capture_output=True, timeout=60).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = "200 OK", []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name, value.strip()))
        start_response(status, [*headers, ("Content-Length", str(len(payload)))])
        return [payload]

    @staticmethod
    def _user(header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if (user, password) == (USER, PASSWORD) else None


class _Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A bare repository `repo.git` with one commit, served over HTTP on loopback: (app, url, bare path)."""
    root = tmp_path / "server"
    source = tmp_path / "source"
    source.mkdir()
    git(source, "init", "--quiet", "--initial-branch=main")
    (source / "README.md").write_text("hello\n")
    (source / "app.py").write_text("".join(f"print({i})\n" for i in range(20)))
    git(source, "add", "--all")
    git(source, "commit", "--quiet", "-m", "base")
    root.mkdir()
    git(root, "clone", "--quiet", "--bare", str(source), "repo.git")
    app = _GitHTTP(root)
    httpd = wsgiref.simple_server.make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield app, f"http://127.0.0.1:{httpd.server_address[1]}/repo.git", root / "repo.git"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def credentials(tmp_path) -> Path:
    directory = tmp_path / "git-credentials"
    directory.mkdir(mode=0o700)
    (directory / "username").write_text(USER + "\n")
    (directory / "password").write_text(PASSWORD + "\n")
    return directory


def workspace_with_changes(tmp_path: Path, url: str) -> tuple[Path, str]:
    """A workspace cloned from the server as the agent's clone_repo leaves it (which clones over https
    only: here git clone over http, then the base recorded as it records it), with an edit, a new file
    and a deletion: (workspace, base commit)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    repo = workspace / contract.REPO_DIR
    git(workspace, "clone", "--quiet", "--", url.replace("http://", f"http://{USER}:{PASSWORD}@"), str(repo))
    git(repo, "remote", "set-url", "origin", url)  # nothing of the password stays in the workspace
    changes.record_base(workspace, {"url": url}, git(repo, "rev-parse", "HEAD"))
    (repo / "README.md").write_text("hello\nworld\n")
    (repo / "new.txt").write_text("new file\n")
    (repo / "app.py").unlink()
    (workspace / contract.RESULT_FILE).write_text(json.dumps({"task_id": TASK, "outcome": "done", "summary": "edited"}))
    return workspace, git(repo, "rev-parse", "HEAD").strip()


def finalize(tmp_path: Path, workspace: Path, request: PushRequest) -> dict:
    store = open_store((tmp_path / "store").as_uri())
    done = upload_final(workspace, store, TASK, push=request)
    stored = json.loads(store.get_bytes(contract.final_result_key(TASK)))
    assert stored == done.result
    # The work is kept whatever the push did: archive, change set, result.
    assert store.exists(contract.final_archive_key(TASK))
    assert store.exists(changes.patch_key(TASK)) and store.exists(changes.summary_key(TASK))
    assert stored["outcome"] == "done"
    return stored


def server_branch(bare: Path, branch: str) -> str | None:
    found = git(bare, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False).strip()
    return found or None


# --- tests ------------------------------------------------------------------------------------------


def test_push_creates_the_branch_with_the_change_set_on_the_base(tmp_path, server, credentials):
    app, url, bare = server
    workspace, base = workspace_with_changes(tmp_path, url)

    result = finalize(tmp_path, workspace, PushRequest(url, default_branch(TASK), str(credentials)))

    assert "push_error" not in result, result
    pushed = result["push"]
    assert pushed == {"branch": f"dockyard/{TASK}", "commit": server_branch(bare, f"dockyard/{TASK}"), "remote": url}
    commit = pushed["commit"]
    assert git(bare, "rev-parse", f"{commit}^@").split() == [base]  # one parent: the base
    assert set(git(bare, "diff", "--name-status", base, commit).splitlines()) == {"D\tapp.py", "M\tREADME.md", "A\tnew.txt"}
    assert git(bare, "show", f"{commit}:README.md") == "hello\nworld\n"
    message = git(bare, "log", "-1", "--format=%B", commit)
    assert f"Dockyard-Task: {TASK}" in message and "edited" in message
    assert any(user == USER and path.endswith("git-receive-pack") for _, path, user in app.requests)
    # The patch stored with the result is what the commit holds.
    patch = open_store((tmp_path / "store").as_uri()).get_bytes(changes.patch_key(TASK))
    assert patch == git(bare, "diff", "--binary", "--full-index", "-M", base, commit).encode()

    # A second final step over the same workspace (the upload was retried) makes the same commit: a no-op.
    again = finalize(tmp_path, workspace, PushRequest(url, default_branch(TASK), str(credentials)))
    assert again["push"] == pushed


def test_wrong_credentials_are_refused_and_the_work_is_kept(tmp_path, server, credentials):
    _, url, bare = server
    workspace, _ = workspace_with_changes(tmp_path, url)
    (credentials / "password").write_text("not-the-password-9d1c\n")

    result = finalize(tmp_path, workspace, PushRequest(url, "feature/x", str(credentials)))

    assert "push" not in result
    assert result["push_error"].startswith("authentication refused"), result
    assert "not-the-password-9d1c" not in json.dumps(result)
    assert server_branch(bare, "feature/x") is None


def test_a_pre_receive_hook_that_refuses_is_reported_and_the_work_is_kept(tmp_path, server, credentials):
    _, url, bare = server
    hook = bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'branch policy: no pushes today' >&2\nexit 1\n")
    hook.chmod(0o755)
    workspace, _ = workspace_with_changes(tmp_path, url)

    result = finalize(tmp_path, workspace, PushRequest(url, "feature/y", str(credentials)))

    assert result["push_error"].startswith("refused by the remote: pre-receive hook declined"), result
    assert "branch policy: no pushes today" in result["push_error"]
    assert server_branch(bare, "feature/y") is None


def test_an_existing_branch_with_other_history_is_never_overwritten(tmp_path, server, credentials):
    _, url, bare = server
    workspace, _ = workspace_with_changes(tmp_path, url)
    other = git(bare, "commit-tree", "main^{tree}", "-p", "main", "-m", "someone else's work").strip()
    git(bare, "update-ref", "refs/heads/taken", other)

    result = finalize(tmp_path, workspace, PushRequest(url, "taken", str(credentials)))

    assert result["push_error"].startswith("refused: branch 'taken' already exists on the remote with other history"), result
    assert server_branch(bare, "taken") == other


def test_no_credentials_and_credentials_for_another_host_push_nothing(tmp_path, server, credentials):
    app, url, bare = server
    workspace, _ = workspace_with_changes(tmp_path, url)
    app.requests.clear()  # the clone's

    result = finalize(tmp_path, workspace, PushRequest(url, "a", None))
    assert result["push_error"].startswith("not pushed: no git credentials are configured"), result

    (credentials / "hosts").write_text("git.example.org\n")
    result = finalize(tmp_path, workspace, PushRequest(url, "b", str(credentials)))
    assert result["push_error"].startswith("refused: the git credentials are not for host '127.0.0.1'"), result
    assert app.requests == []  # never contacted: the credentials could not have been sent
    result = finalize(tmp_path, workspace, PushRequest("http://git.example.org/r.git", "c", str(credentials)))
    assert result["push_error"].startswith("refused: git credentials are never sent over plain http"), result
    assert server_branch(bare, "a") is None and server_branch(bare, "b") is None


def test_an_unreachable_server_is_a_network_error(tmp_path, server, credentials):
    from tests.conftest import free_port

    _, url, _ = server
    workspace, _ = workspace_with_changes(tmp_path, url)
    result = finalize(tmp_path, workspace, PushRequest(f"http://127.0.0.1:{free_port()}/repo.git", "c", str(credentials)))
    assert result["push_error"].startswith("network: could not reach 127.0.0.1"), result


def test_the_snapshotters_push_flags():
    from agent.cli import UsageError
    from agent.snapshotter import parse_settings

    common = ["--task-id", TASK, "--store", "file:///tmp/s"]
    assert parse_settings(common).push is None
    pushing = parse_settings([*common, "--push-url", "https://h/r.git", "--git-credentials-dir", "/var/secrets/git"])
    assert pushing.push == PushRequest("https://h/r.git", f"dockyard/{TASK}", "/var/secrets/git", None)
    with pytest.raises(UsageError, match="need --push-url"):
        parse_settings([*common, "--push-branch", "x"])


MALICIOUS_HOOK = "#!/bin/sh\necho {name} >> {marker}\n"


def test_the_agents_git_config_and_hooks_never_run(tmp_path, server, credentials):
    """The agent controls `repo/.git`: a pre-push hook, a hooks path, an fsmonitor, a credential helper and
    an include would each write the marker if the finalizer's git read that repository's config."""
    _, url, bare = server
    workspace, _ = workspace_with_changes(tmp_path, url)
    dot_git = workspace / contract.REPO_DIR / ".git"
    marker = tmp_path / "marker"
    evil_hooks = workspace / "evil-hooks"
    evil_hooks.mkdir()
    for directory in (dot_git / "hooks", evil_hooks):
        for name in ("pre-push", "pre-commit", "post-commit", "reference-transaction", "push-to-checkout"):
            (directory / name).write_text(MALICIOUS_HOOK.format(name=name, marker=marker))
            (directory / name).chmod(0o755)
    script = workspace / "evil.sh"
    script.write_text(f"#!/bin/sh\necho script >> {marker}\n")
    script.chmod(0o755)
    (workspace / "included.conf").write_text(f"[core]\n\tfsmonitor = {script}\n")
    with open(dot_git / "config", "a") as config:
        config.write(
            f"[core]\n\thooksPath = {evil_hooks}\n\tfsmonitor = {script}\n\tsshCommand = {script}\n"
            f"[credential]\n\thelper = !{script}\n[include]\n\tpath = {workspace / 'included.conf'}\n"
            f'[includeIf "gitdir:/"]\n\tpath = {workspace / "included.conf"}\n'
        )

    result = finalize(tmp_path, workspace, PushRequest(url, "safe", str(credentials)))

    assert result.get("push", {}).get("commit") == server_branch(bare, "safe"), result
    assert not marker.exists(), marker.read_text()
    # The trap works: git run in that repository, as a careless finalizer would, springs it.
    git(workspace / contract.REPO_DIR, "push", "--quiet", url.replace("http://", f"http://{USER}:{PASSWORD}@"), "HEAD:refs/heads/control")
    assert "pre-push" in marker.read_text()


def test_the_snapshotter_pushes_with_its_flags(tmp_path, server, credentials, agent_env):
    """The process as the runtimes start it: `--push-url`, `--push-branch`, `--git-credentials-dir`."""
    _, url, bare = server
    workspace, base = workspace_with_changes(tmp_path, url)
    store_url = (tmp_path / "store").as_uri()
    log = tmp_path / "snapshotter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "snapshotter", "--task-id", TASK, "--workspace", str(workspace), "--store", store_url,
             "--push-url", url, "--push-branch", "from-flags", "--git-credentials-dir", str(credentials)],
            env=agent_env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            eventually(lambda: "starting:" in log.read_text(), "the snapshotter to start", 60, detail=log.read_text)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result = json.loads(open_store(store_url).get_bytes(contract.final_result_key(TASK)))
    assert result["push"]["commit"] == server_branch(bare, "from-flags")
    assert git(bare, "rev-parse", "from-flags^").strip() == base
    assert PASSWORD not in log.read_text()
    assert "push=from-flags" in log.read_text()


EDIT = "printf 'hello\\nfrom dev\\n' > repo/README.md && echo added > repo/added.txt"
SCRIPT = [
    {"tool_calls": [{"name": "plan", "args": {"todos": ["edit"], "objective": "edit"}}]},
    {"tool_calls": [{"name": "execute", "args": {"command": EDIT}}]},
    {"content": "edited"},
    {"tool_calls": [{"name": "finish", "args": {"summary": "edited under dev"}}]},
]


def test_dockyard_dev_pushes_the_branch_of_a_task(tmp_path):
    """The whole path on one machine: `dockyard dev --allow-file-repos` with DOCKYARD_GIT_CREDENTIALS_DIR, a task
    with repo.push, a scripted agent that edits; the origin gains the branch and result.json names it."""
    import httpx
    import yaml

    from functions.cli import client
    from tests.dev_process import DevServer

    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "--quiet", "--initial-branch=main")
    (origin / "README.md").write_text("hello\n")
    git(origin, "add", "--all")
    git(origin, "commit", "--quiet", "-m", "base")
    base = git(origin, "rev-parse", "HEAD").strip()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "edit.yaml").write_text(yaml.safe_dump(SCRIPT))
    secrets = tmp_path / "git-credentials"
    secrets.mkdir()
    dev = DevServer(tmp_path / "data", env={"DOCKYARD_SCRIPTS_DIR": str(scripts), "DOCKYARD_GIT_CREDENTIALS_DIR": str(secrets)},
                    args=("--allow-file-repos",))
    try:
        dev.start()
        task = {"task_id": "push-me", "prompt": "edit", "model": "scripted:edit",
                "repo": {"url": origin.as_uri(), "push": {"branch": "from-dev"}}}
        client.submit_task(dev.url, task, dev.token)
        stored = dev.data_dir / "store" / contract.final_result_key("push-me")

        def finished() -> dict | None:
            record = httpx.get(f"{dev.url}/api/tasks/push-me", headers=dev.headers, timeout=5).json()
            return record if record.get("state") in contract.TERMINAL_STATES and stored.exists() else None

        record = eventually(finished, "task push-me to finish with its final set stored", 120, detail=dev.output)
        assert record["outcome"] == contract.OUTCOME_DONE, record
        result = json.loads(stored.read_text())
        assert result["push"] == {"branch": "from-dev", "commit": git(origin, "rev-parse", "from-dev").strip(),
                                  "remote": origin.as_uri()}, result
        assert git(origin, "rev-parse", "from-dev^").strip() == base
        assert git(origin, "show", "from-dev:README.md") == "hello\nfrom dev\n"
        assert git(origin, "show", "from-dev:added.txt") == "added\n"
        logs = dev.data_dir / "tasks" / "push-me" / "logs"
        assert str(secrets) not in (logs / "agent.log").read_text()
        assert "push=from-dev" in (logs / "snapshotter.log").read_text()
    finally:
        dev.stop()
