"""`dockyard nats-auth init`: the trust chain, the Helm values and config-nats it writes, judged by real nats-servers.

One server runs from the generated server.conf; another from the Helm values'
`config.merge` alone, written as the JSON the chart renders it to (nats.conf
accepts JSON), so the values file is known to configure operator mode on its own.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from agent import contract
from functions.cli import main as cli
from functions.cli import nats_auth
from functions.core.nats_jwt import Issuer, decode_claims
from functions.devstack.nats_auth import ensure
from tests.conftest import eventually, free_port, nats_server_binary, port_open


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(directory, printed output) of one `dockyard nats-auth init --out DIR`."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("cluster") / "nats-auth"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(["nats-auth", "init", "--out", str(out_dir)]) == 0
    return out_dir, buffer.getvalue()


@contextmanager
def nats_server_from(conf: Path, store: Path):
    port = free_port()
    log = store / "server.log"
    with open(log, "ab") as stderr:
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nats-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            return port_open(port)

        eventually(listening, f"nats-server from {conf.name} listening")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


async def _works_as_the_chain_says(url: str, directory: Path) -> None:
    """functions.creds connects and creates the stream; a task's user minted with the signing key publishes
    on its own subject only; the eventing user lives in another account and sees none of it."""
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    from functions.core.bus import ensure_stream

    functions = await nats.connect(url, user_credentials=str(directory / "creds" / "functions.creds"))
    await ensure_stream(functions.jetstream())  # as the functions do before any launch

    issuer = Issuer.load((directory / "account.pub").read_text().strip(), directory / "signing-key.nk")
    creds = directory / "task.creds"
    creds.write_text(issuer.task_creds("t1", "agent"))
    agent = await nats.connect(url, user_credentials=str(creds), inbox_prefix=contract.inbox_prefix("t1"))
    eventing = await nats.connect(url, user_credentials=str(directory / "creds" / "eventing.creds"))
    admin = await nats.connect(url, user_credentials=str(directory / "creds" / "admin.creds"))
    try:
        ack = await agent.jetstream().publish(contract.subject_events("t1"), b"hello", timeout=2)
        assert ack.stream == contract.STREAM_NAME
        with pytest.raises(NatsTimeout):
            await agent.jetstream().publish(contract.subject_events("t2"), b"forged", timeout=0.5)
        # EVENTING is another account: its publish on a dockyard subject reaches no DOCKYARD subscriber.
        watcher = await admin.subscribe("events.agent.>")
        await admin.flush()
        await eventing.publish(contract.subject_events("t1"), b"from eventing")
        await eventing.flush()
        await agent.publish(contract.subject_events("t1"), b"from the agent")
        await agent.flush()
        message = await watcher.next_msg(timeout=2)  # the first to arrive is the agent's, not eventing's
        assert (message.subject, message.data) == (contract.subject_events("t1"), b"from the agent")
        info = await admin.jetstream().stream_info(contract.STREAM_NAME, subjects_filter=">")
        assert info.state.subjects == {contract.subject_events("t1"): 2}  # "hello" and "from the agent"
    finally:
        for nc in (functions, agent, eventing, admin):
            await nc.close()


async def test_the_generated_server_conf_runs_nats_in_operator_mode(made, tmp_path):
    directory, _ = made
    with nats_server_from(directory / "server.conf", tmp_path) as url:
        await _works_as_the_chain_says(url, directory)


async def test_the_helm_values_alone_configure_the_same_server(made, tmp_path):
    directory, _ = made
    values = yaml.safe_load((directory / nats_auth.VALUES_FILE).read_text())
    merge = values["config"]["merge"]
    auth = ensure(directory)
    assert set(merge) == {"operator", "system_account", "resolver", "resolver_preload"}
    assert merge["resolver"] == "MEMORY" and merge["system_account"] == auth.system_account
    assert set(merge["resolver_preload"]) == {auth.system_account, auth.account, auth.eventing_account}
    assert decode_claims(merge["operator"])["nats"] == {"type": "operator", "system_account": auth.system_account, "version": 2}
    assert values["config"]["leafnodes"] == {"enabled": True, "port": 7422}  # the agent pods' nats-leaf sidecars
    assert values["natsBox"] == {"contexts": {"default": {"creds": {"secretName": "dockyard-nats-admin", "key": "nats.creds"}}}}
    # The chart renders config.merge as JSON into nats.conf: run nats-server on exactly that.
    conf = tmp_path / "nats.conf"
    conf.write_text(json.dumps(merge))
    with nats_server_from(conf, tmp_path) as url:
        await _works_as_the_chain_says(url, directory)


def test_config_nats_points_eventing_natss_at_its_secret(made):
    directory, _ = made
    (configmap,) = yaml.safe_load_all((directory / nats_auth.CONFIG_NATS_FILE).read_text())
    assert (configmap["kind"], configmap["metadata"]) == ("ConfigMap", {"name": "config-nats", "namespace": "knative-eventing"})
    eventing_nats = yaml.safe_load(configmap["data"]["eventing-nats"])
    assert eventing_nats["url"] == "nats://nats.nats-io.svc.cluster.local:4222"
    # eventing-natss: pkg/common/config/eventingnatsconfig.go (auth.credentialFile.secret, a SecretKeySelector).
    assert eventing_nats["auth"] == {"credentialFile": {"secret": {"name": "dockyard-eventing-nats", "key": "nats.creds"}}}


def test_the_printed_commands_name_files_and_never_a_key(made):
    directory, printed = made
    for line in nats_auth.commands(directory):
        assert line in printed
    assert "helm upgrade --install nats nats/nats -n nats-io" in printed and f"-f {directory / 'nats-values.yaml'}" in printed
    secret_line = next(line for line in printed.splitlines() if "create secret generic dockyard-nats -n dockyard" in line)
    for key, path in nats_auth.SECRET_FILES.items():
        assert f"--from-file={key}={directory / path}" in secret_line
        assert (directory / path).is_file()
    assert f"--from-file=nats.creds={directory / 'creds' / 'eventing.creds'}" in printed
    assert f"kubectl apply -f {directory / 'config-nats.yaml'}" in printed
    seeds = [line for path in directory.rglob("*") if path.is_file() for line in path.read_text().splitlines() if line.startswith("S")]
    assert seeds and not [seed for seed in seeds if seed in printed]


def test_a_second_init_reads_the_chain_back(made, capsys):
    directory, printed = made
    account = ensure(directory).account
    assert cli.main(["nats-auth", "init", "--out", str(directory)]) == 0
    assert ensure(directory).account == account and account in capsys.readouterr().out and account in printed


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cli.main(["nats-auth", "init", "--out", str(tmp_path / "f")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_server_conf_that_is_not_the_chain_s_is_refused(tmp_path):
    conf = tmp_path / "server.conf"
    conf.write_text("operator: x\nsystem_account: y\nresolver: MEMORY\nlisten: 0.0.0.0:4222\n")
    with pytest.raises(cli.CommandError, match="server.conf:4"):
        nats_auth.server_settings(conf)
    conf.write_text("operator: x\nsystem_account: y\nresolver: MEMORY\nresolver_preload: {\n  A: b\n")
    with pytest.raises(cli.CommandError, match="closing brace"):
        nats_auth.server_settings(conf)
