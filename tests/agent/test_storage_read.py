"""Streaming reads of the object store (`Store.open_read`, `Store.size`), on a file store and on moto's S3 server over HTTP."""

from __future__ import annotations

import os

import pytest

from agent.storage import ObjectNotFound


def test_an_object_streams_in_chunks_byte_exact(store):
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.put_bytes("jobs/t/final/workspace.tar.gz", data)
    with store.open_read("jobs/t/final/workspace.tar.gz") as reader:
        assert reader.size == len(data) == store.size("jobs/t/final/workspace.tar.gz")
        chunks = list(reader.chunks(1024 * 1024))
    assert [len(c) for c in chunks] == [1024 * 1024] * 3 + [17]
    assert b"".join(chunks) == data


def test_read_is_file_like_for_tarfile(store):
    store.put_bytes("jobs/t/x", b"0123456789")
    reader = store.open_read("jobs/t/x")
    assert (reader.read(3), reader.read(4), reader.read(), reader.read(5)) == (b"012", b"3456", b"789", b"")
    reader.close()


def test_a_missing_object_is_refused_when_opened(store):
    store.put_bytes("jobs/t/checkpoints/a.db", b"db")
    for key in ("jobs/t/final/none.tar.gz", "jobs/t/checkpoints"):  # nothing there; a "directory"
        with pytest.raises(ObjectNotFound):
            store.open_read(key)
        with pytest.raises(ObjectNotFound):
            store.size(key)


def test_keys_are_checked_before_anything_is_opened(store):
    for key in ("../outside", "/abs", "jobs/../x", ""):
        with pytest.raises(ValueError):
            store.open_read(key)
