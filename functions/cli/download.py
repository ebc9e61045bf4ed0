"""`dockyard download TASK [--to DIR] [--patch]`: a finished task's workspace, unpacked safely, or its patch.

Where from: the object store `dockyard dev` uses (`--store`, else DOCKYARD_STORE,
else `file://<data dir>/store`), or with `--url` a stream Service (a cluster's, or
`dockyard dev`'s) through its download routes, with the API token `dockyard logs`
sends. Either way the bytes are streamed: the archive is unpacked as it arrives
(tarfile's `r|gz`), never held whole in memory nor first written to disk.

Invariants (the archive comes from a workspace an untrusted agent controlled):
- Unpacking uses tarfile's `data` filter (Python 3.11.4+; refused before): no absolute paths, nothing outside
  --to (also not through a symlink unpacked before), no links that point out,
  no device nodes or fifos, no setuid/setgid/sticky bits, no group/other write.
  A member the filter refuses is skipped and named on stderr; the rest is
  unpacked (a workspace often holds an absolute symlink, e.g. a virtualenv's
  python), and the command still succeeds.
- --to (default `./<task-id>`) must not exist or be empty; `--force` unpacks
  into a non-empty one (files of the same name are replaced).
- `--patch` writes `<--to>/changes.patch` (or, with `--to -`, prints it), never
  over an existing file without `--force`; the file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agent import changes, contract
from agent.storage import ObjectNotFound, StorageError, Store, open_store
from functions.cli.client import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, CommandError, auth_headers, resolve_token
from functions.cli.render import terminal_safe

ARCHIVE, PATCH, SUMMARY = "workspace.tar.gz", "changes.patch", "changes.json"
KEYS = {ARCHIVE: contract.final_archive_key, PATCH: changes.patch_key, SUMMARY: changes.summary_key}
CHUNK_BYTES = 1 << 20
SKIPPED_SHOWN = 20  # skipped members named one by one; the rest counted


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where a task's files come from: the local store, or a stream Service with `--url` (and its token)."""
    p.add_argument("--url", help="a stream Service (a cluster's ingress, or `dockyard dev`'s URL): fetch through its download routes")
    p.add_argument("--token", help="API token with --url (default: $DOCKYARD_TOKEN, else the dev token in <data dir>/api-token)")
    p.add_argument("--store", help="object store URL without --url (default: $DOCKYARD_STORE, else file://<data dir>/store)")
    p.add_argument("--data-dir", type=Path, default=Path(".dockyard"), help="`dockyard dev`'s data dir, for its store and token (default ./.dockyard)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "download",
        help="fetch a finished task's workspace (or its patch)",
        description="Fetch a finished task's final workspace and unpack it safely into --to (default ./TASK), "
        "or with --patch its change set as changes.patch. Reads the local store, or a stream Service with --url.",
    )
    p.add_argument("task_id")
    p.add_argument("--to", help="where to unpack (default ./TASK); with --patch, `-` prints the patch")
    p.add_argument("--patch", action="store_true", help="fetch the change set's patch instead of the workspace")
    p.add_argument("--force", action="store_true", help="unpack into a non-empty directory, or replace an existing changes.patch")
    add_source_arguments(p)
    p.set_defaults(run=run)


# --- where the bytes come from ---------------------------------------------------


def store_url(given: str | None, data_dir: Path) -> str:
    from functions.core.settings import Settings

    return given or os.environ.get(Settings.variable("store")) or (Path(data_dir).resolve() / "store").as_uri()


def why_none(store: Store, task_id: str, what: str = "change set") -> str:
    """Why a task has no `what` (its change set, or another file of its final set), in words."""
    try:
        result = json.loads(store.get_bytes(contract.final_result_key(task_id)))
    except ObjectNotFound:
        return f"task {task_id} has no {what} yet: it has not finished (no final result in {store.describe()})"
    except (StorageError, ValueError) as exc:
        return f"task {task_id} has no {what}: its result cannot be read ({exc})"
    if what != "change set":
        return f"task {task_id} has no {what} in {store.describe()}, though it has finished"
    if isinstance(result, dict) and result.get("changes_error"):
        return f"task {task_id} has no {what}: it could not be computed ({result['changes_error']})"
    return f"task {task_id} has no {what}: it finished before change sets were recorded"




def source_of(args: argparse.Namespace) -> Source:
    if not contract.is_valid_task_id(args.task_id):
        raise CommandError(f"task id {args.task_id!r} is not one: lowercase letters, digits and '-'", EXIT_BAD_INPUT)
    if args.url:
        return RemoteSource(args.url, resolve_token(args.token, args.data_dir))
    try:
        return LocalSource(open_store(store_url(args.store, args.data_dir)))
    except (ValueError, StorageError) as exc:
        raise CommandError(f"cannot open the store: {exc}") from None


class Source:
    def open(self, task_id: str, name: str) -> Iterator[bytes]:
        """The file's bytes in chunks; opened now (a `CommandError` if it is missing), read as iterated."""
        raise NotImplementedError


