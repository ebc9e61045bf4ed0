"""API tokens: who may read and who may act, on every HTTP route of the stream app and of `dockyard dev`.

    Authorization: Bearer <token>     or the cookie `dockyard_token` (set by POST /api/session)

- A token's scope is `read` (GET/HEAD: streams, task lists) or `write` (also POST:
  submit, cancel, message, the relay). Missing or unknown: 401 JSON; read token on a
  POST: 403 JSON. Never a 5xx: a tokens file that cannot be read counts as empty.
- Public, without a token: GET/HEAD of anything outside `/api/` (the cockpit's page,
  assets, `/cockpit-config.json`) and `/healthz`.
- Tokens are stored hashed (sha256) in the tokens file (`DOCKYARD_API_TOKENS_FILE`), one
  line per token: `name scope sha256hex`; `#` starts a comment. The file is read again
  whenever its size or mtime changes: a line added takes effect on the next request.
- `POST /api/session` with a valid token in the header answers 204 and sets it as an
  HttpOnly, SameSite=Strict cookie: the cockpit trades its `?token=` for it once.

`HostGuard` (dev only) refuses a request whose Host is not the server's own address
(421: DNS rebinding) and a state-changing request whose Origin is foreign (403).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("read", "write")
COOKIE = "dockyard_token"
SESSION_PATH = "/api/session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_PREFIX = "dy_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_line(name: str, scope: str, token: str) -> str:
    """The tokens-file line of `token`."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if not name or any(c.isspace() for c in name):
        raise ValueError("name must be one word")
    return f"{name} {scope} {hash_token(token)}"


@dataclass(frozen=True)
class Grant:
    name: str
    scope: str


def parse_tokens(text: str) -> dict[str, Grant]:
    """sha256hex -> Grant; malformed lines are skipped."""
    grants: dict[str, Grant] = {}
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 3 and parts[1] in SCOPES and len(parts[2]) == 64:
            grants[parts[2].lower()] = Grant(parts[0], parts[1])
    return grants


class Tokens:
    """The tokens file, read at start and again when it changes."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._stamp: tuple | None = None
        self._grants: dict[str, Grant] = {}

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self._grants, self._stamp = parse_tokens(self.path.read_text()), stamp
        except (OSError, UnicodeDecodeError):
            self._grants, self._stamp = {}, None

    def grant(self, token: str | None) -> Grant | None:
        if not token:
            return None
        self._reload()
        digest = hash_token(token)
        for known, grant in self._grants.items():
            if hmac.compare_digest(known, digest):
                return grant
        return None


def ensure_dev_token(data_dir: Path, tokens_file: Path) -> str:
    """The dev token of `data_dir/api-token` (mode 0600), created on first start; its hash is in `tokens_file`."""
    token_path = Path(data_dir) / "api-token"
    if token_path.exists():
        token = token_path.read_text().strip()
    else:
        token = new_token()
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
    existing = tokens_file.read_text() if tokens_file.exists() else ""
    if hash_token(token) not in parse_tokens(existing):
        fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(("" if not existing or existing.endswith("\n") else "\n") + token_line("dev", "write", token) + "\n")
    return token


# --- ASGI ---------------------------------------------------------------------------------


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def presented_token(headers: dict[str, str]) -> str | None:
    """The bearer token of the Authorization header, else of the cookie."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return _cookie(headers.get("cookie", ""), COOKIE)


async def _refuse(send, status: int, message: str, field: str, extra: list | None = None) -> None:
    body = json.dumps({"error": message, "field": field}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_public(method: str, path: str) -> bool:
    return path == "/healthz" or (method in SAFE_METHODS and not path.startswith("/api/") and path != "/api")


class TokenAuth:
    """ASGI middleware: the token rule of this module's docstring, in front of `app`."""

    def __init__(self, app, tokens: Tokens):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if is_public(method, path) and path != SESSION_PATH:
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        token = presented_token(headers)
        grant = self.tokens.grant(token)
        if grant is None:
            why = "an API token is required" if not token else "unknown API token"
            return await _refuse(send, 401, f"{why}: send `Authorization: Bearer <token>`", "authorization",
                                 [(b"www-authenticate", b'Bearer realm="dockyard"')])  # fmt: skip
        if path == SESSION_PATH and method == "POST":
            return await self._session(send, token)
        if method not in SAFE_METHODS and grant.scope != "write":
            return await _refuse(send, 403, f"token {grant.name!r} is read-only; this needs a write token", "authorization")
        await self.app(scope, receive, send)

    async def _session(self, send, token: str) -> None:
        cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
        headers = [(b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def own_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host values of a server bound to host:port; None (any) for a wildcard bind."""
    if _is_wildcard(host):
        return None
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host}
    if host in ("::1", "[::1]"):
        names |= {"[::1]", "localhost"}
    return frozenset(f"{name}:{port}" for name in names)


class HostGuard:
    """ASGI middleware of `dockyard dev`: Host must be its own (421), a state-changing Origin too (403)."""

    def __init__(self, app, hosts: frozenset[str] | None):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.hosts is None:
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return await _refuse(send, 421, f"this server does not answer for host {host[:100]!r}", "host")
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None:
            if origin.lower() not in {f"http://{h}" for h in self.hosts}:
                return await _refuse(send, 403, f"requests from origin {origin[:100]!r} are refused", "origin")
        await self.app(scope, receive, send)


def _trusted(address: str, trusted: tuple[str, ...]) -> bool:
    """`address` is one of `trusted` (addresses or CIDR ranges such as 10.42.0.0/16)."""
    if address in trusted:
        return True
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    for entry in trusted:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy; then the rightmost untrusted X-Forwarded-For entry."""
    address = peer or "unknown"
    if not forwarded_for or not _trusted(address, trusted):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _trusted(hop, trusted):
            return hop[:64]
    return address
