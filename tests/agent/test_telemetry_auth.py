"""NATS credentials for the agent's processes, against real nats-servers that demand them.

Three servers: user:password / token in the URL, an nkey user
(`authorization { users = [{nkey: U...}] }`), and operator (JWT) mode with a
memory resolver. Keys, JWTs and `.creds` files come from the product's own
`functions.core.nats_jwt` and the trust chain of `functions.devstack.nats_auth`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import nats
import nkeys
import pytest

from agent import contract
from agent.redact import REPLACEMENT, Redactor
from agent.run import main as run_main
from agent.telemetry import CredentialsError, NatsAuth, Telemetry
from agent.telemetry.connection import public_url
from functions.core.nats_jwt import ADMIN, Key, write_secret_file
from functions.devstack import nats_auth
from tests.conftest import NatsServer, eventually, nats_server_binary, wait_for_port
from tests.agent.agent_stream import read_stream

TASK = "t-auth"
EXAMPLE_TASK = Path(__file__).resolve().parents[2] / "agent" / "examples" / "example_task.json"
# --- keys and credentials: the product's own (functions.core.nats_jwt, functions.devstack.nats_auth) ---

def new_key(prefix: int) -> tuple[str, str]:
    """(seed, public key) of a fresh nkey with the given role prefix."""
    key = Key.new(prefix)
    return key.seed, key.public


class Operator:
    """A trust chain (operator, system account, JetStream accounts) and a user of its own account."""

    def __init__(self, directory: Path):
        self.chain = nats_auth.ensure(directory)
        self.config = self.chain.server_conf.read_text()

    def user_creds(self, path: Path, name: str = "agent") -> Path:
        return write_secret_file(path, self.chain.issuer().creds(name, ADMIN))


class ConfiguredNatsServer(NatsServer):
    """A JetStream nats-server started from a configuration file (for its authorization block)."""

    def __init__(self, store_dir: Path, config: str):
        super().__init__(store_dir)
        store_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = store_dir / "server.conf"
        self.config_file.write_text(
            f"listen: 127.0.0.1:{self.port}\njetstream {{ store_dir: {json.dumps(str(store_dir / 'js'))} }}\n{config}")
        self.log_file = store_dir / "server.log"

    def start(self) -> "ConfiguredNatsServer":
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.config_file)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        return self


@pytest.fixture
def server_factory(tmp_path):
    started: list[ConfiguredNatsServer] = []

    def start(config: str) -> ConfiguredNatsServer:
        server = ConfiguredNatsServer(tmp_path / f"nats{len(started)}", config).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def nkey_server(server_factory, tmp_path):
    """A server that knows one user by its nkey; returns (server, that user's seed file)."""
    seed, public = new_key(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "agent.nk"
    seed_file.write_text(seed + "\n")
    return server_factory(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n'), seed_file


@pytest.fixture
def jwt_server(server_factory, tmp_path):
    """A server in operator mode; returns (server, the Operator that signs users)."""
    operator = Operator(tmp_path / "chain")
    return server_factory(operator.config), operator


# --- helpers ------------------------------------------------------------------

def request(url: str, subject: str, body: dict, **connect) -> dict | None:
    async def main():
        nc = await nats.connect(url, **connect)
        try:
            return json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=2)).data)
        except nats.errors.NoRespondersError:
            return None
        finally:
            await nc.close()

    return asyncio.run(main())


def refused_without_credentials(url: str) -> bool:
    async def main():
        try:
            nc = await nats.connect(public_url(url), allow_reconnect=False, max_reconnect_attempts=1,
                                    error_cb=_quiet)
        except nats.errors.Error as exc:
            return "Authorization Violation" in str(exc)
        await nc.close()
        return False

    return asyncio.run(main())


async def _quiet(exc: Exception) -> None:
    pass


