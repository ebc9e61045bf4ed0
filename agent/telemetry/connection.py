"""How the agent's processes reach NATS: servers, credentials, and one nats-py connection at a time.

Credentials, any one of:
* user:password or a token in the URL (`nats://user:pass@host:4222`, `nats://token@host`);
* a `.creds` file as `nsc` writes it: a user JWT and its nkey seed (`--nats-creds`,
  `DOCKYARD_NATS_CREDS`), for servers in operator (JWT) mode;
* an nkey seed file (`--nats-nkey`, `DOCKYARD_NATS_NKEY`), for `authorization { users = [{nkey: U...}] }`.

Invariants:
* A credentials file is checked when the process starts (`NatsAuth.load`): a file
  that is missing, unreadable or malformed is a usage error naming the flag (exit
  3, never retried), not an endless reconnect loop. nats-py reads the file again at
  every connect, so a rotated file is picked up by the next connection.
* `connect()` makes one bounded attempt with nats-py's own reconnecting switched
  off: a lost connection is closed for good and the caller opens a fresh one.
  nats-py's reconnect would replay its outgoing buffer (records written after the
  last ones the server acknowledged) before the caller could resend the records lost
  in flight, so the stream would store later records before earlier ones. A fresh
  client has an empty buffer: the resend goes first and order holds.
* Secrets never reach a message: errors name the server without its user info.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from nats.aio.client import Client

JWT_BEGIN = "BEGIN NATS USER JWT"
SEED_BEGIN = "BEGIN USER NKEY SEED"


class CredentialsError(ValueError):
    """A credentials file that cannot work; the message names the flag."""


def server_list(nats_url: str | None) -> list[str]:
    """`nats://a:4222,nats://b:4222` -> one URL per server (a bare host:port gets nats://)."""
    if not nats_url:
        return []
    servers = [u.strip() for u in nats_url.split(",") if u.strip()]
    return [u if "://" in u else f"nats://{u}" for u in servers]


def public_url(url: str) -> str:
    """The URL without user info, for messages (NATS URLs may carry user:password or a token)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _seed_from(text: str, what: str) -> str:
    import nkeys

    seed = text.strip()
    try:
        key = nkeys.from_seed(bytearray(seed.encode()))
        public = key.public_key.decode()
        key.wipe()
    except Exception as exc:  # nkeys raises its own errors and binascii ones
        raise CredentialsError(f"{what}: not an nkey seed ({type(exc).__name__})") from None
    if not public.startswith("U"):
        raise CredentialsError(f"{what}: the seed is not a user nkey (its public key starts with {public[0]!r})")
    return public


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{what}: cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None


def _line_after(lines: list[str], marker: str) -> str | None:
    for i, line in enumerate(lines):
        if marker in line:
            return lines[i + 1].strip() if i + 1 < len(lines) else None
    return None


@dataclass(frozen=True)
class NatsAuth:
    """Credentials files for nats-py; user info in the URL needs nothing here (nats-py reads the URL)."""

    creds_file: str | None = None
    nkey_file: str | None = None

    @classmethod
    def load(cls, creds_file: str | None = None, nkey_file: str | None = None) -> NatsAuth:
        """Check the files now. Raises CredentialsError naming the flag."""
        creds_file, nkey_file = creds_file or None, nkey_file or None
        if creds_file and nkey_file:
            raise CredentialsError("--nats-creds and --nats-nkey: give one of them (a .creds file holds its own seed)")
        if creds_file:
            what = f"--nats-creds {creds_file}"
            lines = _read(creds_file, "--nats-creds").splitlines()
            jwt = _line_after(lines, JWT_BEGIN)
            if not jwt or jwt.count(".") != 2:
                raise CredentialsError(f"{what}: no user JWT after a '-----{JWT_BEGIN}-----' line")
            seed = _line_after(lines, SEED_BEGIN)
            if not seed:
                raise CredentialsError(f"{what}: no seed after a '-----{SEED_BEGIN}-----' line")
            _seed_from(seed, what)
        if nkey_file:
            _seed_from(_read(nkey_file, "--nats-nkey"), f"--nats-nkey {nkey_file}")
        return cls(creds_file, nkey_file)

    @property
    def secrets_file(self) -> str | None:
        """The file whose lines are secrets (for the redactor), if any."""
        return self.creds_file or self.nkey_file

    def describe(self) -> str:
        """For a startup line: which file authenticates (never its contents)."""
        if self.creds_file:
            return f" (creds {self.creds_file})"
        if self.nkey_file:
            return f" (nkey {self.nkey_file})"
        return ""

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        if self.creds_file:
            return {"user_credentials": self.creds_file}
        if self.nkey_file:
            return {"nkeys_seed": self.nkey_file}
        return {}


async def connect(
    url: str,
    auth: NatsAuth,
    *,
    name: str,
    timeout: float,
    inbox_prefix: str = "_INBOX",
    on_closed: Callable[[], Awaitable[None]],
    on_error: Callable[[Exception], Awaitable[None]],
) -> Client:
    """One connection to `url` within `timeout`, or an exception. Lost later, it stays closed."""
    import nats

    return await asyncio.wait_for(
        nats.connect(
            servers=[url],
            name=name,
            inbox_prefix=inbox_prefix,  # a task's credentials may subscribe to its own inbox only
            allow_reconnect=False,  # see the module docstring: the caller reconnects, resends first
            max_reconnect_attempts=1,  # nats-py tries a server up to this + 1 times per connect()
            reconnect_time_wait=0,
            connect_timeout=max(0.05, timeout / 2),
            ping_interval=20,
            max_outstanding_pings=2,  # a silent server is dropped within a minute
            closed_cb=on_closed,
            error_cb=on_error,  # nats-py's default logs every error; ours records it instead
            **auth.connect_options(),
        ),
        timeout,
    )
