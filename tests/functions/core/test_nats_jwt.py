"""NATS credentials as `functions.core.nats_jwt` signs them, judged by a real nats-server in operator mode."""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors
import nkeys
import pytest

from agent import contract
from functions.core.nats_jwt import CredentialsSetupError, Issuer, Key, decode_claims, task_permissions, write_secret_file
from functions.core.settings import Settings
from functions.errors import SettingsError


def creds_path(nats_server, name: str, text: str):
    return write_secret_file(nats_server.store_dir / "minted" / f"{name}.creds", text)


async def _quiet(exc: Exception) -> None:
    pass


def test_a_task_user_expires_and_the_server_then_refuses_it(nats_server):
    issuer = nats_server.auth.issuer()
    expired = creds_path(nats_server, "expired", issuer.task_creds("t-exp", "agent", expires_at=int(time.time()) - 1))
    valid = creds_path(nats_server, "valid", issuer.task_creds("t-exp", "agent", expires_at=int(time.time()) + 3600))

    async def connect(path):
        nc = await nats.connect(nats_server.url, user_credentials=str(path), allow_reconnect=False, max_reconnect_attempts=0,
                                error_cb=_quiet, inbox_prefix=contract.inbox_prefix("t-exp"))
        await nc.close()

    asyncio.run(connect(valid))
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(connect(expired))


def test_a_user_signed_by_another_account_key_is_refused(nats_server):
    stranger = Issuer(nats_server.auth.account, Key.new(nkeys.PREFIX_BYTE_ACCOUNT))  # not one of the account's signing keys
    path = creds_path(nats_server, "stranger", stranger.task_creds("t-x", "agent"))

    async def connect():
        await nats.connect(nats_server.url, user_credentials=str(path), allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet)

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(connect())


def test_task_permissions_name_only_the_task_and_refuse_bad_ids():
    p = task_permissions("t-1")
    assert p.publish == ("events.agent.t-1", "logs.agent.t-1", "_INBOX.t-1.cmd.>")  # the last: answers to its commands
    assert p.subscribe == ("cmd.agent.t-1", "_INBOX.t-1.>") and p.responses
    for bad in ("*", ">", "a.b", "t-1\n", ""):
        with pytest.raises(CredentialsSetupError):
            task_permissions(bad)
    claims = decode_claims(Issuer(Key.new(nkeys.PREFIX_BYTE_ACCOUNT).public, Key.new(nkeys.PREFIX_BYTE_ACCOUNT)).user_jwt(
        Key.new(nkeys.PREFIX_BYTE_USER).public, "u", p))
    assert claims["nats"]["resp"] == {"max": 1, "ttl": 0} and claims["nats"]["issuer_account"].startswith("A")


def test_a_bad_signing_key_or_account_is_a_settings_error_naming_the_variable(tmp_path, nats_server):
    user_seed = tmp_path / "user.nk"
    user_seed.write_text(Key.new(nkeys.PREFIX_BYTE_USER).seed)
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("not a seed")
    cases = [
        (nats_server.auth.account, str(tmp_path / "missing.nk"), "cannot read"),
        (nats_server.auth.account, str(garbage), "not an nkey seed"),
        (nats_server.auth.account, str(user_seed), "not an account signing key"),
        ("UNOTANACCOUNT", str(nats_server.auth.signing_key_file), "not an account public key"),
    ]
    for account, key_file, why in cases:
        settings = Settings(nats_account=account, nats_signing_key_file=key_file, data_dir=tmp_path)
        with pytest.raises(SettingsError, match=why) as err:
            settings.nats_issuer()
        assert err.value.field == "DOCKYARD_NATS_SIGNING_KEY_FILE"
    with pytest.raises(SettingsError, match="DOCKYARD_NATS_SIGNING_KEY_FILE"):
        Settings(nats_account=nats_server.auth.account, data_dir=tmp_path)
    with pytest.raises(SettingsError, match="DOCKYARD_NATS_ACCOUNT"):
        Settings(nats_signing_key_file=str(nats_server.auth.signing_key_file), data_dir=tmp_path)
    assert Settings(data_dir=tmp_path).nats_issuer() is None
