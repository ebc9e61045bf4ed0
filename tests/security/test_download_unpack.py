"""`dockyard download` unpacks an archive made from a workspace an untrusted agent controlled: attacks on it.

The hostile archive is first unpacked the trusting way (tarfile's `fully_trusted`
filter) to show each attack works on this machine (these tests run as root, so a
device node and a setuid bit would really be made); then `dockyard download`
unpacks the same archive, through the store and through the stream app, and
nothing lands outside --to, no device, no setuid bit, and the refused members are
named.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent import contract
from agent.storage import open_store
from functions.cli import download
from functions.core.registry import new_record
from tests.conftest import REPO_ROOT, agent_environment
from tests.functions.stream.support import READ_TOKEN

pytestmark = pytest.mark.timeout(120)


def hostile_archive(root: Path) -> bytes:
    """Escapes aimed at `root/outside` (absolute names and link targets point there), and one harmless file."""
    outside = root / "outside"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes = b"", **attrs) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if info.size else None)

        add("ok.txt", b"harmless\n")
        add("../dotdot.txt", b"escaped by ..\n")
        add("sub", type=tarfile.DIRTYPE, mode=0o755)
        add("sub/../../dotdot-deep.txt", b"escaped by a deeper ..\n")
        add(str(outside / "absolute.txt"), b"escaped by an absolute name\n")
        add("link-out", type=tarfile.SYMTYPE, linkname=str(outside))
        add("link-out/through-abs-link.txt", b"escaped through a symlink\n")
        add("link-up", type=tarfile.SYMTYPE, linkname="../../outside")  # from box/ws: the root's outside
        add("link-up/through-rel-link.txt", b"escaped through a relative symlink\n")
        add("hard-passwd", type=tarfile.LNKTYPE, linkname=str(outside / "victim.txt"))
        add("null-device", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("a-fifo", type=tarfile.FIFOTYPE)
        add("setuid.sh", b"#!/bin/sh\nid\n", mode=0o4755)
        add("world-writable.txt", b"anyone\n", mode=0o777)
    return raw.getvalue()


def files_below(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def prepare(root: Path) -> Path:
    (root / "outside").mkdir(parents=True)
    (root / "outside" / "victim.txt").write_text("a file outside --to\n")
    return root / "box" / "ws"  # --to, two levels down so `..` has somewhere to go


def assert_contained(root: Path, dest: Path) -> None:
    assert files_below(root / "outside") == {"victim.txt"}, "something was written outside --to"
    assert files_below(root / "box") == {"ws", *(f"ws/{p}" for p in files_below(dest))}
    assert (root / "outside" / "victim.txt").read_text() == "a file outside --to\n"
    for path in dest.rglob("*"):
        mode = path.lstat().st_mode
        assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)), f"{path}: a device or fifo"
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), f"{path}: setuid/setgid/sticky"
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), f"{path}: writable by others"
        if path.is_symlink():
            assert path.resolve().is_relative_to(dest.resolve()), f"{path} points out of --to"
    assert (dest / "ok.txt").read_text() == "harmless\n"
    assert (dest / "setuid.sh").read_bytes() == b"#!/bin/sh\nid\n"  # kept, without its setuid bit


def test_the_attacks_work_when_trusted(tmp_path):
    dest = prepare(tmp_path)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(hostile_archive(tmp_path)), mode="r:gz") as tar:
        tar.extractall(dest, filter="fully_trusted")
    outside = files_below(tmp_path / "outside")
    assert {"absolute.txt", "through-abs-link.txt", "through-rel-link.txt"} <= outside
    assert (tmp_path / "box" / "dotdot.txt").exists() and (tmp_path / "box" / "dotdot-deep.txt").exists()
    assert stat.S_ISCHR((dest / "null-device").lstat().st_mode)
    assert (dest / "setuid.sh").stat().st_mode & stat.S_ISUID
    assert os.path.samefile(dest / "hard-passwd", tmp_path / "outside" / "victim.txt")


def test_unpack_writes_nothing_outside_and_names_what_it_refused(tmp_path):
    dest = prepare(tmp_path)
    dest.mkdir(parents=True)
    written, skipped = download.unpack(iter([hostile_archive(tmp_path)]), dest)
    assert_contained(tmp_path, dest)
    refused = {line.split(":", 1)[0] for line in skipped}
    assert {"link-out", "link-up", "hard-passwd", "null-device", "a-fifo", "../dotdot.txt", "sub/../../dotdot-deep.txt"} <= refused
    assert written >= 4  # ok.txt, setuid.sh, world-writable.txt, and the absolute name made relative inside --to


def dockyard(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "functions.cli", *args], cwd=cwd, env=agent_environment(), capture_output=True, text=True, timeout=60
    )


def test_dockyard_download_from_the_store_keeps_the_archive_inside(tmp_path):
    dest = prepare(tmp_path)
    store_url = (tmp_path / "store").as_uri()
    open_store(store_url).put_bytes(contract.final_archive_key("t-hostile"), hostile_archive(tmp_path))
    done = dockyard("download", "t-hostile", "--to", str(dest), "--store", store_url)
    assert done.returncode == 0, done.stderr
    assert_contained(tmp_path, dest)
    assert "skipped link-out:" in done.stderr and "skipped null-device:" in done.stderr
    assert "skipped 7 unsafe members (named above)" in done.stdout


async def test_dockyard_download_through_the_stream_app_keeps_the_archive_inside(tmp_path, bus, serve):
    import asyncio

    dest = prepare(tmp_path)
    store_url = (tmp_path / "store").as_uri()
    open_store(store_url).put_bytes(contract.final_archive_key("t-hostile"), hostile_archive(tmp_path))
    await bus.registry.create("t-hostile", new_record("t-hostile", task=None, spec_hash=None, now=contract.iso_utc()))
    server = await serve(store=store_url)
    done = await asyncio.to_thread(dockyard, "download", "t-hostile", "--to", str(dest), "--url", server.url, "--token", READ_TOKEN)
    assert done.returncode == 0, done.stderr
    assert_contained(tmp_path, dest)
    assert "skipped link-up:" in done.stderr
