"""What an object store hands back (agent/storage.py): its errors, the result of a hashed put, and a
reader that streams one object in chunks, never holding it whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class StorageError(Exception):
    """An object store operation failed (network, permissions, missing bucket...)."""


class ObjectNotFound(StorageError):
    """The key does not exist in the store."""


@dataclass(frozen=True)
class HashedPut:
    sha256: str
    size: int
    stored: bool  # False: keep(sha256) refused it and nothing was written to the store


CHUNK_BYTES = 1 << 20  # what one read of a streamed object asks for


class ObjectReader:
    """An object opened for reading: its `size`, `read(n)` (file-like: tarfile's stream mode reads it)
    and `chunks()`. Read errors raise `StorageError`; close it when done (a context manager)."""

    def __init__(self, where: str, size: int, read: Callable[[int], bytes], close: Callable[[], None], errors: tuple):
        self.where = where
        self.size = size
        self._read = read
        self._close = close
        self._errors = errors

    def read(self, n: int = -1) -> bytes:
        try:
            return self._read(n if n is not None and n >= 0 else self.size)
        except self._errors as exc:
            raise StorageError(f"read {self.where} failed: {exc}") from exc

    def chunks(self, chunk_bytes: int = CHUNK_BYTES):
        """The object's bytes, at most `chunk_bytes` at a time; closes the reader at the end."""
        try:
            while chunk := self.read(chunk_bytes):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._close()
        except self._errors:
            pass  # nothing left to read: a failed close loses nothing

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
