"""The git credentials of `repo.push` reach the finalizer (the snapshotter) only, never the agent.

Threat: whatever the agent runs is hostile. The credentials could push anywhere the operator's account
may, so they must stay out of the agent container (Kubernetes, podman) and out of the agent's sandbox
(`dockyard dev`): the rendered Job mounts the Secret into the snapshotter alone, the podman plan binds
its files into the snapshotter alone, the local runtime gives the directory to the snapshotter's command
line alone, and a command in the bubblewrap sandbox cannot open the file (while without the sandbox it
can: the test can fail). How the finalizer keeps the agent's git config from running is
tests/agent/test_push.py (test_the_agents_git_config_and_hooks_never_run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sandbox import Sandbox, SandboxUnavailable, check
from agent.tools import WorkTools
from functions.core import factory
from functions.core.git_push import GIT_SECRETS_DIR
from functions.core.settings import Settings
from functions.core.task import parse_task
from functions.runtime.local.processes import AgentCommand
from functions.runtime.local.state import TaskFolder
from functions.runtime.podman.translate import plan

CANARY = "git-token-canary-51d3"
SECRET = "dockyard-git-push"
PUSH = {"url": "https://git.example.org/team/repo.git", "push": {"branch": "dockyard/out"}}


def _task(repo: dict | None = PUSH, task_id: str = "pusher"):
    return parse_task({"prompt": "p", "task_id": task_id, **({"repo": repo} if repo else {})}, source="test", event_id="e")


def _settings() -> Settings:
    return Settings(store="s3://bucket/p", s3_endpoint="http://10.0.2.2:9000", egress_proxy="http://10.0.2.2:3128")


def _containers(job: dict) -> dict[str, dict]:
    spec = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


def _git_volumes(job: dict) -> set[str]:
    return {v["name"] for v in job["spec"]["template"]["spec"]["volumes"] if v.get("secret", {}).get("secretName") == SECRET}


def test_the_job_mounts_the_git_secret_into_the_snapshotter_only():
    job = factory.render_job(_task(), _settings())
    volumes = _git_volumes(job)
    assert volumes == {"git-credentials"}
    mounted = {name for name, c in _containers(job).items() if any(m["name"] in volumes for m in c["volumeMounts"])}
    assert mounted == {factory.CONTAINER_SNAPSHOTTER}
    snapshotter = _containers(job)[factory.CONTAINER_SNAPSHOTTER]
    mount = next(m for m in snapshotter["volumeMounts"] if m["name"] == "git-credentials")
    assert mount == {"name": "git-credentials", "mountPath": GIT_SECRETS_DIR, "readOnly": True}
    args = snapshotter["args"]
    assert args[args.index("--git-credentials-dir") + 1] == GIT_SECRETS_DIR
    assert args[args.index("--push-url") + 1] == PUSH["url"] and args[args.index("--push-branch") + 1] == "dockyard/out"
    # git's way out is the egress proxy, given to the push alone (the snapshotter's S3 and NATS stay direct).
    assert args[args.index("--push-proxy") + 1] == "http://10.0.2.2:3128"
    assert not {e["name"] for e in snapshotter["env"]} & {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"}
    # No other container hears of it: not in an argument, an env value or a mount path.
    for name, container in _containers(job).items():
        if name != factory.CONTAINER_SNAPSHOTTER:
            text = repr([container.get("args"), container.get("env"), container["volumeMounts"]])
            assert GIT_SECRETS_DIR not in text and SECRET not in text, name
    # Optional: a cluster without the Secret still runs the task (the push then ends in push_error).
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "git-credentials")
    assert volume["secret"]["optional"] is True


def test_a_task_that_does_not_push_mounts_no_git_secret():
    for repo in (None, {"url": "https://git.example.org/team/repo.git"}):
        job = factory.render_job(_task(repo), _settings())
        assert _git_volumes(job) == set()
        assert "--push-url" not in _containers(job)[factory.CONTAINER_SNAPSHOTTER]["args"]


def test_the_podman_pod_binds_the_git_files_into_the_snapshotter_only(tmp_path):
    settings = _settings()
    manifests = factory.render(_task(), settings, "uid-1")
    secrets = {settings.object_store_secret: {"access_key_id": b"a"}, SECRET: {"password": CANARY.encode()}}
    p = plan(manifests, secrets, workspace_dir=str(tmp_path / "ws"), files_dir=str(tmp_path / "pod"), network="none")
    files = [f for f in p.files if f.data == CANARY.encode()]
    assert [(f.volume, f.path) for f in files] == [("git-credentials", "password")]
    source = f"src={tmp_path / 'pod'}/git-credentials,"
    binding = {c.name for c in p.containers if any(source in a for a in c.args)}
    assert binding == {factory.CONTAINER_SNAPSHOTTER}


def test_the_local_runtime_gives_the_directory_to_the_snapshotter_only(tmp_path):
    command = AgentCommand(("python", "-m", "agent"), "file:///store", git_credentials_dir=str(tmp_path / "git"))
    folder = TaskFolder(tmp_path / "tasks" / "pusher")
    task = parse_task({"prompt": "p", "task_id": "pusher", "repo": {"url": "file:///srv/repo.git", "push": {}}},
                      source="test", event_id="e", allow_file_repos=True)
    lines = {role: command.line(task, role, folder) for role in ("restore", "agent", "snapshotter")}
    holding = {role for role, line in lines.items() if str(tmp_path / "git") in " ".join(line)}
    assert holding == {"snapshotter"}
    assert lines["snapshotter"][-4:] == ["--push-url", "file:///srv/repo.git", "--git-credentials-dir", str(tmp_path / "git")]
    # Without repo.push, not even the snapshotter gets it.
    plain = _task({"url": "https://git.example.org/team/repo.git"})
    assert "--git-credentials-dir" not in command.line(plain, "snapshotter", folder)


@pytest.fixture
def credentials(tmp_path) -> Path:
    """The credentials where `dockyard dev` is told to find them (DOCKYARD_GIT_CREDENTIALS_DIR), outside the task."""
    directory = tmp_path / "config" / "git-push"
    directory.mkdir(parents=True, mode=0o700)
    (directory / "password").write_text(CANARY + "\n")
    return directory


@pytest.mark.parametrize("sandboxed", [True, False], ids=["bwrap", "unsafe-host"])
def test_a_command_in_the_agents_sandbox_cannot_read_the_credentials(tmp_path, credentials, sandboxed):
    try:
        check(egress=False)
    except SandboxUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI must run the sandbox tests: scripts/install-test-packages)")
        pytest.skip(str(exc))
    task = tmp_path / "tasks" / "pusher"
    (task / "workspace" / ".dockyard").mkdir(parents=True)
    (task / "home").mkdir()
    sandbox = Sandbox(task / "workspace", task / "home") if sandboxed else None
    tools = WorkTools(task / "workspace", task / "home", sandbox=sandbox, default_timeout=30)

    output = tools.execute(f"cat {credentials / 'password'}; ls -la {credentials}; grep -r {CANARY} {tmp_path} 2>/dev/null")

    assert (CANARY in output) is not sandboxed, output
