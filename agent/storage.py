"""Object storage behind one small interface: `s3://bucket/prefix` or `file:///dir`.

Keys are relative, `/`-separated paths (`jobs/<id>/checkpoints/<ts>.db`); a store
maps them below its root. Writes are all-or-nothing as seen by readers: the
file backend writes a temp file and renames it, S3 makes an object visible only
when its upload completes, and `get_file` downloads to a temp file next to the
target before renaming it into place. Failures raise `StorageError` (a missing
key raises its subclass `ObjectNotFound`). `open_read` streams an object in
chunks (a file, or boto3's StreamingBody): a reader never holds a whole object;
it raises `ObjectNotFound` when opened, before a caller has promised anything.

Settings for S3 come from the pod's layout: endpoint from `DOCKYARD_S3_ENDPOINT`
or `<secrets_dir>/s3/endpoint`; credentials from `<secrets_dir>/s3/access_key_id`
and `<secrets_dir>/s3/secret_access_key` when present, else boto3's default
chain. boto3 is imported, and the S3 client made, at an S3 store's first request.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Callable, TypeVar
from urllib.parse import unquote, urlparse

from agent import contract, digest
from agent.objects import HashedPut, ObjectNotFound, ObjectReader, StorageError

ENV_S3_ENDPOINT = f"{contract.ENV_PREFIX}S3_ENDPOINT"
ENV_SECRETS_DIR = f"{contract.ENV_PREFIX}SECRETS_DIR"
ACCEPTED_FORMS = "accepted forms: s3://bucket[/prefix] or file:///absolute/dir"

# Marker in temp file names, so listings never show a half-written object.
_TMP_MARK = ".dockyard-tmp-"

T = TypeVar("T")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}: use a relative path like 'jobs/<id>/final/result.json'")
    if _TMP_MARK in key:
        raise ValueError(f"invalid storage key {key!r}: {_TMP_MARK!r} is reserved for temp files")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix == "":
        return prefix
    if prefix.startswith("/") or any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"invalid storage prefix {prefix!r}: use a relative path like 'jobs/<id>/'")
    return prefix


def _keep_all(_sha256: str) -> bool:
    return True


class Store:
    """The interface every backend implements. Keys are relative `/`-separated paths."""

    def put_file(self, key: str, path: str | os.PathLike, *, move: bool = False) -> None:
        """Upload a file. With `move`, the store may take the file itself (a rename on the
        same filesystem) and the path is gone afterwards."""
        raise NotImplementedError

    def put_file_hashed(self, key: str, path: str | os.PathLike, *, keep: Callable[[str], bool] = _keep_all) -> HashedPut:
        """Upload a file reading it once, its sha256 computed from the same read. `keep(sha256)`
        is asked after the last byte was read, before the object is visible; False: nothing is
        stored. The store may take the file itself (a rename): `path` may be gone afterwards."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to `path` atomically: a temp file next to it, then a rename."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def open_read(self, key: str) -> ObjectReader:
        """Open an object to stream it; `ObjectNotFound` here when it is missing."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        """The object's size in bytes, without reading it."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix`, sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove a key; removing a missing key is not an error."""
        raise NotImplementedError

    def describe(self) -> str:
        """The store's URL, without secrets."""
        raise NotImplementedError

    def url_for(self, key: str) -> str:
        """Where `key` lives, as a URL without secrets (for people and logs)."""
        return f"{self.describe().rstrip('/')}/{_check_key(key)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