class LocalSource(Source):
    def __init__(self, store: Store):
        self.store = store

    def open(self, task_id, name):
        try:
            reader = self.store.open_read(KEYS[name](task_id))
        except ObjectNotFound:
            raise CommandError(why_none(self.store, task_id, "change set" if name in (PATCH, SUMMARY) else name)) from None
        except StorageError as exc:
            raise CommandError(f"cannot read task {task_id}'s {name}: {exc}") from None
        return _translated(reader.chunks(), f"reading task {task_id}'s {name}")


class RemoteSource(Source):
    def __init__(self, url: str, token: str | None):
        self.url = url.rstrip("/")
        self.token = token

    def open(self, task_id, name):
        import httpx

        from functions.cli.client import _error_text

        client = httpx.Client(timeout=httpx.Timeout(30, read=300))
        try:
            response = client.send(client.build_request("GET", f"{self.url}/api/tasks/{task_id}/{name}", headers=auth_headers(self.token)), stream=True)
        except httpx.HTTPError as exc:
            client.close()
            raise CommandError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code != 200:
            response.read()
            client.close()
            code = EXIT_FAILED if response.status_code == 404 or response.status_code >= 500 else EXIT_BAD_INPUT
            raise CommandError(_error_text(response), code)

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.iter_bytes(CHUNK_BYTES)
            except httpx.HTTPError as exc:
                raise CommandError(f"the download of task {task_id}'s {name} broke off: {exc}") from None
            finally:
                response.close()
                client.close()

        return chunks()


def _translated(chunks: Iterator[bytes], doing: str) -> Iterator[bytes]:
    try:
        yield from chunks
    except StorageError as exc:
        raise CommandError(f"{doing}: {exc}") from None


class ChunkFile:
    """A read-only file over an iterator of chunks: what tarfile's stream mode reads (in small pieces)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._chunk = b""
        self._at = 0  # read position in the current chunk: no copying of what is left of it

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0:
            if self._at >= len(self._chunk):
                self._chunk, self._at = next(self._chunks, b""), 0
                if not self._chunk:
                    break
            end = len(self._chunk) if n < 0 else min(len(self._chunk), self._at + n)
            parts.append(self._chunk[self._at : end])
            n = n if n < 0 else n - (end - self._at)
            self._at = end
        return b"".join(parts)


# --- unpacking ---------------------------------------------------------------------


def unpack(chunks: Iterator[bytes], dest: Path) -> tuple[int, list[str]]:
    """Unpack a tar.gz stream into `dest` through tarfile's `data` filter: (members written, refused members with why)."""
    if not hasattr(tarfile, "data_filter"):  # Python before 3.11.4: no safe way to unpack, so none
        raise CommandError("unpacking an agent's workspace safely needs Python 3.11.4 or later (tarfile's data filter)")
    skipped: list[str] = []
    written = 0

    def only_safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        nonlocal written
        try:
            safe = tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            skipped.append(f"{member.name}: {exc}")
            return None
        written += 1
        return safe

    try:
        with tarfile.open(fileobj=ChunkFile(chunks), mode="r|gz") as tar:
            tar.extractall(dest, filter=only_safe)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CommandError(f"the workspace archive cannot be unpacked into {dest}: {exc}") from None
    return written, skipped


def _check_dir(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise CommandError(f"--to {dest} is not a directory", EXIT_BAD_INPUT)
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise CommandError(f"--to {dest} is not empty: choose another directory, or --force to unpack into it", EXIT_BAD_INPUT)


def _write_patch(source: Source, task_id: str, dest: Path, force: bool) -> Path:
    target = dest / "changes.patch"
    if dest.exists() and not dest.is_dir():
        raise CommandError(f"--to {dest} is not a directory (--to - prints the patch)", EXIT_BAD_INPUT)
    if target.exists() and not force:
        raise CommandError(f"{target} exists: --force to replace it", EXIT_BAD_INPUT)
    chunks = source.open(task_id, PATCH)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".changes.patch.", dir=dest)
    except OSError as exc:
        raise CommandError(f"cannot write into {dest}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CommandError(f"cannot write {target}: {exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def run(args: argparse.Namespace) -> int:
    source = source_of(args)
    if args.patch and args.to == "-":
        out = sys.stdout.buffer
        for chunk in source.open(args.task_id, PATCH):
            out.write(chunk)
        out.flush()
        return EXIT_OK
    dest = Path(args.to or args.task_id)
    if args.patch:
        path = _write_patch(source, args.task_id, dest, args.force)
        print(terminal_safe(f"wrote {path}"))
        return EXIT_OK
    _check_dir(dest, args.force)
    chunks = source.open(args.task_id, ARCHIVE)  # before the directory is made: a missing task leaves none
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot make --to {dest}: {exc}") from None
    written, skipped = unpack(chunks, dest)
    for line in skipped[:SKIPPED_SHOWN]:
        print(terminal_safe(f"dockyard download: skipped {line}"), file=sys.stderr)
    if len(skipped) > SKIPPED_SHOWN:
        print(f"dockyard download: skipped {len(skipped) - SKIPPED_SHOWN} more unsafe members", file=sys.stderr)
    note = f"; skipped {len(skipped)} unsafe members (named above)" if skipped else ""
    print(terminal_safe(f"unpacked {written} entries of task {args.task_id}'s workspace into {dest}{note}"))
    return EXIT_OK
