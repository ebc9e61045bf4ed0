"""Delivery of a change set as a branch: the finalizer commits it on top of the base commit and pushes it.

Runs in the snapshotter's final step (the trusted side), after agent/changes.py computed the change set
into its scratch directory, and only when the task asked for it (`repo.push`, passed to the snapshotter
by the runtime from the task's spec, never read from the workspace). Invariants:

- git works in the change set's private GIT_DIR (`<scratch>/git`: our config only, hooks at /dev/null,
  no fsmonitor, the workspace's objects lent through alternates) with no system or global config and
  HOME elsewhere. The workspace's `.git/config`, hooks and refs are never read, so nothing the agent
  wrote there (a pre-push hook, core.fsmonitor, core.hooksPath, a credential helper, an `includeIf`) runs.
- The commit is the change set's tree (`git write-tree` of the private index) with the verified base
  commit as its only parent. Its dates come from the agent's result file, so a second final step over
  the same workspace makes the same commit and its push is a no-op (at-least-once).
- Never a force push: `<commit>:refs/heads/<branch>` without `+`; a branch that exists with other
  history is refused by git itself, and the result says so.
- Credentials are files of a directory only the finalizer sees (`--git-credentials-dir`, the Secret
  `dockyard-git-push` in a pod): `username` (optional), `password` or `token`, and optionally `hosts`
  (the hosts they may be sent to). git reads them through a credential helper script that `cat`s those
  files: they are never on a command line, in a URL, in the environment or in a file we write, and every
  message is redacted of them. Redirects are not followed, so only the task's own host is ever asked.
- Bounded: all git calls share one deadline. Every outcome is a dict for result.json, never an exception:
  `push: {branch, commit, remote}` or `push_error` (words starting with "refused", "authentication
  refused", "network" or "not pushed").
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agent import contract

TIMEOUT = 90.0  # seconds for the commit and the push together (inside the snapshotter's grace period, 120 s under dockyard dev)
CREDENTIAL_FILES = ("username", "password", "token", "hosts")
CREDENTIAL_MAX = 64 * 1024
AUTHOR = ("dockyard", "dockyard@localhost")
SCHEMES = ("https", "http", "file")  # http: a loopback test server; the task's spec allows https and file only


def default_branch(task_id: str) -> str:
    return f"dockyard/{task_id}"


@dataclass(frozen=True)
class PushRequest:
    url: str  # the task's repo.url
    branch: str
    credentials_dir: str | None = None
    proxy: str | None = None  # git's HTTP(S) proxy (a pod's egress proxy); None: the process's own, if any


class _Refused(Exception):
    """The push cannot or did not happen; the message is the `push_error` (before redaction)."""


@dataclass(frozen=True)
class _Credentials:
    directory: Path
    username: str
    secret_file: str  # "password" or "token"
    secret: str
    hosts: tuple[str, ...]

    @classmethod
    def load(cls, directory: str | None) -> _Credentials | None:
        """The credentials in `directory`; None when it is unset, missing or holds none (an optional Secret not created)."""
        if not directory or not Path(directory).is_dir():
            return None
        root = Path(directory)
        values = {name: _read(root / name) for name in CREDENTIAL_FILES}
        secret_file = "password" if values["password"] else "token" if values["token"] else None
        if secret_file is None:
            return None
        hosts = tuple(h.strip().lower() for h in (values["hosts"] or "").replace(",", "\n").splitlines() if h.strip())
        return cls(root, values["username"] or "dockyard", secret_file, values[secret_file], hosts)

    def helper(self) -> str:
        """A credential helper (sh) that hands git the files' contents on `get`, and ignores store/erase."""
        user = f"cat {shlex.quote(str(self.directory / 'username'))}" if (self.directory / "username").is_file() else "echo dockyard"
        secret = f"cat {shlex.quote(str(self.directory / self.secret_file))}"
        return (
            "#!/bin/sh\n"
            'test "$1" = get || exit 0\n'
            f'printf "username=%s\\n" "$({user})"\n'
            f'printf "password=%s\\n" "$({secret})"\n'
        )


