"""The change set of a finished task: what the workspace's files became, as a patch and a listing.

Computed by the snapshotter's final step (the trusted side) over a workspace the
agent controlled. Invariants:

- git never reads anything of the workspace's own repository but its object files:
  it runs with a fresh, private GIT_DIR (made in a scratch directory outside
  the workspace) whose `objects/info/alternates` names the workspace
  repository's `.git/objects`, no system or global config, HOME elsewhere, hooks
  off, no fsmonitor, no external diff or textconv, and a private index. The
  workspace's `.git/config`, hooks, index and refs are never opened; its
  `.gitattributes` are read (git offers no switch), but a filter, diff driver or
  textconv needs a command defined in config, and the only config is ours.
- New files' objects go into the private GIT_DIR, never into the workspace.
- The base commit comes from `.dockyard/base.json`, written by the agent: a hint.
  It counts (`verified`) only if it is 40 hex digits naming a commit object in the
  workspace's object store (`git cat-file -t`); otherwise the diff is against the empty tree and
  `changes.json` says why. A workspace object store with alternates of its own is
  not used at all (they could point git at objects outside the workspace).
- Bounded: every git call shares one deadline; the patch is cut at `cap` bytes
  (it then says so and `cut` is true) while the listing stays complete.

With a repository (`repo/` in the workspace) the change set is the repository's,
paths relative to it, so `git apply` takes the patch in a clone; without one it is
the whole workspace against the empty tree, minus `.dockyard/`, `checkpoints/`
and `repo.partial/` (a clone that did not finish).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent import contract

BASE_FILE = ".dockyard/base.json"  # relative to the workspace: {repo, ref, commit} of the clone
PATCH_CAP = 20 * 1024 * 1024  # bytes of patch kept; beyond, the patch is cut
TIMEOUT = 60.0  # seconds for the whole computation (the pod's grace period also covers the uploads)
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's well-known empty tree (sha1)
# The agent's own state at the workspace root, and a clone cut short (the repository, had it finished).
EXCLUDED = (".dockyard", contract.CHECKPOINT_DIR, f"{contract.REPO_DIR}.partial")
BASE_FILE_MAX = 64 * 1024
CUT_NOTE = "\n# dockyard: the patch was cut at {cap} bytes; changes.json lists every file\n"
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_STATUS = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed", "T": "type-changed", "C": "added"}

# Config of the private GIT_DIR: the only config git sees.
_CONFIG = """[core]
\trepositoryformatversion = 0
\tbare = false
\thooksPath = /dev/null
\tfsmonitor = false
\tuntrackedCache = false
\tsplitIndex = false
\tsymlinks = true
\tautocrlf = false
\tsafecrlf = false
\tquotePath = false
\tpreloadIndex = true
[index]
\tthreads = true
[gc]
\tauto = 0
[maintenance]
\tauto = false
[diff]
\trenames = true
\trenameLimit = 4000
[protocol]
\tallow = never
[safe]
\tdirectory = *
"""


def record_base(workspace: str | os.PathLike, repo: dict, commit: str) -> Path:
    """The agent's side: write `BASE_FILE` atomically (the URL, the ref asked for, the commit checked out)."""
    path = Path(workspace) / BASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"repo": repo.get("url"), "ref": repo.get("ref"), "commit": commit.strip()}))
    os.replace(tmp, path)
    return path


def patch_key(task_id: str) -> str:
    return f"jobs/{task_id}/final/changes.patch"


def summary_key(task_id: str) -> str:
    return f"jobs/{task_id}/final/changes.json"


class ChangeSetError(Exception):
    """The change set could not be computed; the message says why."""


@dataclass(frozen=True)
class ChangeSet:
    patch: Path  # the patch file (in the scratch directory the caller gave)
    summary: dict  # what changes.json holds

    def summary_bytes(self) -> bytes:
        return json.dumps(self.summary, indent=1).encode()