def _temp_path_next_to(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
    os.close(fd)
    return Path(name)


def _replace_via_temp(target: Path, write: Callable[[Path], None]) -> None:
    """Write `target` through a temp file in the same directory, then rename it in."""
    tmp = _temp_path_next_to(target)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FileStore(Store):
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _guard(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{what} {self.url_for(key)}: no such object") from exc
        except OSError as exc:
            raise StorageError(f"{what} {self.url_for(key)} failed: {exc}") from exc

    def put_file(self, key, path, *, move=False):
        target = self._path(key)
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"put {self.url_for(key)}: source {source} is not a file")
        if move:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                return
            except OSError:
                pass  # another filesystem (EXDEV) or similar: copy instead
        self._guard("put", key, lambda: _replace_via_temp(target, lambda tmp: shutil.copyfile(source, tmp)))
        if move:
            source.unlink(missing_ok=True)

    def put_file_hashed(self, key, path, *, keep=_keep_all):
        target = self._path(key)
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"put {self.url_for(key)}: source {source} is not a file")
        size = source.stat().st_size

        def stage() -> tuple[Path, str, bool]:
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.stat(target.parent).st_dev == source.stat().st_dev:
                return source, digest.sha256_file(source), False  # the one read is the hash; then a rename
            tmp = _temp_path_next_to(target)
            try:
                return tmp, digest.sha256_file(source, tmp), True
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        staged, sha, own = self._guard("put", key, stage)
        if not keep(sha):
            if own:
                staged.unlink(missing_ok=True)
            return HashedPut(sha, size, stored=False)
        try:
            self._guard("put", key, lambda: os.replace(staged, target))
        except BaseException:
            if own:
                staged.unlink(missing_ok=True)
            raise
        return HashedPut(sha, size, stored=True)

    def put_bytes(self, key, data):
        target = self._path(key)
        self._guard("put", key, lambda: _replace_via_temp(target, lambda tmp: tmp.write_bytes(bytes(data))))

    def get_file(self, key, path):
        source = self._path(key)
        target = Path(path)
        if not source.is_file():
            raise ObjectNotFound(f"get {self.url_for(key)}: no such object")
        try:
            _replace_via_temp(target, lambda tmp: shutil.copyfile(source, tmp))
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"get {self.url_for(key)}: no such object") from exc
        except OSError as exc:
            raise StorageError(f"get {self.url_for(key)} into {target} failed: {exc}") from exc

    def get_bytes(self, key):
        source = self._path(key)
        if source.is_dir():
            raise ObjectNotFound(f"get {self.url_for(key)}: no such object")
        return self._guard("get", key, source.read_bytes)

    def open_read(self, key):
        source = self._path(key)
        if source.is_dir():
            raise ObjectNotFound(f"get {self.url_for(key)}: no such object")
        f = self._guard("get", key, lambda: open(source, "rb"))
        return ObjectReader(self.url_for(key), os.fstat(f.fileno()).st_size, f.read, f.close, (OSError,))

    def size(self, key):
        source = self._path(key)
        if source.is_dir():
            raise ObjectNotFound(f"head {self.url_for(key)}: no such object")
        return self._guard("head", key, lambda: source.stat().st_size)

    def exists(self, key):
        return self._path(key).is_file()

    def list(self, prefix=""):
        prefix = _check_prefix(prefix)
        # Walk only the deepest directory the prefix pins down.
        base_parts = prefix.split("/")[:-1]
        base = self.root.joinpath(*base_parts)
        if not base.is_dir():
            return []
        keys = []
        try:
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if _TMP_MARK not in d]
                for name in filenames:
                    if _TMP_MARK in name:
                        continue
                    rel = Path(dirpath, name).relative_to(self.root).as_posix()
                    if rel.startswith(prefix):
                        keys.append(rel)
        except OSError as exc:
            raise StorageError(f"list {self.describe()}/{prefix} failed: {exc}") from exc
        return sorted(keys)

    def delete(self, key):
        target = self._path(key)
        try:
            target.unlink(missing_ok=True)
        except IsADirectoryError:
            pass
        except OSError as exc:
            raise StorageError(f"delete {self.url_for(key)} failed: {exc}") from exc

    def describe(self):
        return self.root.as_uri()


def _read_secret(secrets_dir: Path, name: str) -> str | None:
    path = secrets_dir / "s3" / name
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read S3 setting {path}: {exc}") from exc
    return value or None


