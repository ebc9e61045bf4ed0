"""A task's stored files, streamed out of the object store: the download routes of the stream app.

    GET /api/tasks/{task_id}/changes.patch        the change set's patch (text/x-diff)
    GET /api/tasks/{task_id}/changes.json         its file list (agent/changes.py)
    GET /api/tasks/{task_id}/result.json          the final result
    GET /api/tasks/{task_id}/workspace.tar.gz     the final workspace (an attachment)
    GET /api/tasks/{task_id}/snapshots            the checkpoint snapshots: [{"name", "key", "size"}], oldest first
    GET /api/tasks/{task_id}/snapshots/{name}     one of them (an attachment)
    GET /api/tasks/{task_id}/outputs/{call_id}    one tool call's full output, out of the final workspace archive

Invariants:
- A read token is enough (functions/stream/auth.py guards every /api/ route).
- Store keys are built only from validated ids: the task id (agent.contract),
  a snapshot name and a call id each one file-safe name, never `.` or `..`;
  a bad one is a 400 naming its field. The task must be in the registry (404).
- Nothing is held whole: an object goes out in `storage.CHUNK_BYTES` reads
  (a file, or boto3's StreamingBody) and the server's flow control paces the
  reads to the client; the reader is closed when the response ends, however
  it ends (a HEAD, a client gone). An output is found by reading the archive as a gzip
  stream (tarfile's `r|gz`), member by member, and streamed the same way.
- A missing object is a 404 that says what is missing, with the field; an
  unreachable store a 503 (`StoreUnavailable`). Store calls run in the thread
  pool: the event loop serves the live traces meanwhile.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from functools import partial

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent import changes, contract
from agent.objects import CHUNK_BYTES, ObjectNotFound, ObjectReader, StorageError
from agent.storage import Store, open_store
from functions.core import bus
from functions.core.settings import Settings
from functions.errors import BadInput, PermanentError, StoreUnavailable

FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # a snapshot name or a call id: one file-safe name
AFTER_FINISH = "available once the task has finished"
# What is served was written by an agent (untrusted), from the cockpit's own origin: a browser must never
# render it as a page of that origin. No sniffing into HTML, and whatever it renders has no script, no
# origin, no fetch (a sandbox without allow-*).
UNTRUSTED_CONTENT_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}


def file_name(request: Request, field: str) -> str:
    value = request.path_params[field]
    if not FILE_NAME.fullmatch(value) or value in (".", ".."):
        raise BadInput(f"{field} must be 1-128 letters, digits, '_', '.' or '-' (and not '.' or '..')", field)
    return value


def call_id_of(request: Request) -> str:
    """A model's tool call id, as the trace shows it: any printable text without '/' (1-256 characters);
    the archive member is its file-safe form (`contract.output_file`), as the agent wrote it."""
    value = request.path_params["call_id"]
    if not 0 < len(value) <= 256 or "/" in value or contract.has_control_chars(value):
        raise BadInput("call_id must be a tool call id: 1-256 characters, no '/' and no control characters", "call_id")
    return value


def snapshot_name(key: str, task_id: str) -> str:
    return key[len(contract.checkpoints_prefix(task_id)) :]


class Downloads:
    """The routes over one store, opened on first use (an S3 client costs memory an idle stream saves)."""

    def __init__(self, settings: Settings, task_id_of: Callable[[Request], str]):
        self.settings = settings
        self.task_id_of = task_id_of  # the app's one rule for a task id in a path
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            try:
                self._store = open_store(self.settings.store)
            except (ValueError, StorageError) as exc:
                raise StoreUnavailable(f"object store {self.settings.store!r}: {exc}") from exc
        return self._store

    async def task_id(self, request: Request) -> str:
        """The validated task id of a registered task."""
        task_id = self.task_id_of(request)
        if await (await bus.connect(self.settings)).registry.get(task_id) is None:
            raise BadInput(f"no task {task_id!r}", "task_id", 404)
        return task_id

    async def _open(self, key: str, missing: str, field: str) -> ObjectReader:
        try:
            return await run_in_threadpool(self.store.open_read, key)
        except ObjectNotFound:
            raise BadInput(missing, field, 404) from None
        except StorageError as exc:
            raise StoreUnavailable(f"object store: {exc}") from exc

    async def _stream(self, key: str, missing: str, media_type: str, *, field: str = "task_id", attachment: str | None = None) -> Response:
        reader = await self._open(key, missing, field)
        headers = {"Content-Length": str(reader.size), **UNTRUSTED_CONTENT_HEADERS}
        if attachment:
            headers["Content-Disposition"] = f'attachment; filename="{attachment}"'
        return StreamingResponse(reader.chunks(), media_type=media_type, headers=headers, background=BackgroundTask(reader.close))

    async def final_file(self, request: Request, key_of, name: str, media_type: str, attachment: bool = False) -> Response:
        task_id = await self.task_id(request)
        missing = f"task {task_id} has no {name}: {AFTER_FINISH}"
        return await self._stream(key_of(task_id), missing, media_type, attachment=f"{task_id}-{name}" if attachment else None)

    async def snapshots(self, request: Request) -> Response:
        task_id = await self.task_id(request)

        def listing() -> list[dict]:
            keys = self.store.list(contract.checkpoints_prefix(task_id))
            return [{"name": snapshot_name(k, task_id), "key": k, "size": self.store.size(k)} for k in keys]

        try:
            return JSONResponse(await run_in_threadpool(listing))
        except ObjectNotFound:  # removed between list and size (retention): list again
            return JSONResponse(await run_in_threadpool(listing))
        except StorageError as exc:
            raise StoreUnavailable(f"object store: {exc}") from exc

    async def snapshot(self, request: Request) -> Response:
        task_id = await self.task_id(request)
        name = file_name(request, "name")
        key = contract.checkpoints_prefix(task_id) + name
        missing = f"task {task_id} has no snapshot {name!r} (GET /api/tasks/{task_id}/snapshots lists them)"
        return await self._stream(key, missing, "application/vnd.sqlite3", field="name", attachment=f"{task_id}-{name}")

    async def output(self, request: Request) -> Response:
        task_id = await self.task_id(request)
        call_id = call_id_of(request)
        reader = await self._open(contract.final_archive_key(task_id), f"task {task_id} has no outputs yet: {AFTER_FINISH}", "task_id")
        try:
            size, body = await run_in_threadpool(find_member, reader, contract.output_file(call_id))
        except BaseException:
            reader.close()
            raise
        if body is None:
            raise BadInput(f"task {task_id} kept no output of call {call_id!r} (it was short, or dropped over the limit)", "call_id", 404)
        return StreamingResponse(
            body, media_type="text/plain; charset=utf-8", headers={"Content-Length": str(size), **UNTRUSTED_CONTENT_HEADERS},
            background=BackgroundTask(reader.close),
        )

    def routes(self) -> list[Route]:
        """`{name:path}`, `{call_id:path}`: a name with a `/` in it reaches `file_name`, which answers 400 naming it."""
        final = self.final_file
        return [
            Route("/api/tasks/{task_id}/changes.patch", partial(final, key_of=changes.patch_key, name="changes.patch", media_type="text/x-diff")),
            Route("/api/tasks/{task_id}/changes.json", partial(final, key_of=changes.summary_key, name="changes.json", media_type="application/json")),
            Route("/api/tasks/{task_id}/result.json", partial(final, key_of=contract.final_result_key, name="result.json", media_type="application/json")),
            Route(
                "/api/tasks/{task_id}/workspace.tar.gz",
                partial(final, key_of=contract.final_archive_key, name="workspace.tar.gz", media_type="application/gzip", attachment=True),
            ),
            Route("/api/tasks/{task_id}/snapshots", self.snapshots),
            Route("/api/tasks/{task_id}/snapshots/{name:path}", self.snapshot),
            Route("/api/tasks/{task_id}/outputs/{call_id:path}", self.output),
        ]


def find_member(reader: ObjectReader, name: str) -> tuple[int, Iterator[bytes] | None]:
    """Read the tar.gz stream up to the regular file `name`: (its size, its bytes in chunks), or (0, None) and the
    reader closed. The iterator closes the reader when it ends. Only what was read past is decompressed, never kept."""
    try:
        tar = tarfile.open(fileobj=reader, mode="r|gz")
        for member in tar:
            if member.name.removeprefix("./") == name and member.isreg():
                return member.size, _member_chunks(tar, member, reader)
    except (tarfile.TarError, EOFError, OSError) as exc:
        reader.close()
        raise PermanentError(f"the task's final workspace archive cannot be read: {exc}", "task_id") from exc
    except StorageError as exc:
        reader.close()
        raise StoreUnavailable(f"object store: {exc}") from exc
    except BaseException:
        reader.close()
        raise
    reader.close()
    return 0, None


def _member_chunks(tar: tarfile.TarFile, member: tarfile.TarInfo, reader: ObjectReader) -> Iterator[bytes]:
    try:
        body = tar.extractfile(member)
        while chunk := body.read(CHUNK_BYTES):
            yield chunk
    finally:
        reader.close()


def routes(settings: Settings, task_id_of: Callable[[Request], str]) -> list[Route]:
    """The download routes; `task_id_of(request)` validates the path's task id (400 naming `task_id`)."""
    return Downloads(settings, task_id_of).routes()
