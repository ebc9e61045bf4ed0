"""Reading a file once while hashing it: what lets a snapshot be one backup plus one read.

`HashingReader` hands out a file's bytes front to back, hashing (sha256) and
counting them, and calls `on_end(sha256)` after the last byte; an uploader given
it reads each byte once. `sha256_file` reads a file once through it, copying it
on the way if asked.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

READ_CHUNK = 4 * 1024 * 1024  # bytes per read when we read a file ourselves


class Discarded(Exception):
    """Raised by an `on_end` callback to stop an upload at its end: nothing is stored."""


class HashingReader:
    """A file read once, front to back, hashing (sha256) and counting the bytes it hands out.

    Not seekable on purpose: an uploader given it (s3transfer) then reads each byte
    exactly once and buffers in memory whatever it sends again (payload signing,
    retries). After the last byte `on_end(sha256)` is called once, before the last
    chunk is handed out; it may raise (Discarded) to stop the upload there."""

    def __init__(self, f, on_end: Callable[[str], None] | None = None):
        self._f = f
        self._size = os.fstat(f.fileno()).st_size
        self._digest = hashlib.sha256()
        self._on_end = on_end
        self.ended = False
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else -1)
        self.bytes_read += len(data)
        self._digest.update(data)
        if not self.ended and (not data or self.bytes_read >= self._size):
            self.ended = True
            if self._on_end is not None:
                self._on_end(self.hexdigest())
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def sha256_file(source: str | os.PathLike, dest: Path | None = None) -> str:
    """Read `source` once (copying it to `dest` if given); its sha256."""
    with open(source, "rb", buffering=0) as f, open(dest or os.devnull, "wb") as out:
        reader = HashingReader(f)
        while data := reader.read(READ_CHUNK):
            if dest is not None:
                out.write(data)
        return reader.hexdigest()