def publish_and_command(url: str, auth: NatsAuth) -> None:
    """Events in order, and a command answered, through a server that demands `auth`."""
    assert refused_without_credentials(url)
    tel = Telemetry(TASK, url, auth=auth)
    tel.on_command(lambda req: {"ok": True, "op": req.get("op")})
    tel.start()
    for i in range(20):
        tel.event(contract.EV_TOOL, step=i)
    opts = auth.connect_options()
    assert eventually(lambda: request(url, contract.subject_cmd(TASK), {"op": "status"}, **opts),
                      "an answer on the command subject") == {"ok": True, "op": "status"}
    tel.close()
    assert tel.published == 20 and tel.written_stdout == 0 and tel.last_error is None
    assert [body["step"] for _, body, _ in read_stream(url, **opts)] == list(range(20))


# --- the three ways to authenticate ------------------------------------------

@pytest.mark.parametrize("kind", ["password", "token"])
def test_user_info_in_the_url(server_factory, kind):
    if kind == "password":
        server = server_factory('authorization { user: "agent", password: "s3cret-pass" }\n')
        url = f"nats://agent:s3cret-pass@127.0.0.1:{server.port}"
    else:
        server = server_factory('authorization { token: "s3cret-token" }\n')
        url = f"nats://s3cret-token@127.0.0.1:{server.port}"
    publish_and_command(url, NatsAuth())


def test_nkey_seed_file(nkey_server):
    server, seed_file = nkey_server
    publish_and_command(server.url, NatsAuth.load(nkey_file=str(seed_file)))


def test_jwt_creds_file_in_operator_mode(jwt_server, tmp_path):
    server, operator = jwt_server
    creds = operator.user_creds(tmp_path / "agent.creds")
    publish_and_command(server.url, NatsAuth.load(creds_file=str(creds)))


def test_rejected_credentials_keep_the_trace_on_stdout(jwt_server, tmp_path, capsys):
    server, _ = jwt_server
    stranger = Operator(tmp_path / "other-chain").user_creds(tmp_path / "stranger.creds")  # an account the server does not know
    tel = Telemetry(TASK, server.url, auth=NatsAuth.load(creds_file=str(stranger))).start()
    tel.event(contract.EV_STATUS, step=0)
    eventually(lambda: tel.last_error and "Authorization Violation" in tel.last_error, "the server's refusal")
    tel.close(timeout=2)
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [0]
    assert tel.published == 0 and not tel.connected


# --- checked at start ---------------------------------------------------------

def test_credentials_files_are_checked_at_start(tmp_path, jwt_server):
    _, operator = jwt_server
    creds = operator.user_creds(tmp_path / "ok.creds")
    user_seed, _ = new_key(nkeys.PREFIX_BYTE_USER)
    account_seed, _ = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    (tmp_path / "user.nk").write_text(user_seed)
    (tmp_path / "account.nk").write_text(account_seed)
    (tmp_path / "garbage.nk").write_text("SUNOTASEED\n")
    (tmp_path / "no-jwt.creds").write_text(creds.read_text().replace("BEGIN NATS USER JWT", "BEGIN SOMETHING"))
    (tmp_path / "no-seed.creds").write_text(creds.read_text().replace("BEGIN USER NKEY SEED", "BEGIN SOMETHING"))

    assert NatsAuth.load(creds_file=str(creds)).connect_options() == {"user_credentials": str(creds)}
    assert NatsAuth.load(nkey_file=str(tmp_path / "user.nk")).connect_options() == {"nkeys_seed": str(tmp_path / "user.nk")}
    assert NatsAuth.load().connect_options() == {}
    for kwargs, words in [
        ({"creds_file": str(tmp_path / "missing.creds")}, ["--nats-creds", "missing.creds"]),
        ({"creds_file": str(tmp_path / "no-jwt.creds")}, ["--nats-creds", "no user JWT"]),
        ({"creds_file": str(tmp_path / "no-seed.creds")}, ["--nats-creds", "no seed"]),
        ({"nkey_file": str(tmp_path / "garbage.nk")}, ["--nats-nkey", "not an nkey seed"]),
        ({"nkey_file": str(tmp_path / "account.nk")}, ["--nats-nkey", "not a user nkey"]),
        ({"creds_file": str(creds), "nkey_file": str(tmp_path / "user.nk")}, ["--nats-creds and --nats-nkey"]),
    ]:
        with pytest.raises(CredentialsError) as caught:
            NatsAuth.load(**kwargs)
        assert all(word in str(caught.value) for word in words), (kwargs, str(caught.value))
        assert user_seed not in str(caught.value) and account_seed not in str(caught.value)