def read_base_hint(workspace: Path) -> dict | None:
    """`.dockyard/base.json` as the agent left it, or None when absent or not a JSON object."""
    path = workspace / BASE_FILE
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with open(path, "rb") as f:
            data = json.loads(f.read(BASE_FILE_MAX))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Git:
    """git with the private GIT_DIR and a shared deadline."""

    def __init__(self, git_dir: Path, home: Path, work_tree: Path, deadline: float):
        self.work_tree = work_tree
        self.deadline = deadline
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home),
            "GIT_DIR": str(git_dir),
            "GIT_WORK_TREE": str(work_tree),
            "GIT_INDEX_FILE": str(git_dir / "index"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_ATTR_NOSYSTEM": "1",
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_OPTIONAL_LOCKS": "0",
            "LC_ALL": "C",
        }

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ChangeSetError("timed out")
        return left

    def run(self, *args: str, check: bool = True, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(
                ["git", *args], cwd=self.work_tree, env={**self.env, **(env or {})}, input=stdin, capture_output=True,
                timeout=self.remaining(),
            )
        except subprocess.TimeoutExpired:
            raise ChangeSetError(f"git {args[0]} timed out") from None
        if check and done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[-500:]
            raise ChangeSetError(f"git {args[0]} failed ({done.returncode}): {detail}")
        return done

    def diff_to(self, dest: Path, cap: int, *args: str) -> tuple[bytes, int, bool]:
        """Run `git diff -z --raw --numstat --patch ...`: (the listing, kept whole, patch bytes written, cut).

        The listing comes first, then a NUL, then the patch; only the patch goes to `dest`, at most `cap` bytes."""
        head, written, cut, listing_end, scanner = bytearray(), 0, False, None, _ListingScanner()
        with open(dest, "wb") as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(["git", *args], cwd=self.work_tree, env=self.env, stdout=subprocess.PIPE, stderr=err)
            try:
                while chunk := proc.stdout.read(1 << 16):
                    if time.monotonic() > self.deadline:
                        raise ChangeSetError(f"git {args[0]} timed out")
                    if listing_end is None:
                        head += chunk
                        listing_end = scanner.end(head)
                        if listing_end is None:
                            continue
                        chunk = bytes(head[listing_end:])
                        del head[listing_end:]
                    if written + len(chunk) > cap:
                        out.write(chunk[: cap - written])
                        written, cut = cap, True
                        break
                    out.write(chunk)
                    written += len(chunk)
            finally:
                if cut or proc.poll() is None and time.monotonic() > self.deadline:
                    proc.kill()
                proc.stdout.close()
                try:
                    code = proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise ChangeSetError(f"git {args[0]} timed out") from None
            if not cut and code != 0:
                err.seek(0)
                raise ChangeSetError(f"git {args[0]} failed ({code}): {err.read().decode(errors='replace').strip()[-500:]}")
            # A stream that ends inside the listing had no patch after it: `head` is all listing.
            if cut:
                out.write(CUT_NOTE.format(cap=cap).encode())
        return bytes(head), written, cut


def _added(done: subprocess.CompletedProcess) -> list[str]:
    """What `git add --ignore-errors` could not add (an unreadable file), as warnings; a fatal error raises."""
    lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    if done.returncode != 0 and (not lines or any(line.startswith("fatal:") for line in lines)):
        raise ChangeSetError(f"git add failed ({done.returncode}): {' '.join(lines)[-500:]}")
    return [line[:300] for line in lines[:20]]


def _add_tracked_but_ignored(git: _Git, base: str) -> list[str]:
    """Files of the base that `.gitignore` rules skipped: they are tracked, so they belong (as `git add -A` keeps them)."""
    listed = git.run("ls-tree", "-r", "-z", "--full-tree", base).stdout.split(b"\0")
    tracked = {entry.split(b"\t", 1)[1] for entry in listed if entry and not entry.startswith(b"160000 ")}
    added = set(git.run("ls-files", "-z", "--full-name").stdout.split(b"\0"))
    missing = [path for path in tracked - added if os.path.lexists(git.work_tree / os.fsdecode(path))]
    if not missing:
        return []
    return _added(git.run(
        "add", "--force", "--ignore-errors", "--pathspec-from-file=-", "--pathspec-file-nul",
        stdin=b"\0".join(sorted(missing)), env={"GIT_LITERAL_PATHSPECS": "1"}, check=False,
    ))


class _Incomplete(Exception):
    pass


def _token(buf: bytes | bytearray, pos: int) -> tuple[bytes, int]:
    """The NUL-terminated token at `pos` and the position after it; _Incomplete when its NUL has not arrived."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _Incomplete
    return bytes(buf[pos:end]), end + 1


class _ListingScanner:
    """Finds where the listing ends in a growing buffer, resuming at the last whole record (linear in its size)."""

    def __init__(self):
        self.pos, self.raw, self.numstat, self.in_numstat = 0, 0, 0, False

    def end(self, buf: bytes | bytearray) -> int | None:
        """Where the patch starts in `git diff -z --raw --numstat --patch` output; None while the listing is incomplete."""
        try:
            while not self.in_numstat:  # raw records: ":modes shas status", then one path or two
                if self.pos >= len(buf):
                    return None
                if buf[self.pos : self.pos + 1] != b":":
                    self.in_numstat = True
                    break
                record, pos = _token(buf, self.pos)
                for _ in range(2 if record.rsplit(b" ", 1)[-1][:1] in (b"R", b"C") else 1):
                    _, pos = _token(buf, pos)
                self.pos, self.raw = pos, self.raw + 1
            while self.numstat < self.raw:  # numstat records: "added<TAB>deleted<TAB>path", a rename's two paths apart
                record, pos = _token(buf, self.pos)
                for _ in range(2 if record.endswith(b"\t") else 0):
                    _, pos = _token(buf, pos)
                self.pos, self.numstat = pos, self.numstat + 1
        except _Incomplete:
            return None
        if self.pos >= len(buf):
            return None  # the separator has not arrived
        return self.pos + 1 if buf[self.pos : self.pos + 1] == b"\0" else self.pos


def _listing_end(buf: bytes | bytearray) -> int | None:
    return _ListingScanner().end(buf)


def _workspace_objects(workspace: Path, repo_dir: Path) -> tuple[Path | None, str | None]:
    """The workspace repository's object directory, if it is safe to lend to git; else (None, why)."""
    dot_git = repo_dir / ".git"
    objects = dot_git / "objects"
    if dot_git.is_symlink() or not dot_git.is_dir():
        return None, "the repository has no .git directory"
    if objects.is_symlink() or not objects.is_dir():
        return None, "the repository has no object directory"
    if not objects.resolve().is_relative_to(workspace.resolve()):
        return None, "the repository's object directory is outside the workspace"
    if (objects / "info" / "alternates").exists() or (objects / "info" / "alternates").is_symlink():
        return None, "the repository's object store has alternates (not followed)"
    return objects, None


def compute(
    workspace: str | os.PathLike, scratch: str | os.PathLike, *, cap: int = PATCH_CAP, timeout: float = TIMEOUT
) -> ChangeSet:
    """Compute the change set of `workspace`; the patch is written under `scratch`. Raises ChangeSetError."""
    workspace = Path(workspace).absolute()
    scratch = Path(scratch)
    deadline = time.monotonic() + timeout
    repo_dir = workspace / contract.REPO_DIR
    has_repo = repo_dir.is_dir() and not repo_dir.is_symlink()
    work_tree = repo_dir if has_repo else workspace
    hint = read_base_hint(workspace) if has_repo else None
    base = {"repo": None, "ref": None, "commit": None, "verified": False}
    if isinstance(hint, dict):
        for field in ("repo", "ref", "commit"):
            value = hint.get(field)
            base[field] = value[:2000] if isinstance(value, str) else None

    git_dir = scratch / "git"
    home = scratch / "home"
    home.mkdir(parents=True, exist_ok=True)
    git = _Git(git_dir, home, work_tree, deadline)
    # The private GIT_DIR, made by hand (what `git init --bare --template=` makes, minus a process).
    for sub in ("objects/info", "refs/heads"):
        (git_dir / sub).mkdir(parents=True)
    (git_dir / "HEAD").write_text("ref: refs/heads/main\n")
    (git_dir / "config").write_text(_CONFIG)

    note = None
    if not has_repo:
        note = "no repository: every file is new"
    else:
        objects, why = _workspace_objects(workspace, repo_dir)
        commit = base["commit"]
        if objects is None:
            note = f"{why}: against the empty tree"
        elif not isinstance(commit, str) or not _COMMIT_RE.fullmatch(commit):
            note = f"no valid base commit in {BASE_FILE}: against the empty tree"
        else:
            (git_dir / "objects" / "info" / "alternates").write_text(f"{objects}\n")
            kind = git.run("cat-file", "-t", commit, check=False)
            if kind.returncode == 0 and kind.stdout.strip() == b"commit":
                base["verified"] = True
            else:
                note = f"base commit {commit} is not a commit in the repository: against the empty tree"
    against = base["commit"] if base["verified"] else EMPTY_TREE

    # The index starts empty (faster than the base's tree: no per-entry comparison, each file hashed once).
    excludes = [] if has_repo else [f":(top,exclude){name}" for name in EXCLUDED]
    warnings = _added(git.run("add", "--all", "--ignore-errors", "--", ".", *excludes, check=False))
    if base["verified"]:
        warnings += _add_tracked_but_ignored(git, against)

    patch = scratch / "changes.patch"
    listing, size, cut = git.diff_to(
        patch, cap, "diff", "--cached", "-M", "--no-ext-diff", "--no-textconv", "--no-color", "--ignore-submodules=none",
        "-z", "--raw", "--numstat", "--patch", "--binary", "--full-index", against, "--",
    )
    files = _parse_listing(listing)

    summary = {
        "base": {**base, "against": "commit" if base["verified"] else "empty-tree"},
        "root": contract.REPO_DIR if has_repo else ".",
        "files": files,
        "totals": {
            "files": len(files),
            "added_lines": sum(f["added_lines"] for f in files),
            "deleted_lines": sum(f["deleted_lines"] for f in files),
        },
        "patch_bytes": size,
        "cut": cut,
    }
    if note:
        summary["base"]["note"] = note
    if warnings:
        summary["warnings"] = warnings  # files git could not read: missing from the listing
    return ChangeSet(patch=patch, summary=summary)


def _parse_listing(data: bytes) -> list[dict]:
    """Parse `git diff -z --raw --numstat`: all raw records first, then the numstat ones, in the same order."""
    tokens = data.decode("utf-8", errors="surrogateescape").split("\0")
    while tokens and tokens[-1] == "":
        tokens.pop()
    files: list[dict] = []
    i = 0
    while i < len(tokens) and tokens[i].startswith(":"):
        old_mode, new_mode, _old_sha, _new_sha, status = tokens[i][1:].split(" ")
        letter = status[0]
        entry: dict = {"status": _STATUS.get(letter, letter)}
        if letter in "RC":
            entry["old_path"], entry["path"] = tokens[i + 1], tokens[i + 2]
            i += 3
        else:
            entry["path"] = tokens[i + 1]
            i += 2
        entry["mode"] = new_mode if letter != "D" else old_mode
        files.append(entry)
    for entry in files:
        added, deleted, path = tokens[i].split("\t", 2)
        i += 1 if path else 3  # a rename's paths follow as two more tokens
        entry["binary"] = added == "-"
        entry["added_lines"] = 0 if added == "-" else int(added)
        entry["deleted_lines"] = 0 if deleted == "-" else int(deleted)
    for entry in files:
        for key in ("path", "old_path"):
            if key in entry:  # paths that are not UTF-8 are shown with replacement characters
                entry[key] = entry[key].encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    return files


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A private scratch directory outside the workspace (TMPDIR, /tmp in a pod)."""
    return tempfile.TemporaryDirectory(prefix="dockyard-changes-")
