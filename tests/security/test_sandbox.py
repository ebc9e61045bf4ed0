"""The local sandbox attacked from inside `execute`: each boundary of agent/sandbox.py, and that each
attack works without it.

Threat: whatever `execute` runs is hostile (a README's prompt injection is enough). Under `dockyard
dev` it must not read another task's workspace, the data dir, the secrets (a task's NATS creds, the
model key), another process's environment, see the host's processes, reach any address but the egress
proxy, forge the agent's result, or leave a process behind.

Every attack runs through the real `WorkTools` twice: with the bubblewrap sandbox and the real egress
proxy (Squid with the cluster's config, functions/devstack/egress_proxy.py) it must fail; with
`unsafe-host` (`dockyard dev --unsafe-no-sandbox`) the same command must succeed, so each test is
shown to be able to fail. Survivors are the exception: outside a sandbox the agent's process group
and subreaper end them too, so their control is a plain `bash -c`. The last test runs `dockyard dev`
itself with a scripted model whose command attacks.

Squid runs as in tests/manifests/test_egress.py: the allowed test server listens on 127.0.0.5 and a
`hosts_file` names it `allowed.test`; the deny range 127.0.0.0/8 narrows to 127.0.0.1/32, so the
loopback address the attacks aim at stays refused.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from agent.procs import pid_alive
from agent.sandbox import PROXY_URL, Sandbox, SandboxUnavailable, check
from agent.tools import WorkTools
from functions.core import egress
from functions.devstack.egress_proxy import EgressProxy, squid_binary
from tests.conftest import eventually

pytestmark = pytest.mark.xdist_group("squid")

ALLOWED_ADDRESS = "127.0.0.5"
SANDBOXED, UNSAFE = "bwrap", "unsafe-host"
MODES = (SANDBOXED, UNSAFE)
CANARY = "dockyard-canary-7c1e"


def _require_sandbox() -> None:
    try:
        check(egress=True)
        if squid_binary() is None:
            raise SandboxUnavailable("squid is not installed")
    except SandboxUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI must run the sandbox tests: scripts/install-test-packages)")
        pytest.skip(str(exc))


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"allowed-{CANARY}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def proxy():
    _require_sandbox()
    server = http.server.ThreadingHTTPServer((ALLOWED_ADDRESS, 0), _Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]
    workdir = Path(tempfile.mkdtemp(prefix="dockyard-sandbox-test-"))
    workdir.chmod(0o755)  # Squid reads the hosts file after switching to its own user
    (workdir / "hosts").write_text(f"{ALLOWED_ADDRESS} allowed.test\n")
    (workdir / "hosts").chmod(0o644)
    egress_proxy = EgressProxy(
        workdir / "egress",
        [".allowed.test"],
        extra_conf=f"hosts_file {workdir / 'hosts'}\ndns_nameservers 127.0.0.1\ntcp_outgoing_address 127.0.0.1\n",
        deny_ranges=tuple(r for r in egress.DENY_RANGES if r != "127.0.0.0/8") + ("127.0.0.1/32",),
        safe_ports=(80, port),
        ssl_ports=(port,),
    )
    try:
        yield egress_proxy.start(), port
    finally:
        egress_proxy.stop()
        server.shutdown()
        server.server_close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A dev data dir as the local runtime lays it out: this task, a victim task, the secrets."""
    data = tmp_path / "data"
    for task in ("me", "victim"):
        (data / "tasks" / task / "workspace" / ".dockyard").mkdir(parents=True)
        (data / "tasks" / task / "home").mkdir()
        (data / "tasks" / task / "secrets").mkdir(mode=0o700)
        (data / "tasks" / task / "secrets" / "nats-agent.creds").write_text(f"creds-{CANARY}\n")
    (data / "tasks" / "victim" / "workspace" / "notes.txt").write_text(f"victim-{CANARY}\n")
    (data / "secrets" / "model").mkdir(parents=True)
    (data / "secrets" / "model" / "api_key").write_text(f"key-{CANARY}\n")
    (data / "api-token").write_text(f"token-{CANARY}\n")
    return data


@pytest.fixture
def make_tools(proxy, data_dir):
    egress_proxy, _ = proxy

    def make(mode: str) -> WorkTools:
        task = data_dir / "tasks" / "me"
        sandbox = Sandbox(task / "workspace", task / "home", egress_proxy.socket) if mode == SANDBOXED else None
        return WorkTools(task / "workspace", task / "home", sandbox=sandbox, default_timeout=30)

    return make


