"""Redaction in the stream: secret formats always, plus the known values of a file or directory that may change.

Invariant: nothing leaves the stream unredacted. Every message is redacted
once, where it is read from NATS, with `Redaction.current()`; so is every task
record served. A new file content yields a new `Redactor` object, which the
feeds notice by identity (they drop frames redacted with the old one).
"""

from __future__ import annotations

import json
import logging
import os
import time

from agent.redact import Redactor

log = logging.getLogger(__name__)

SECRETS_CHECK_SECONDS = 1.0  # the known-secrets file is looked at (stat) at most this often


class Redaction:
    """The stream's `Redactor`: secret formats always, plus the known values in `path`.

    `path` is a file of values, one per line, or a directory (a Kubernetes
    Secret volume) whose every file is one value, multi-line values included.
    It is looked at no more than every SECRETS_CHECK_SECONDS and read again when
    the modification time, size or inode of the file (of any file, in a
    directory) changed; `current()` then returns a new Redactor. A missing or
    unreadable path means formats only.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path else None
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._redactor = Redactor()

    def current(self) -> Redactor:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= SECRETS_CHECK_SECONDS:
                self._checked = now
                self._reload_if_changed()
        return self._redactor

    def _reload_if_changed(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if os.path.isdir(self.path):
            self._redactor = Redactor.from_secrets_dir(self.path)
        else:
            self._redactor = Redactor.from_secrets_dir(None, extra_file=self.path)
        if stamp is None:
            log.warning("known secrets file %s is missing: redacting secret formats only", self.path)
        else:
            log.info("known secrets file %s: %d values", self.path, self._redactor.known_count)


def _stamp(path: str) -> tuple | None:
    """What changes when the known secrets change: (mtime, size, inode) of the file, or of every file under the directory."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isdir(path):
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    stamps: list[tuple] = [(path, st.st_mtime_ns, st.st_ino)]
    for dirpath, _dirnames, filenames in os.walk(path, onerror=lambda e: None):
        for name in sorted(filenames):
            try:
                fst = os.stat(os.path.join(dirpath, name))  # follows the ..data links of a Secret volume
            except OSError:
                continue
            stamps.append((dirpath, name, fst.st_mtime_ns, fst.st_size, fst.st_ino))
    return tuple(sorted(stamps, key=repr))


def redact_data(data: bytes, redactor: Redactor) -> tuple[bytes, object]:
    """(the published bytes with secrets removed, the parsed JSON body or None).

    JSON is redacted value by value (a secret written with JSON escapes is
    still found, and a cut private-key block cannot swallow the closing
    quote) and written again only when something was removed; anything else
    is redacted as text.
    """
    try:
        body = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        text = data.decode("utf-8", "surrogateescape")
        clean = redactor.redact(text)
        return (data if clean == text else clean.encode("utf-8", "surrogateescape")), None
    clean = redactor.redact_obj(body)
    if clean != body:
        return json.dumps(clean).encode(), clean
    return data, body