def _read(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            data = f.read(CREDENTIAL_MAX)
    except OSError as exc:
        raise _Refused(f"not pushed: cannot read the git credentials file {path.name}: {exc.strerror}") from None
    value = data.decode("utf-8", errors="replace").rstrip("\r\n")
    if contract.has_control_chars(value):
        raise _Refused(f"not pushed: the git credentials file {path.name} holds control characters (one line expected)")
    return value or None


def public_remote(url: str) -> str:
    """The URL as recorded: without user info, query or fragment."""
    parts = urlsplit(url)
    if parts.scheme == "file" or not parts.netloc:
        return urlunsplit(parts._replace(query="", fragment=""))
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


class _Redactor:
    def __init__(self, url: str, credentials: _Credentials | None):
        self.replace = {url: public_remote(url)}
        password = urlsplit(url).password
        if password:
            self.replace[password] = "***"
        if credentials is not None:
            self.replace[credentials.secret] = "***"

    def __call__(self, text: str) -> str:
        for secret, shown in sorted(self.replace.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(secret, shown)
        return text


class _Git:
    """git in the change set's private GIT_DIR, with a shared deadline."""

    def __init__(self, scratch: Path, deadline: float, config: list[str], proxy: str | None = None):
        self.scratch = scratch
        self.deadline = deadline
        self.config = [arg for item in config for arg in ("-c", item)]
        home = scratch / "push-home"
        home.mkdir(exist_ok=True)
        git_dir = scratch / "git"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home),
            "GIT_DIR": str(git_dir),
            "GIT_INDEX_FILE": str(git_dir / "index"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "GIT_HTTP_LOW_SPEED_LIMIT": "1000",
            "GIT_HTTP_LOW_SPEED_TIME": "30",
            "LC_ALL": "C",
        }
        # The finalizer's own way out (a pod reaches the git host through the egress proxy) and CA bundle.
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                     "SSL_CERT_FILE", "SSL_CERT_DIR", "GIT_SSL_CAINFO"):
            if os.environ.get(name):
                self.env[name] = os.environ[name]
        if proxy:
            for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
                self.env[name] = proxy
            for name in ("NO_PROXY", "no_proxy"):
                self.env.pop(name, None)

    def run(self, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Refused("network: timed out")
        try:
            done = subprocess.run(["git", *self.config, *args], cwd=self.scratch, env={**self.env, **(env or {})},
                                  capture_output=True, timeout=left, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise _Refused(f"network: git {args[0]} timed out after {TIMEOUT:g} s") from None
        if check and done.returncode != 0:
            raise _Refused(f"not pushed: git {args[0]} failed: {_tail(done.stderr)}")
        return done


def _tail(data: bytes, limit: int = 500) -> str:
    return " ".join(data.decode(errors="replace").split())[-limit:]


def deliver(scratch: str | os.PathLike, summary: dict, request: PushRequest, task_id: str, *,
            date: float | None = None, message: str | None = None, timeout: float = TIMEOUT) -> dict:
    """Commit the change set computed into `scratch` (summary: its changes.json) and push it as
    `request.branch`. Returns the fields result.json gains: `push` or `push_error`."""
    redact = _Redactor(request.url, None)
    try:
        credentials = _Credentials.load(request.credentials_dir)
        redact = _Redactor(request.url, credentials)
        commit = _deliver(Path(scratch), summary, request, task_id, credentials, date, message, timeout)
    except _Refused as exc:
        return {"push_error": redact(str(exc))[:2000]}
    except Exception as exc:  # whatever happened, the work is kept and the result says why
        return {"push_error": redact(f"not pushed: {type(exc).__name__}: {exc}")[:2000]}
    return {"push": {"branch": request.branch, "commit": commit, "remote": public_remote(request.url)}}


def _deliver(scratch: Path, summary: dict, request: PushRequest, task_id: str, credentials: _Credentials | None,
             date: float | None, message: str | None, timeout: float) -> str:
    parts = urlsplit(request.url)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise _Refused(f"not pushed: pushing supports {', '.join(SCHEMES)} repositories, not {scheme or request.url!r}")
    base = summary.get("base") or {}
    if not base.get("verified") or summary.get("root") != contract.REPO_DIR:
        raise _Refused(f"not pushed: the change set has no verified base commit to build on ({base.get('note', 'no repository')})")
    if scheme != "file":
        if credentials is None:
            raise _Refused("not pushed: no git credentials are configured for the finalizer "
                           "(the Secret dockyard-git-push; dockyard dev: DOCKYARD_GIT_CREDENTIALS_DIR)")
        host = (parts.hostname or "").lower()
        if scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
            raise _Refused(f"refused: git credentials are never sent over plain http (to {host!r}); use https")
        if credentials.hosts and host not in credentials.hosts:
            raise _Refused(f"refused: the git credentials are not for host {host!r} (their `hosts` file names "
                           f"{', '.join(credentials.hosts)})")

    config = [
        "core.hooksPath=/dev/null", "core.fsmonitor=false", "credential.helper=", "http.followRedirects=false",
        "push.gpgSign=false", "commit.gpgSign=false", "protocol.allow=never", f"protocol.{scheme}.allow=always",
        "transfer.fsckObjects=false",
    ]
    if credentials is not None and scheme != "file":
        helper = scratch / "push-credential-helper"
        helper.write_text(credentials.helper())
        helper.chmod(0o700)
        config.append(f"credential.helper=!{shlex.quote(str(helper))}")
    git = _Git(scratch, time.monotonic() + timeout, config, request.proxy)

    tree = git.run("write-tree").stdout.decode().strip()
    when = f"@{int(date if date is not None else time.time())} +0000"
    identity = {"GIT_AUTHOR_NAME": AUTHOR[0], "GIT_AUTHOR_EMAIL": AUTHOR[1], "GIT_AUTHOR_DATE": when,
                "GIT_COMMITTER_NAME": AUTHOR[0], "GIT_COMMITTER_EMAIL": AUTHOR[1], "GIT_COMMITTER_DATE": when}
    text = f"dockyard: the changes of task {task_id}\n\n{(message or '').strip()[:4000]}\n\nDockyard-Task: {task_id}\n"
    commit = _commit_tree(git, tree, base["commit"], text, identity)

    done = git.run("push", "--porcelain", "--no-verify", "--", request.url, f"{commit}:refs/heads/{request.branch}", check=False)
    _check_push(done, request.branch, parts.hostname or request.url)
    return commit


def _commit_tree(git: _Git, tree: str, parent: str, text: str, identity: dict) -> str:
    left = max(1.0, git.deadline - time.monotonic())
    try:
        done = subprocess.run(["git", *git.config, "commit-tree", tree, "-p", parent, "-F", "-"], cwd=git.scratch,
                              env={**git.env, **identity}, input=text.encode(), capture_output=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise _Refused("not pushed: git commit-tree timed out") from None
    if done.returncode != 0:
        raise _Refused(f"not pushed: git commit-tree failed: {_tail(done.stderr)}")
    return done.stdout.decode().strip()


_AUTH = ("authentication failed", "could not read username", "could not read password", "returned error: 401",
         "returned error: 403", "invalid username or password", "permission denied", "access denied")
_NETWORK = ("could not resolve", "failed to connect", "connection refused", "connection timed out", "timed out",
            "connection reset", "network is unreachable", "no route to host", "ssl", "tls", "certificate",
            "proxy", "does not appear to be a git repository", "returned error: 5", "empty reply", "recv failure")


def _check_push(done: subprocess.CompletedProcess, branch: str, host: str) -> None:
    """Raise _Refused in words unless the branch now holds the commit (new, or already there)."""
    out = done.stdout.decode(errors="replace")
    err = _tail(done.stderr)
    for line in out.splitlines():  # porcelain: "<flag>\t<from>:<to>\t<summary> (<reason>)"
        fields = line.split("\t")
        if len(fields) < 3 or not fields[1].endswith(f":refs/heads/{branch}"):
            continue
        flag, summary = fields[0], fields[2]
        if flag in ("*", " ", "=") and done.returncode == 0:
            return
        if flag == "!":
            if "fetch first" in summary or "non-fast-forward" in summary or "already exists" in summary:
                raise _Refused(f"refused: branch {branch!r} already exists on the remote with other history "
                               "(dockyard never force-pushes; choose another repo.push.branch)")
            reason = summary.split("(", 1)[1].rstrip(")") if "(" in summary else summary
            raise _Refused(f"refused by the remote: {reason}" + (f" ({err})" if err else ""))
    lowered = err.lower()
    if any(word in lowered for word in _AUTH):
        raise _Refused(f"authentication refused by {host}: {err}")
    if any(word in lowered for word in _NETWORK):
        raise _Refused(f"network: could not reach {host}: {err}")
    raise _Refused(f"not pushed: git push failed ({done.returncode}): {err or out.strip()[-500:]}")
