"""The snapshotter sidecar: snapshots the checkpoint on request, on a timer, and at shutdown.

It alone holds the storage credentials. It answers `{"op": "snapshot"}` on
`cmd.agent.<id>`, the subject the agent listens on too; every other op is left
to the agent, unanswered, so a request/reply there gets exactly one answer. Each snapshot publishes a `snapshot` event on `events.agent.<id>`.
Without NATS it keeps working (timer and final snapshots) and keeps trying to
connect in the background. On SIGTERM/SIGINT it takes a final snapshot,
uploads the final workspace archive, the change set (agent/changes.py),
pushes it as a branch when the runtime passed `--push-url` (agent/push.py; the
only process given `--git-credentials-dir`), then uploads result.json, publishes the final
event and exits 0. Snapshots never overlap: one lock serialises them.

It idles lean: boto3 is imported only for an S3 store, sqlite3 and tarfile at the
first snapshot, and nats-py without aiohttp (see `import_nats_lean`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent import contract
from agent.cli import UsageError, add_nats_arguments, check_common, nats_auth, stderr_logger, task_parser
from agent.snapshot import (
    CHANGE_FIELDS,
    SnapshotResult,
    prune_snapshots,
    remove_stale_temp_files,
    snapshot_event,
    take_snapshot,
    upload_final,
)
from agent.push import PushRequest, default_branch
from agent.storage import StorageError, Store, open_store
from agent.telemetry.connection import NatsAuth, public_url, server_list

DEFAULT_KEEP = 5
FINAL_ATTEMPTS = 3
NO_CHECKPOINT = "no checkpoint yet"


_log = stderr_logger("snapshotter")


@dataclass(frozen=True)
class Settings:
    task_id: str
    workspace: Path
    store_url: str
    nats_url: str | None
    interval: float
    keep: int
    nats_auth: NatsAuth = NatsAuth()
    push: PushRequest | None = None  # the task's repo.push, from its spec (the runtime's flags)

    @property
    def db_path(self) -> Path:
        return self.workspace / contract.checkpoint_path(self.task_id)

    def summary(self, store: Store) -> str:
        return (
            f"task={self.task_id} db={self.db_path} store={store.describe()} "
            f"nats={public_url(self.nats_url) if self.nats_url else 'off'}{self.nats_auth.describe()} "
            f"interval={self.interval:g}s{' (off)' if self.interval <= 0 else ''} keep={self.keep}"
            + (f" push={self.push.branch}" if self.push else "")
        )


class Snapshotter:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._nc = None
        self._tasks: set[asyncio.Task] = set()
        self._last_nats_error = 0.0

    # --- snapshots ------------------------------------------------------------

    async def snapshot(self, *, final: bool = False, log_unchanged: bool = True) -> SnapshotResult:
        """Take one snapshot (serialised), prune old ones, publish the event. FileNotFoundError without a db."""
        s = self.settings
        async with self._lock:
            result = await asyncio.to_thread(take_snapshot, s.db_path, self.store, s.task_id)
            if result.uploaded:
                try:
                    await asyncio.to_thread(prune_snapshots, self.store, s.task_id, s.keep)
                except StorageError as exc:
                    _log(f"warning: pruning old snapshots failed: {exc}")
        if result.uploaded or log_unchanged:
            verb = "uploaded" if result.uploaded else "unchanged, kept"
            _log(f"snapshot {verb} {self.store.url_for(result.key)} ({result.size} bytes)")
        if not final:
            await self.publish_event(snapshot_event(s.task_id, result))
        return result

    async def _retrying(self, what: str, attempt_once):
        """Storage errors at shutdown are retried a little: this is the last chance."""
        for attempt in range(1, FINAL_ATTEMPTS + 1):
            try:
                return await attempt_once()
            except StorageError as exc:
                _log(f"{what} attempt {attempt}/{FINAL_ATTEMPTS} failed: {exc}")
                if attempt == FINAL_ATTEMPTS:
                    raise
                await asyncio.sleep(attempt)

    async def _upload_final(self):
        async with self._lock:
            s = self.settings
            return await asyncio.to_thread(upload_final, s.workspace, self.store, s.task_id, s.push)

    async def final(self) -> int:
        """Final snapshot, then the final archive and result.json, then the final event."""
        s = self.settings
        result, errors = None, []
        if s.db_path.exists():
            try:
                result = await self._retrying("final snapshot", lambda: self.snapshot(final=True))
            except Exception as exc:  # a broken database must not cost the workspace archive
                _log(f"final snapshot failed: {exc}")
                errors.append(f"final snapshot: {exc}")
        try:
            done = await self._retrying("final upload", self._upload_final)
        except Exception as exc:
            _log(f"final upload failed: {exc}")
            errors.append(f"final upload: {exc}")
            await self.publish_event(snapshot_event(s.task_id, result, final=True, error="; ".join(errors)))
            return contract.EXIT_RETRY
        _log(
            f"final set uploaded: {self.store.url_for(done.archive_key)} ({done.archive_size} bytes), "
            f"{self.store.url_for(done.result_key)} (outcome {done.result.get('outcome')!r})"
        )
        if "push" in done.result:
            _log(f"pushed branch {done.result['push']['branch']} at {done.result['push']['commit']}")
        extra = {"archive_key": done.archive_key, "result_key": done.result_key}
        for field in CHANGE_FIELDS:
            if field in done.result:
                extra[field] = done.result[field]
        if errors:
            extra["error"] = "; ".join(errors)
        await self.publish_event(snapshot_event(s.task_id, result, final=True, **extra))
        return contract.EXIT_RETRY if errors else 0

    async def periodic(self) -> None:
        interval = self.settings.interval
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)
                return
            except asyncio.TimeoutError:
                pass
            if not self.settings.db_path.exists():
                continue
            try:
                await self.snapshot(log_unchanged=False)
            except Exception as exc:  # keep the timer alive whatever one snapshot did
                _log(f"periodic snapshot failed: {exc}")

    # --- NATS -------------------------------------------------------------------

    async def _nats_error(self, exc: Exception) -> None:
        # Connection errors repeat every retry; say so at most every 30 s.
        now = time.monotonic()
        if now - self._last_nats_error > 30:
            self._last_nats_error = now
            _log(f"NATS: {type(exc).__name__}: {exc or 'connection failed'} (retrying in the background)")

    async def connect(self) -> None:
        import nats

        s = self.settings
        while not self.stopping.is_set():
            try:
                nc = await nats.connect(
                    servers=[s.nats_url],
                    name=f"snapshotter-{s.task_id}",
                    inbox_prefix=contract.inbox_prefix(s.task_id),
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,  # never give up, also on the first connect
                    reconnect_time_wait=1,
                    error_cb=self._nats_error,
                    disconnected_cb=_on_disconnected,
                    reconnected_cb=_on_reconnected,
                    **s.nats_auth.connect_options(),
                )
                await nc.subscribe(contract.subject_cmd(s.task_id), cb=self._on_cmd)
                await nc.flush(timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._nats_error(exc)
                await asyncio.sleep(1)
                continue
            self._nc = nc
            _log(f"listening on {contract.subject_cmd(s.task_id)}")
            return

    async def _on_cmd(self, msg) -> None:
        self._spawn(self._answer(msg))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg) -> None:
        try:
            body = json.loads(msg.data or b"null")
        except ValueError:
            body = None
        op = body.get("op") if isinstance(body, dict) else None
        if op != "snapshot":
            return  # every other op is the agent's to answer
        if self.stopping.is_set():
            await self._reply(msg, {"ok": False, "error": "shutting down; the final snapshot follows"})
            return
        try:
            result = await self.snapshot()
        except FileNotFoundError:
            answer = {"ok": False, "error": NO_CHECKPOINT}
        except Exception as exc:
            _log(f"requested snapshot failed: {exc}")
            answer = {"ok": False, "error": str(exc)}
        else:
            answer = {"ok": True, "key": result.key, "size": result.size, "uploaded": result.uploaded}
        await self._reply(msg, answer)

    async def _reply(self, msg, answer: dict) -> None:
        if not msg.reply:
            return
        try:
            await msg.respond(json.dumps(answer).encode())
        except Exception as exc:
            _log(f"could not reply: {exc}")

    async def publish_event(self, event: dict) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        try:
            await nc.publish(contract.subject_events(self.settings.task_id), json.dumps(event).encode())
            await nc.flush(timeout=2)
        except Exception as exc:
            _log(f"could not publish the snapshot event: {exc}")

    # --- lifecycle --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        # Printed once SIGTERM is handled, so "starting:" in the log means a stop is safe.
        _log(f"starting: {self.settings.summary(self.store)}")
        for path in remove_stale_temp_files(self.settings.workspace, self.settings.task_id):
            _log(f"removed a temp file left by an earlier run: {path}")
        background = []
        if self.settings.nats_url:
            background.append(asyncio.create_task(self.connect()))
        if self.settings.interval > 0:
            background.append(asyncio.create_task(self.periodic()))
        await self.stopping.wait()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Requests already being answered finish before the final snapshot (the lock orders them).
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        code = await self.final()
        await self._close_nats()
        return code

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            _log(f"{signal.Signals(sig).name}: taking the final snapshot")
            self.stopping.set()

    async def _close_nats(self) -> None:
        if self._nc is None:
            return
        try:
            await asyncio.wait_for(self._nc.drain(), timeout=3)
        except Exception:
            pass
        if not self._nc.is_closed:
            try:
                await self._nc.close()
            except Exception:
                pass


async def _on_disconnected() -> None:
    _log("NATS disconnected")


async def _on_reconnected() -> None:
    _log("NATS reconnected")


def _parser():
    parser = task_parser(
        "python -m agent snapshotter",
        "Snapshot the task's SQLite checkpoint to object storage on request (NATS), "
        "every --interval seconds, and at shutdown (SIGTERM/SIGINT), then upload the final workspace.",
        store=True,
    )
    env = os.environ
    add_nats_arguments(parser, "snapshot requests and events; without it, only timer and final snapshots")
    parser.add_argument(
        "--interval",
        type=float,
        default=env.get("DOCKYARD_SNAPSHOT_INTERVAL") or "0",
        help="seconds between periodic snapshots, 0 = off (env DOCKYARD_SNAPSHOT_INTERVAL, default 0)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=env.get("DOCKYARD_SNAPSHOT_KEEP") or str(DEFAULT_KEEP),
        help=f"how many checkpoint snapshots to keep (env DOCKYARD_SNAPSHOT_KEEP, default {DEFAULT_KEEP})",
    )
    parser.add_argument("--push-url", default=None, metavar="URL",
                        help="the task's repo.url: at the end, commit the change set and push it there (the task's repo.push)")
    parser.add_argument("--push-branch", default=None, metavar="BRANCH", help="the branch to push (default dockyard/<task-id>)")
    parser.add_argument("--push-proxy", default=None, metavar="URL", help="HTTP(S) proxy of the push (a pod's egress proxy)")
    parser.add_argument("--git-credentials-dir", default=env.get("DOCKYARD_GIT_CREDENTIALS_DIR") or None, metavar="DIR",
                        help="files username, password (or token) and optionally hosts, for the push [DOCKYARD_GIT_CREDENTIALS_DIR]")
    return parser


def parse_settings(argv: list[str] | None) -> Settings:
    args = _parser().parse_args(argv)
    check_common(args)
    if args.interval < 0:
        raise UsageError(f"--interval must be >= 0, got {args.interval:g}")
    if args.keep < 1:
        raise UsageError(f"--keep must be >= 1, got {args.keep}")
    return Settings(
        task_id=args.task_id,
        workspace=Path(args.workspace).absolute(),
        store_url=args.store,
        nats_url=args.nats or None,
        interval=args.interval,
        keep=args.keep,
        nats_auth=nats_auth(args),
        push=_push_request(args),
    )


def _push_request(args) -> PushRequest | None:
    if not args.push_url:
        if args.push_branch or args.push_proxy:
            raise UsageError("--push-branch and --push-proxy need --push-url")
        return None
    # The branch was validated with the task (functions/core/task.py); git refuses any ref name that is not one.
    return PushRequest(args.push_url, args.push_branch or default_branch(args.task_id), args.git_credentials_dir, args.push_proxy)

def import_nats_lean(nats_url: str | None) -> None:
    """Import nats-py with aiohttp hidden, unless a websocket server (ws://, wss://) is configured.

    nats-py imports aiohttp only for its websocket transport and treats an ImportError
    as "no websocket support" (aiohttp is its optional extra); over TCP it never uses
    it. Hidden, the idle snapshotter saves aiohttp and its dependencies (~11 MB RSS,
    ~80 ms of imports). Called by `main` only: a process that already imported either
    library (tests, the agent) is left alone. aiohttp stays importable afterwards."""
    if not nats_url or "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    if any(url.startswith(("ws://", "wss://")) for url in server_list(nats_url)):
        return
    sys.modules["aiohttp"] = None  # `import aiohttp` raises ImportError while this is here
    try:
        import nats  # noqa: F401
    finally:
        if "aiohttp" in sys.modules and sys.modules["aiohttp"] is None:
            del sys.modules["aiohttp"]

def main(argv: list[str] | None = None) -> int:
    prog = "python -m agent snapshotter"
    try:
        settings = parse_settings(argv)
        store = open_store(settings.store_url)
        import_nats_lean(settings.nats_url)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ValueError, StorageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    return asyncio.run(Snapshotter(settings, store).run())