class S3Store(Store):
    """An S3 (or S3-compatible: MinIO, moto) bucket, optionally below a key prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, secrets_dir: str | os.PathLike | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        secrets = Path(secrets_dir or os.environ.get(ENV_SECRETS_DIR) or contract.SECRETS_DIR)
        self.endpoint = os.environ.get(ENV_S3_ENDPOINT) or _read_secret(secrets, "endpoint")
        access_key = _read_secret(secrets, "access_key_id")
        secret_key = _read_secret(secrets, "secret_access_key")
        if bool(access_key) != bool(secret_key):
            raise StorageError(
                f"incomplete S3 credentials in {secrets / 's3'}: provide both access_key_id and secret_access_key"
            )
        region = (
            _read_secret(secrets, "region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )

        if self.endpoint:
            parsed = urlparse(self.endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError(f"S3 endpoint {self.endpoint!r} is not a URL: use http(s)://host[:port]")
        self._settings = {"region": region, "access_key": access_key, "secret_key": secret_key, "secrets": secrets}
        self._made_client = None
        self._client_lock = threading.Lock()

    @property
    def _client(self):
        """The boto3 client, made on first use: boto3 and a client cost ~40 MB of RSS an idle process saves."""
        with self._client_lock:
            if self._made_client is None:
                self._made_client = self._make_client(**self._settings)
            return self._made_client

    def _make_client(self, region: str, access_key: str | None, secret_key: str | None, secrets: Path):
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # S3-compatible servers (MinIO) want path-style addressing and no optional checksums.
            s3={"addressing_style": "path"} if self.endpoint else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        kwargs = {"endpoint_url": self.endpoint, "region_name": region, "config": config}
        if access_key:
            token = _read_secret(secrets, "session_token")
            kwargs.update(aws_access_key_id=access_key, aws_secret_access_key=secret_key, aws_session_token=token)
        try:
            return boto3.session.Session().client("s3", **kwargs)
        except Exception as exc:  # botocore raises many types for bad settings
            raise StorageError(f"cannot create an S3 client for {self.describe()}: {exc}") from exc

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _guard(self, what: str, where: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(f"{what} {where}: no such object") from exc
            raise StorageError(f"{what} {where} failed: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"{what} {where} failed: {exc}") from exc

    def put_file(self, key, path, *, move=False):
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"put {self.url_for(key)}: source {source} is not a file")
        full = self._key(key)
        self._guard("put", self.url_for(key), lambda: self._client.upload_file(str(source), self.bucket, full))
        if move:
            source.unlink(missing_ok=True)

    def put_file_hashed(self, key, path, *, keep=_keep_all):
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"put {self.url_for(key)}: source {source} is not a file")
        full = self._key(key)

        def on_end(sha: str) -> None:
            if not keep(sha):
                raise digest.Discarded(sha)  # s3transfer stops: no put, or the multipart upload is aborted

        def upload() -> HashedPut:
            with open(source, "rb", buffering=0) as f:
                reader = digest.HashingReader(f, on_end)
                try:
                    self._client.upload_fileobj(reader, self.bucket, full)
                except digest.Discarded:
                    return HashedPut(reader.hexdigest(), reader.bytes_read, stored=False)
                if not reader.ended:  # s3transfer stopped reading early: never store a partial object
                    raise StorageError(f"put {self.url_for(key)}: upload ended after {reader.bytes_read} bytes")
                return HashedPut(reader.hexdigest(), reader.bytes_read, stored=True)

        return self._guard("put", self.url_for(key), upload)

    def put_bytes(self, key, data):
        full = self._key(key)
        body = bytes(data)
        self._guard("put", self.url_for(key), lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=body))

    def get_file(self, key, path):
        target = Path(path)
        full = self._key(key)

        def download(tmp: Path) -> None:
            self._client.download_file(self.bucket, full, str(tmp))

        self._guard("get", self.url_for(key), lambda: _replace_via_temp(target, download))

    def get_bytes(self, key):
        full = self._key(key)
        return self._guard(
            "get", self.url_for(key), lambda: self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        )

    def open_read(self, key):
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        answer = self._guard("get", self.url_for(key), lambda: self._client.get_object(Bucket=self.bucket, Key=full))
        body = answer["Body"]  # a StreamingBody: read(n) pulls n bytes off the open connection
        return ObjectReader(
            self.url_for(key), int(answer.get("ContentLength") or 0), body.read, body.close, (BotoCoreError, ClientError, OSError)
        )

    def size(self, key):
        full = self._key(key)
        head = self._guard("head", self.url_for(key), lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        return int(head.get("ContentLength") or 0)

    def exists(self, key):
        full = self._key(key)
        try:
            self._guard("head", self.url_for(key), lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix=""):
        prefix = _check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0

        def collect() -> list[str]:
            keys = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return keys

        return sorted(self._guard("list", f"{self.describe()}/{prefix}", collect))

    def delete(self, key):
        full = self._key(key)
        self._guard("delete", self.url_for(key), lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def describe(self):
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def open_store(url: str, *, secrets_dir: str | os.PathLike | None = None) -> Store:
    """Open the store a URL names: `s3://bucket[/prefix]` or `file:///absolute/dir`."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"store URL is empty; {ACCEPTED_FORMS}")
    parsed = urlparse(url.strip())
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if not bucket or "@" in bucket or ":" in bucket:
            raise ValueError(f"store URL {url!r} has no valid bucket name; {ACCEPTED_FORMS}")
        if parsed.query or parsed.fragment:
            raise ValueError(f"store URL {url!r} must not have a query or fragment; {ACCEPTED_FORMS}")
        prefix = parsed.path.strip("/")
        if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
            raise ValueError(f"store URL {url!r} has an invalid prefix; {ACCEPTED_FORMS}")
        return S3Store(bucket, prefix, secrets_dir=secrets_dir)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"store URL {url!r} names host {parsed.netloc!r}; a file store needs an absolute path "
                f"(three slashes: file:///dir); {ACCEPTED_FORMS}"
            )
        path = unquote(parsed.path)
        if not path.startswith("/") or parsed.query or parsed.fragment:
            raise ValueError(f"store URL {url!r} must name an absolute directory; {ACCEPTED_FORMS}")
        root = PurePosixPath(path)
        if ".." in root.parts:
            raise ValueError(f"store URL {url!r} must not contain '..'; {ACCEPTED_FORMS}")
        return FileStore(str(root))
    raise ValueError(f"unsupported store URL {url!r}; {ACCEPTED_FORMS}")