def test_agent_run_with_a_bad_credentials_file_is_fatal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DOCKYARD_NATS_NKEY", raising=False)
    monkeypatch.setenv("DOCKYARD_NATS_CREDS", str(tmp_path / "absent.creds"))  # the environment fallback
    code = run_main(["--task-id", "t-bad-creds", "--workspace", str(tmp_path / "ws"),
                     "--task-file", str(EXAMPLE_TASK), "--nats", "nats://127.0.0.1:4222"])
    assert code == contract.EXIT_FATAL
    assert "--nats-creds" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()  # refused before anything was done


# --- the agent's processes ----------------------------------------------------

def test_agent_run_publishes_its_trace_with_a_creds_file(jwt_server, tmp_path, agent_env):
    server, operator = jwt_server
    creds = operator.user_creds(tmp_path / "agent.creds")
    secret_lines = [line for line in creds.read_text().splitlines() if line.startswith(("eyJ", "SU"))]
    workspace = tmp_path / "ws"
    env = dict(agent_env, DOCKYARD_NATS_CREDS=str(creds))
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--task-id", TASK, "--workspace", str(workspace),
         "--task-file", str(EXAMPLE_TASK), "--model", "scripted:example", "--home", str(tmp_path / "home"),
         "--secrets-dir", str(tmp_path / "secrets"), "--nats", server.url],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("{")]  # all of it went to NATS
    messages = read_stream(server.url, user_credentials=str(creds))
    events = [body for subject, body, _ in messages if subject == contract.subject_events(TASK)]
    assert (events[0]["type"], events[0]["state"]) == ("status", contract.STATE_STARTED)
    assert (events[-1]["type"], events[-1]["state"]) == ("status", contract.STATE_FINISHED)
    assert any(subject == contract.subject_logs(TASK) for subject, _, _ in messages)
    raw = json.dumps(messages)
    assert len(secret_lines) == 2 and not any(line in raw for line in secret_lines)


def test_the_run_redacts_its_credentials(tmp_path):
    """What run.py builds: the secrets directory plus every line of the credentials file."""
    seed, _ = new_key(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "agent.nk"
    seed_file.write_text(seed + "\n")
    auth = NatsAuth.load(nkey_file=str(seed_file))
    redactor = Redactor.from_secrets_dir(tmp_path / "no-secrets-dir", extra_file=auth.secrets_file)
    assert redactor.redact(f"connecting with {seed}") == f"connecting with {REPLACEMENT}"


def test_snapshotter_answers_with_an_nkey(nkey_server, tmp_path, agent_env):
    server, seed_file = nkey_server
    workspace = tmp_path / "ws"
    workspace.mkdir()
    env = dict(agent_env, DOCKYARD_TASK_ID=TASK, DOCKYARD_WORKSPACE=str(workspace),
               DOCKYARD_STORE=(tmp_path / "store").as_uri(), DOCKYARD_NATS_URL=server.url,
               DOCKYARD_NATS_NKEY=str(seed_file))
    log = tmp_path / "snapshotter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "snapshotter"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        reply = eventually(lambda: request(server.url, contract.subject_cmd(TASK), {"op": "snapshot"},
                                           nkeys_seed=str(seed_file)), "the snapshotter's answer")
        assert reply == {"ok": False, "error": "no checkpoint yet"}
        assert f"(nkey {seed_file})" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