def _leaks(tools: WorkTools, command: str) -> bool:
    return CANARY in tools.execute(command)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "target",
    [
        "tasks/victim/workspace/notes.txt",  # another task's workspace
        "tasks/victim/secrets/nats-agent.creds",  # another task's NATS user
        "tasks/me/secrets/nats-agent.creds",  # its own NATS user: the agent's, not its commands'
        "secrets/model/api_key",  # the model key
        "api-token",  # the data dir: the dev stack's API token
    ],
)
def test_files_outside_the_workspace_cannot_be_read(make_tools, data_dir, mode, target):
    assert _leaks(make_tools(mode), f"cat {data_dir / target}; ls -R {data_dir}") == (mode == UNSAFE)


@pytest.mark.parametrize("mode", MODES)
def test_the_checkout_and_the_users_home_are_invisible(make_tools, mode):
    home = Path(os.path.expanduser("~"))
    output = make_tools(mode).execute(f"ls -a {home}; cat {Path(__file__).resolve()}")
    assert ("_require_sandbox" in output) == (mode == UNSAFE)


@pytest.mark.parametrize("mode", MODES)
def test_another_process_environment_and_the_host_processes_are_invisible(make_tools, mode):
    """The dev process's /proc/<pid>/environ held a DB password once (issue 10)."""
    victim = subprocess.Popen(["sleep", "600"], env={"PATH": "/usr/bin:/bin", "DB_PASSWORD": f"pw-{CANARY}"})
    try:
        tools = make_tools(mode)
        assert _leaks(tools, f"tr '\\0' '\\n' < /proc/{victim.pid}/environ; tr '\\0' '\\n' < /proc/$PPID/environ") == (mode == UNSAFE)
        assert _leaks(tools, f"ps -eo pid= | tr -d ' ' | grep -qx {victim.pid} && echo seen-{CANARY}") == (mode == UNSAFE)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", MODES)
def test_the_agents_own_state_cannot_be_forged(make_tools, data_dir, mode):
    result = data_dir / "tasks" / "me" / "workspace" / ".dockyard" / "result.json"
    make_tools(mode).execute(f"echo '{{\"outcome\": \"done\"}}' > {result}")
    assert result.exists() == (mode == UNSAFE)


@pytest.mark.parametrize("mode", MODES)
def test_no_address_but_the_proxy_is_reachable(make_tools, proxy, mode):
    """A loopback port of this machine (think: the dev stack's API, NATS) directly, and through the proxy."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        direct = make_tools(mode).execute(
            f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected-{CANARY}')\"")
        assert (CANARY in direct) == (mode == UNSAFE), direct
        if mode == SANDBOXED:  # and the proxy refuses loopback, whatever the name
            proxied = f"u.build_opener(u.ProxyHandler({{'http': '{PROXY_URL}'}})).open('http://127.0.0.1:{port}/')"
            via = make_tools(mode).execute(f"NO_PROXY= no_proxy= python3 -c \"import urllib.request as u; {proxied}\" 2>&1 | tail -1")
            assert "403" in via, via
    finally:
        listener.close()


def test_an_allowed_host_works_through_the_proxy_and_others_are_refused(make_tools, proxy):
    _, port = proxy
    tools = make_tools(SANDBOXED)
    fetch = "python3 -c \"import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).read().decode())\" {} 2>&1 | tail -1"
    assert f"allowed-{CANARY}" in tools.execute(fetch.format(f"http://allowed.test:{port}/"))
    assert "403" in tools.execute(fetch.format(f"http://blocked.test:{port}/"))
    assert "403" in tools.execute(fetch.format(f"http://{ALLOWED_ADDRESS}:{port}/"))  # an address, not an allowed name


SURVIVORS = {
    "nohup": "nohup bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 &",
    "setsid": "setsid bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 &",
    "double fork": "( (bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 &) & )",
}


def _running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().split(b"\0")[0] == marker.encode() and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("how", SURVIVORS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_nothing_the_command_started_survives_it(make_tools, how, mode, ending):
    marker = f"survivor-{os.getpid()}-{how.replace(' ', '-')}-{mode}-{ending}"
    command = SURVIVORS[how].format(marker=marker) + ("\nsleep 600" if ending == "timeout" else "")
    try:
        output = make_tools(mode).execute(command, timeout_seconds=1 if ending == "timeout" else 30)
        assert ("timed out" in output) == (ending == "timeout"), output
        assert _running(marker) == [], f"{how} survived {mode}"
    finally:
        for pid in _running(marker):
            os.kill(pid, 9)


@pytest.mark.parametrize("how", SURVIVORS)
def test_the_survivors_survive_a_plain_shell(how):
    """The control of the test above: without dockyard's handling, each of them outlives its command."""
    marker = f"survivor-{os.getpid()}-{how.replace(' ', '-')}-control"
    try:
        subprocess.run(["bash", "-c", SURVIVORS[how].format(marker=marker)], timeout=30, start_new_session=True)
        assert eventually(lambda: _running(marker), f"the {how} survivor of a plain shell")
    finally:
        for pid in _running(marker):
            os.kill(pid, 9)


