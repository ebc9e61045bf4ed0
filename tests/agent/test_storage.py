"""agent.storage against both backends: a directory (file://) and S3 over HTTP (moto)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import storage
from agent.storage import FileStore, ObjectNotFound, S3Store, StorageError, open_store


def test_bytes_and_files_round_trip(store, tmp_path):
    store.put_bytes("jobs/a/final/result.json", b'{"outcome": "done"}')
    assert store.get_bytes("jobs/a/final/result.json") == b'{"outcome": "done"}'

    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000 + b"end")
    store.put_file("jobs/a/checkpoints/1.db", src)
    dest = tmp_path / "out" / "deep" / "copy.bin"
    store.get_file("jobs/a/checkpoints/1.db", dest)
    assert dest.read_bytes() == src.read_bytes()
    # No temp files are left next to the download.
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]

    # Overwrite replaces the whole object.
    store.put_bytes("jobs/a/final/result.json", b"{}")
    assert store.get_bytes("jobs/a/final/result.json") == b"{}"


def test_put_file_with_move_takes_the_file(store, tmp_path):
    src = tmp_path / "snapshot.db"
    src.write_bytes(b"snapshot bytes")
    store.put_file("jobs/a/checkpoints/1.db", src, move=True)
    assert not src.exists()
    assert store.get_bytes("jobs/a/checkpoints/1.db") == b"snapshot bytes"


def _pending_multipart_uploads(store) -> list:
    if not isinstance(store, S3Store):
        return []
    return store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


@pytest.mark.parametrize("size", [100_003, 9 * 2**20 + 7], ids=["one-put", "multipart"])
def test_put_file_hashed_reads_once_and_the_hash_is_the_stored_content(store, tmp_path, readers, size):
    src = tmp_path / "snapshot.db"
    src.write_bytes(os.urandom(size))
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    seen = []
    put = store.put_file_hashed("jobs/a/checkpoints/1.db", src, keep=lambda sha: seen.append(sha) or True)
    assert put.stored and put.size == size and put.sha256 == expected and seen == [expected]
    # The object is exactly what was hashed.
    assert hashlib.sha256(store.get_bytes("jobs/a/checkpoints/1.db")).hexdigest() == expected
    # One reader, and it read the file once (above 8 MB S3 takes it as a multipart upload).
    assert [r.bytes_read for r in readers] == [size]
    assert _pending_multipart_uploads(store) == []


@pytest.mark.parametrize("size", [100_003, 9 * 2**20 + 7], ids=["one-put", "multipart"])
def test_put_file_hashed_refused_by_keep_stores_nothing(store, tmp_path, readers, size):
    src = tmp_path / "snapshot.db"
    src.write_bytes(os.urandom(size))
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    put = store.put_file_hashed("jobs/a/checkpoints/1.db", src, keep=lambda sha: False)
    assert not put.stored and put.sha256 == expected
    assert store.list("jobs/") == [] and not store.exists("jobs/a/checkpoints/1.db")
    assert [r.bytes_read for r in readers] == [size]
    assert _pending_multipart_uploads(store) == []  # an S3 multipart upload begun is aborted


def test_file_store_put_file_hashed_copies_across_filesystems(tmp_path, readers):
    other_fs = Path("/dev/shm")
    if not other_fs.is_dir() or os.stat(other_fs).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temp dir")
    store = open_store((tmp_path / "store").as_uri())
    data = os.urandom(5 * 2**20 + 1)
    src = other_fs / f"dockyard-test-{os.getpid()}-{tmp_path.name}.db"
    try:
        src.write_bytes(data)
        put = store.put_file_hashed("jobs/a/checkpoints/1.db", src)
        assert put.stored and put.sha256 == hashlib.sha256(data).hexdigest()
        assert store.get_bytes("jobs/a/checkpoints/1.db") == data
        assert [r.bytes_read for r in readers] == [len(data)]
        refused = store.put_file_hashed("jobs/a/checkpoints/2.db", src, keep=lambda sha: False)
        assert not refused.stored and store.list("jobs/") == ["jobs/a/checkpoints/1.db"]
        assert not [p for p in (tmp_path / "store").rglob("*") if storage._TMP_MARK in p.name]
    finally:
        src.unlink(missing_ok=True)


def test_put_file_hashed_of_a_missing_file_is_a_storage_error(store, tmp_path):
    with pytest.raises(StorageError, match="not a file"):
        store.put_file_hashed("jobs/a/checkpoints/1.db", tmp_path / "missing.db")


def test_exists_list_delete(store):
    for key in ["jobs/a/checkpoints/2.db", "jobs/a/checkpoints/1.db", "jobs/a/final/result.json", "jobs/ab/x"]:
        store.put_bytes(key, key.encode())
    assert store.exists("jobs/a/checkpoints/1.db")
    assert not store.exists("jobs/a/checkpoints/3.db")
    assert not store.exists("jobs/a/checkpoints")  # a "directory" is not an object

    assert store.list("jobs/a/checkpoints/") == ["jobs/a/checkpoints/1.db", "jobs/a/checkpoints/2.db"]
    assert store.list("jobs/a/") == ["jobs/a/checkpoints/1.db", "jobs/a/checkpoints/2.db", "jobs/a/final/result.json"]
    assert store.list("jobs/a") == [
        "jobs/a/checkpoints/1.db",
        "jobs/a/checkpoints/2.db",
        "jobs/a/final/result.json",
        "jobs/ab/x",
    ]
    assert store.list("nothing/here/") == []
    assert len(store.list("")) == 4

    store.delete("jobs/a/checkpoints/1.db")
    store.delete("jobs/a/checkpoints/1.db")  # deleting twice is fine
    assert not store.exists("jobs/a/checkpoints/1.db")
    assert store.list("jobs/a/checkpoints/") == ["jobs/a/checkpoints/2.db"]


def test_missing_key_raises_object_not_found(store, tmp_path):
    with pytest.raises(ObjectNotFound):
        store.get_bytes("jobs/none/final/result.json")
    with pytest.raises(ObjectNotFound):
        store.get_file("jobs/none/final/result.json", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert issubclass(ObjectNotFound, StorageError)


def test_bad_keys_are_refused(store):
    for key in ["", "/abs", "a/../b", "a//b", "a/./b", "dir/"]:
        with pytest.raises(ValueError):
            store.put_bytes(key, b"x")


def test_describe_and_url_for(store):
    url = store.describe()
    assert url.startswith(("s3://", "file:///"))
    assert store.url_for("jobs/x/final/result.json") == f"{url}/jobs/x/final/result.json"


def test_s3_prefix_maps_keys_and_describe_has_no_secrets(s3_store_url, s3_endpoint):
    import boto3

    store = open_store(s3_store_url)
    assert isinstance(store, S3Store)
    assert store.describe() == s3_store_url
    store.put_bytes("jobs/x/a", b"1")
    bucket = s3_store_url.split("/")[2]
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in raw["Contents"]] == ["dockyard/jobs/x/a"]
    assert "testing" not in store.describe() + store.url_for("jobs/x/a")


def test_s3_credentials_and_endpoint_from_secret_files(s3_store_url, s3_endpoint, tmp_path, monkeypatch):
    secrets = tmp_path / "secrets"
    (secrets / "s3").mkdir(parents=True)
    (secrets / "s3" / "endpoint").write_text(s3_endpoint + "\n")
    (secrets / "s3" / "access_key_id").write_text("filekey\n")
    (secrets / "s3" / "secret_access_key").write_text("filesecret\n")
    monkeypatch.delenv("DOCKYARD_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")

    store = open_store(s3_store_url, secrets_dir=secrets)
    assert store.endpoint == s3_endpoint
    assert store._client._request_signer._credentials.access_key == "filekey"
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"

    monkeypatch.setenv("DOCKYARD_SECRETS_DIR", str(secrets))
    assert open_store(s3_store_url).get_bytes("k") == b"v"


def test_s3_incomplete_credential_files_are_an_error(s3_store_url, tmp_path):
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "access_key_id").write_text("only-the-id")
    with pytest.raises(StorageError, match="secret_access_key"):
        open_store(s3_store_url, secrets_dir=tmp_path)


def test_s3_missing_bucket_is_a_storage_error(s3_endpoint, s3_store_url):
    store = open_store("s3://no-such-bucket-dockyard/p")
    with pytest.raises(StorageError):
        store.put_bytes("k", b"v")
    with pytest.raises(StorageError):
        store.list("")


def test_file_store_url_forms(tmp_path):
    store = open_store(tmp_path.as_uri())
    assert isinstance(store, FileStore)
    assert store.describe() == tmp_path.as_uri()
    assert open_store(f"file://localhost{tmp_path}").describe() == tmp_path.as_uri()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relative/dir",
        "/abs/dir",
        "file://relative/dir",
        "file:relative",
        "http://x/y",
        "s3://",
        "s3:///x",
        "s3://b/a/../c",
    ],
)
def test_bad_urls_name_the_accepted_forms(url):
    with pytest.raises(ValueError, match=r"s3://bucket\[/prefix\] or file:///"):
        open_store(url)


def test_importing_storage_does_not_import_boto3(agent_env):
    code = "import sys, agent.storage; sys.exit(1 if 'boto3' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], env=agent_env).returncode == 0


def test_opening_an_s3_store_imports_boto3_only_at_its_first_request(agent_env, s3_store_url, s3_endpoint):
    code = (
        "import sys; from agent.storage import open_store; store = open_store(sys.argv[1]); "
        "print('boto3' in sys.modules); store.put_bytes('k', b'v'); print('boto3' in sys.modules, store.get_bytes('k'))"
    )
    env = dict(agent_env, DOCKYARD_S3_ENDPOINT=s3_endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env[name] = os.environ[name]
    proc = subprocess.run([sys.executable, "-c", code, s3_store_url], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["False", "True b'v'"]


def test_a_malformed_s3_endpoint_is_refused_when_the_store_opens(monkeypatch):
    monkeypatch.setenv("DOCKYARD_S3_ENDPOINT", "minio:9000")
    with pytest.raises(StorageError, match=r"S3 endpoint 'minio:9000' is not a URL: use http\(s\)://host"):
        open_store("s3://bucket/p", secrets_dir="/nonexistent")
