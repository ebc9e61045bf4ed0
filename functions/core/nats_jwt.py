"""NATS credentials in operator (JWT) mode: keys, signed user JWTs, `.creds` files, and who may do what.

nats-server checks every connection against a user JWT signed by one of its
account's signing keys (decentralized JWT auth). The launcher holds the
account's signing key and mints, for each task it launches, two users (the
agent, the snapshotter) that may publish only on the task's own subjects,
subscribe only to its command subject and its own reply inbox, and answer the
requests they receive. The services (functions, stream, tracker) have their own
users with the subjects they need.

Why by hand: the one Python port of nats-io/jwt on PyPI (nats-jwt 0.2.2) says of
itself "not well-tested and in the development stage", and pins pytz < 2025 and
pulls pycryptodome, marshmallow and dataclasses-json. A NATS JWT is three
base64url parts: the header `{"typ":"JWT","alg":"ed25519-nkey"}`, the claims as
nats-io/jwt v2 lays them out, and an ed25519 signature made with the `nkeys`
package (the NATS project's own). The server is the judge: the tests connect
real nats-servers in operator mode with what this module signs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys

from agent import contract

UNLIMITED = -1
TASK_ROLES = ("agent", "snapshotter", "gateway")  # gateway: the model gateway sidecar publishes usage events
CREDENTIALS_MARGIN_SECONDS = 3600  # a task's NATS users expire this long after its deadline
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


class CredentialsSetupError(ValueError):
    """A signing key or account that cannot sign; the message names what is wrong."""


@dataclass(frozen=True, repr=False)
class Key:
    """An nkey: its seed (secret) and public key. `repr` never shows the seed."""

    seed: str
    public: str

    @classmethod
    def new(cls, prefix: int) -> Key:
        return cls.from_seed(nkeys.encode_seed(os.urandom(32), prefix).decode())

    @classmethod
    def from_seed(cls, seed: str) -> Key:
        pair = nkeys.from_seed(bytearray(seed.strip().encode()))
        try:
            return cls(seed.strip(), pair.public_key.decode())
        finally:
            pair.wipe()

    def sign(self, data: bytes) -> bytes:
        pair = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return pair.sign(data)
        finally:
            pair.wipe()

    def __repr__(self) -> str:
        return f"Key({self.public})"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: Key, subject: str, name: str, nats_claims: dict, *, expires_at: int | None = None) -> str:
    """A JWT for `subject` signed by `issuer`; `nats_claims` is the `nats` object (type, limits, permissions...)."""
    claims: dict = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject,
                    "nats": {**nats_claims, "version": 2}}
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    # jti: a hash of the claims, as nats-io/jwt makes it (the server does not check it).
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
    signed = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def decode_claims(jwt: str) -> dict:
    """The claims of a JWT, unverified (for display and tests; the server verifies)."""
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def creds_file_text(user_jwt: str, seed: str) -> str:
    """A `.creds` file as `nsc` writes it (nats-py's `user_credentials` reads it)."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_secret_file(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable by its owner only, replacing any file there atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def account_claims(signing_keys: list[str] | None = None, *, jetstream: bool = True) -> dict:
    limits = {"subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED, "imports": UNLIMITED,
              "exports": UNLIMITED, "wildcards": True, "conn": UNLIMITED, "leaf": UNLIMITED}
    if jetstream:  # non-zero storage limits turn JetStream on for the account
        limits |= {"mem_storage": UNLIMITED, "disk_storage": UNLIMITED, "streams": UNLIMITED, "consumer": UNLIMITED}
    return {"type": "account", "limits": limits, "signing_keys": list(signing_keys or [])}


# --- who may do what --------------------------------------------------------------

@dataclass(frozen=True)
class Permissions:
    """Allow-lists of a user; `None` lists mean no limit (the operator's admin user only)."""

    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None
    responses: bool = False  # may answer requests it receives (publish once to their reply subject)

    def claims(self) -> dict:
        out: dict = {"type": "user", "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED,
                     "pub": {} if self.publish is None else {"allow": list(self.publish)},
                     "sub": {} if self.subscribe is None else {"allow": list(self.subscribe)}}
        if self.responses:
            out["resp"] = {"max": 1, "ttl": 0}
        return out


def task_permissions(task_id: str) -> Permissions:
    """A task's agent or snapshotter: its own trace out, its own commands in, nothing of another task.

    No JetStream API at all: the AGENT stream exists before a task is launched (the
    functions create it), the publisher's acks come back on the task's inbox, and
    stream info (which lists other tasks' subjects) stays out of reach.

    Publishing to `_INBOX.<id>.cmd.>` answers the task's commands (`contract.command_reply_prefix`): the
    functions ask there, so the answer crosses the pod's leaf node, which forwards only what its user
    may publish. Only the task's own requesters listen there."""
    if not contract.is_valid_task_id(task_id):
        raise CredentialsSetupError(f"task id {task_id!r} is not valid")
    return Permissions(
        publish=(contract.subject_events(task_id), contract.subject_logs(task_id), f"{contract.command_reply_prefix(task_id)}.>"),
        subscribe=(contract.subject_cmd(task_id), f"{contract.inbox_prefix(task_id)}.>"),
        responses=True,
    )


_AGENT = contract.STREAM_NAME
_KV_STREAM = f"KV_{contract.KV_BUCKET}"
_KV = f"$KV.{contract.KV_BUCKET}.>"
_STREAMS_SETUP = (f"$JS.API.STREAM.CREATE.{_AGENT}", f"$JS.API.STREAM.INFO.{_AGENT}",
                  f"$JS.API.STREAM.CREATE.{_KV_STREAM}", f"$JS.API.STREAM.INFO.{_KV_STREAM}", "$JS.API.INFO")
_KV_READ = (f"$JS.API.DIRECT.GET.{_KV_STREAM}.>", f"$JS.API.STREAM.MSG.GET.{_KV_STREAM}")
_INBOX = ("_INBOX.>",)

SERVICE_PERMISSIONS: dict[str, Permissions] = {
    # the registry (read, write), platform events on any task's subject, commands to any task
    "functions": Permissions(
        publish=(*_STREAMS_SETUP, *_KV_READ, _KV, "events.agent.*", "cmd.agent.*"),
        subscribe=_INBOX,
    ),
    # reads every trace (ordered consumers) and the registry; writes nothing
    "stream": Permissions(
        publish=(*_STREAMS_SETUP, *_KV_READ,
                 f"$JS.API.CONSUMER.CREATE.{_AGENT}", f"$JS.API.CONSUMER.CREATE.{_AGENT}.>",
                 f"$JS.API.CONSUMER.INFO.{_AGENT}.*", f"$JS.API.CONSUMER.DELETE.{_AGENT}.*",
                 f"$JS.API.DIRECT.GET.{_AGENT}", f"$JS.API.DIRECT.GET.{_AGENT}.>", f"$JS.API.STREAM.MSG.GET.{_AGENT}",
                 f"$JS.FC.{_AGENT}.>"),
        subscribe=_INBOX,
    ),
    # its durable consumer of every task's events; writes the registry
    "tracker": Permissions(
        publish=(*_STREAMS_SETUP, *_KV_READ, _KV,
                 f"$JS.API.CONSUMER.DURABLE.CREATE.{_AGENT}.*", f"$JS.API.CONSUMER.CREATE.{_AGENT}.*",
                 f"$JS.API.CONSUMER.CREATE.{_AGENT}.*.>", f"$JS.API.CONSUMER.INFO.{_AGENT}.*",
                 f"$JS.API.CONSUMER.MSG.NEXT.{_AGENT}.*", f"$JS.ACK.{_AGENT}.>"),
        subscribe=_INBOX,
    ),
}
ADMIN = Permissions(None, None)  # no limit: for the operator's own tools (nats CLI) and tests


def task_credentials_expiry(deadline_seconds: int, now: float) -> int:
    """When a task's users expire (`exp`, Unix seconds): its deadline from `now`, and a margin for the final
    snapshot and the last events. Both runtimes mint with it: the local one at each start of supervision, the
    Kubernetes one at launch (a Job's activeDeadlineSeconds counts from its start, which is about then)."""
    return int(now) + int(deadline_seconds) + CREDENTIALS_MARGIN_SECONDS


# --- the launcher's half: the account and its signing key -------------------------

@dataclass(frozen=True)
class Issuer:
    """Signs users of one account with one of its signing keys (the account key itself stays offline)."""

    account: str
    signing_key: Key

    @classmethod
    def load(cls, account: str, signing_key_file: Path | str) -> Issuer:
        if not (account.startswith("A") and len(account) == 56):
            raise CredentialsSetupError(f"{account[:8]!r}...: not an account public key (56 characters starting with A)")
        try:
            text = Path(signing_key_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsSetupError(f"cannot read the signing key {signing_key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            key = Key.from_seed(text)
        except Exception as exc:  # nkeys raises its own errors and binascii ones
            raise CredentialsSetupError(f"{signing_key_file}: not an nkey seed ({type(exc).__name__})") from None
        if not key.public.startswith("A"):
            raise CredentialsSetupError(f"{signing_key_file}: not an account signing key (its public key starts with {key.public[0]!r})")
        return cls(account, key)

    def user_jwt(self, public: str, name: str, permissions: Permissions, *, expires_at: int | None = None) -> str:
        claims = permissions.claims()
        if self.signing_key.public != self.account:
            claims["issuer_account"] = self.account
        return encode_jwt(self.signing_key, public, name, claims, expires_at=expires_at)

    def creds(self, name: str, permissions: Permissions, *, expires_at: int | None = None) -> str:
        """A new user's `.creds` file text."""
        user = Key.new(nkeys.PREFIX_BYTE_USER)
        return creds_file_text(self.user_jwt(user.public, name, permissions, expires_at=expires_at), user.seed)

    def task_creds(self, task_id: str, role: str, *, expires_at: int | None = None) -> str:
        """The `.creds` of one process of a task (`role` in TASK_ROLES), allowed `task_permissions(task_id)`."""
        if role not in TASK_ROLES:
            raise CredentialsSetupError(f"role {role!r}: one of {', '.join(TASK_ROLES)}")
        return self.creds(f"task-{task_id}-{role}", task_permissions(task_id), expires_at=expires_at)