def test_git_clone_runs_in_the_sandbox(make_tools, data_dir, tmp_path):
    """git clone uses `WorkTools.wrap`: a file:// origin is shown read-only, nothing else is."""
    from agent.run import clone_repo

    origin = tmp_path / "origin"
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    (origin / "README").write_text("hello\n")
    (origin / ".git" / "hooks" / "post-checkout").write_text(f"#!/bin/sh\ncat {data_dir / 'api-token'} > leaked 2>&1\n")
    (origin / ".git" / "hooks" / "post-checkout").chmod(0o755)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "-C", str(origin), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(origin), "commit", "-qm", "init"], check=True, env=env)
    tools = make_tools(SANDBOXED)
    workspace = data_dir / "tasks" / "me" / "workspace"
    clone_repo({"url": origin.as_uri()}, workspace, tools.environment(), allow_file=True, wrap=tools.wrap)
    assert (workspace / "repo" / "README").read_text() == "hello\n"
    argv, _ = tools.wrap(["git", "--version"], workspace)
    assert argv[0].endswith("bwrap")


# --- under `dockyard dev` ---------------------------------------------------------------------------


ATTACK = """\
- tool_calls:
    - name: plan
      args: {{todos: ["attack"], objective: "attack"}}
- tool_calls:
    - name: execute
      args:
        command: |
          for f in {data}/api-token {data}/nats-auth/creds/admin.creds {data}/tasks/*/secrets/*; do cat "$f"; done > leak.txt 2>&1
          tr '\\0' '\\n' < /proc/{dev_pid}/environ >> leak.txt 2>&1
          ps -eo pid,args >> leak.txt 2>&1
          nohup bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 &
          setsid bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 &
          mv leak.txt leak.done
- tool_calls:
    - name: execute
      args: {{command: "while [ ! -e read.done ]; do sleep 0.05; done", timeout_seconds: 120}}
- content: "attacked"
- tool_calls:
    - name: finish
      args: {{summary: attacked}}
"""


@pytest.mark.parametrize("unsafe", [False, True], ids=["sandbox", "unsafe-no-sandbox"])
def test_a_task_under_dockyard_dev_reads_nothing_of_the_stack(tmp_path, unsafe):
    """The real stack: dev's data dir (its token, the NATS admin creds, the tasks' creds), dev's
    own environment (a fake DB password) and its processes, from a scripted model's command."""
    from functions.cli import client
    from tests.dev_process import DevServer

    _require_sandbox()
    data, scripts = tmp_path / "data", tmp_path / "scripts"
    scripts.mkdir()
    marker = f"survivor-{os.getpid()}-dev-{unsafe}"
    dev = DevServer(data, env={"DOCKYARD_SCRIPTS_DIR": str(scripts), "DB_PASSWORD": f"pw-{CANARY}"},
                    args=("--unsafe-no-sandbox",) if unsafe else ())
    try:
        dev.start()
        (scripts / "attack.yaml").write_text(ATTACK.format(data=data.resolve(), dev_pid=dev.proc.pid, marker=marker))
        task_id = client.submit_task(dev.url, {"prompt": "attack", "model": "scripted:attack", "task_id": "attacker"}, dev.token)
        workspace = data / "tasks" / task_id / "workspace"
        eventually(lambda: (workspace / "leak.done").exists(), "the attack to run", 120, detail=dev.output)
        leak = (workspace / "leak.done").read_text()
        (workspace / "read.done").touch()  # the next command waits for it: the finished task's workspace is gone
        state = eventually(lambda: (s := dev.supervisor_state(task_id)).get("finished_at") and s, "the task to finish", 120)
        assert state["outcome"] == "done", dev.output()
        assert (CANARY in leak) == unsafe, leak  # dev's environment
        assert (dev.token in leak) == unsafe, leak
        assert ("BEGIN NATS USER JWT" in leak) == unsafe, leak  # the NATS admin's and the tasks' creds
        assert ("functions.cli" in leak) == unsafe, leak  # dev's process
        assert ("sandbox   bubblewrap" in dev.output()) != unsafe
        agent_log = (data / "tasks" / task_id / "logs" / "agent.log").read_text()
        assert ("UNSAFE: no sandbox" in agent_log) == unsafe
        assert _running(marker) == []
    finally:
        for pid in _running(marker):
            os.kill(pid, 9)
        dev.stop()


def test_dev_refuses_to_run_tasks_without_bubblewrap(tmp_path):
    """No bwrap on the PATH: dev exits 2 before it starts anything, and says how to go on."""
    from tests.conftest import agent_environment, free_port

    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("squid", "socat", "git"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    env = agent_environment({"PATH": f"{Path(sys.executable).parent}:{tools}"})
    done = subprocess.run([sys.executable, "-m", "functions.cli", "dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to run tasks" in done.stderr and "apt-get install bubblewrap" in done.stderr and "--unsafe-no-sandbox" in done.stderr
