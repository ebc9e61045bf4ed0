"""The NATS trust chain of one installation: an operator, its accounts, the services' users.

`ensure(directory)` creates it once and reads it back afterwards (`dockyard dev`
keeps it under its data dir; `dockyard nats-auth init --out DIR` makes one for a
cluster). What it holds, each file readable by its owner only:

    server.conf          operator JWT, system account, memory resolver with the
                         account JWTs preloaded: nats-server's half (`include` it)
    account.pub          the public key of account DOCKYARD (agents and services)
    signing-key.nk       DOCKYARD's signing key: the launcher mints task users with it
    creds/<user>.creds   functions, stream, tracker, admin (DOCKYARD);
                         eventing (account EVENTING: Knative's NATS dispatcher)
    keys/                the operator's and accounts' own seeds: keep them offline

Two accounts keep Knative's channel traffic and dockyard's traces apart: nothing
in one account sees a subject of the other. The system account is nats-server's
own (JetStream in operator mode needs one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nkeys

from functions.core.nats_jwt import (
    ADMIN,
    SERVICE_PERMISSIONS,
    Issuer,
    Key,
    account_claims,
    encode_jwt,
    write_secret_file,
)

SERVICE_USERS = (*SERVICE_PERMISSIONS, "admin")
EVENTING_USER = "eventing"
_MANIFEST = "setup.json"


@dataclass(frozen=True)
class NatsAuth:
    """Paths and public keys of a trust chain made by `ensure`."""

    directory: Path
    account: str  # DOCKYARD's public key
    eventing_account: str
    system_account: str

    @property
    def server_conf(self) -> Path:
        return self.directory / "server.conf"

    @property
    def signing_key_file(self) -> Path:
        return self.directory / "signing-key.nk"

    def creds(self, user: str) -> Path:
        return self.directory / "creds" / f"{user}.creds"

    def issuer(self) -> Issuer:
        return Issuer.load(self.account, self.signing_key_file)


def ensure(directory: Path | str, *, operator_name: str = "dockyard") -> NatsAuth:
    """The trust chain in `directory`, created if missing (an unfinished one is made again)."""
    directory = Path(directory)
    manifest = directory / _MANIFEST
    if manifest.exists():
        data = json.loads(manifest.read_text())
        return NatsAuth(directory, data["account"], data["eventing_account"], data["system_account"])
    return _create(directory, operator_name)


def _create(directory: Path, operator_name: str) -> NatsAuth:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    operator = Key.new(nkeys.PREFIX_BYTE_OPERATOR)
    system, account, eventing, signing = (Key.new(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(4))
    jwts = {
        system.public: encode_jwt(operator, system.public, "SYS", account_claims(jetstream=False)),
        account.public: encode_jwt(operator, account.public, "DOCKYARD", account_claims([signing.public])),
        eventing.public: encode_jwt(operator, eventing.public, "EVENTING", account_claims()),
    }
    operator_jwt = encode_jwt(operator, operator.public, operator_name,
                              {"type": "operator", "system_account": system.public})
    preload = "".join(f"  {public}: {jwt}\n" for public, jwt in jwts.items())
    write_secret_file(directory / "server.conf", (
        "# dockyard's NATS trust chain (decentralized JWT auth); made by `dockyard nats-auth init`.\n"
        f"operator: {operator_jwt}\nsystem_account: {system.public}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n{preload}}}\n"))
    for name, key in (("operator", operator), ("system", system), ("account", account), ("eventing-account", eventing)):
        write_secret_file(directory / "keys" / f"{name}.nk", key.seed + "\n")
    write_secret_file(directory / "signing-key.nk", signing.seed + "\n")
    write_secret_file(directory / "account.pub", account.public + "\n")
    issuer = Issuer(account.public, signing)
    for user in SERVICE_PERMISSIONS:
        write_secret_file(directory / "creds" / f"{user}.creds", issuer.creds(user, SERVICE_PERMISSIONS[user]))
    write_secret_file(directory / "creds" / "admin.creds", issuer.creds("admin", ADMIN))
    # Knative's dispatcher: the whole EVENTING account, nothing of DOCKYARD.
    write_secret_file(directory / "creds" / f"{EVENTING_USER}.creds",
                      Issuer(eventing.public, eventing).creds(EVENTING_USER, ADMIN))
    auth = NatsAuth(directory, account.public, eventing.public, system.public)
    write_secret_file(directory / _MANIFEST, json.dumps(
        {"account": account.public, "eventing_account": eventing.public, "system_account": system.public}, indent=2) + "\n")
    return auth
