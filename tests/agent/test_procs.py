"""agent.procs with real processes: parent-death signals, process groups, zombies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.procs import (
    die_with_parent,
    group_alive,
    live_group_members,
    pid_alive,
    signal_group,
)
from tests.conftest import eventually

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux"),
]

# A parent that starts a child (with or without a parent-death signal), prints the
# child's pid and waits to be killed. The child notes the signal it gets, then exits.
PARENT = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from agent.procs import die_with_parent

    note, mode = sys.argv[1], sys.argv[2]
    code = (
        "import signal, sys, time\\n"
        f"def got(sig, _):\\n    open({note!r}, 'w').write(str(sig))\\n    sys.exit(0)\\n"
        "signal.signal(signal.SIGTERM, got)\\n"
        "print('ready', flush=True)\\n"
        "time.sleep(60)\\n"
    )
    preexec = None if mode == "none" else die_with_parent(getattr(signal, mode))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    assert child.stdout.readline().strip() == "ready"  # its handler is in place
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


def start_parent(tmp_path: Path, mode: str, agent_env: dict) -> tuple[subprocess.Popen, int, Path]:
    note = tmp_path / f"signal-{mode}"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(note), mode], stdout=subprocess.PIPE, text=True, env=agent_env
    )
    child = int(parent.stdout.readline())
    return parent, child, note


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_child_gets_its_signal_when_its_parent_dies(tmp_path, agent_env, sig):
    parent, child, note = start_parent(tmp_path, sig, agent_env)
    try:
        assert pid_alive(child)
        parent.kill()
        parent.wait()
        eventually(lambda: not pid_alive(child), f"the child to die of {sig} with its parent")
    finally:
        parent.kill()
        parent.wait()
        signal_group(child, 0)
    if sig == "SIGTERM":  # it could handle it: the kernel sent exactly the signal asked for
        assert note.read_text() == str(int(signal.SIGTERM))
    else:
        assert not note.exists()


def test_without_it_the_child_outlives_its_parent(tmp_path, agent_env):
    """The control: what the test above would see if die_with_parent did nothing."""
    parent, child, _ = start_parent(tmp_path, "none", agent_env)
    try:
        parent.kill()
        parent.wait()
        eventually(lambda: Path(f"/proc/{child}/stat").exists() and _ppid(child) != parent.pid, "the child to be reparented")
        assert pid_alive(child)
    finally:
        parent.kill()
        parent.wait()
        os.kill(child, signal.SIGKILL)
    eventually(lambda: not pid_alive(child), "the orphan to be killed")


def test_a_group_with_a_nohup_grandchild_is_alive_until_the_group_is_signalled(tmp_path):
    leader = subprocess.Popen(
        ["bash", "-c", "nohup sleep 60 >/dev/null 2>&1 & echo $!; exec sleep 60"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )
    try:
        grandchild = int(leader.stdout.readline())
        pgid = leader.pid
        assert os.getpgid(grandchild) == pgid != os.getpgrp()
        assert sorted(live_group_members(pgid)) == sorted([pgid, grandchild])
        os.kill(pgid, signal.SIGKILL)  # the leader alone: its nohup'ed child keeps the group alive
        leader.wait()
        assert group_alive(pgid) and live_group_members(pgid) == [grandchild]
        assert signal_group(pgid, signal.SIGTERM) is True
        eventually(lambda: not group_alive(pgid), "the group to be gone")
        assert not pid_alive(grandchild)
    finally:
        signal_group(leader.pid, signal.SIGKILL)
        leader.kill()
        leader.wait()


def test_a_process_that_left_the_group_is_not_reached(tmp_path):
    """The limit of process groups: setsid starts a new one, which signal_group does not reach."""
    leader = subprocess.Popen(
        ["bash", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo $!; exec sleep 60"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    escaped = int(leader.stdout.readline())
    try:
        eventually(lambda: os.getpgid(escaped) == escaped, "setsid to make its own group")
        assert escaped not in live_group_members(leader.pid)
        signal_group(leader.pid, signal.SIGKILL)
        leader.wait()
        assert not group_alive(leader.pid)
        assert pid_alive(escaped)
    finally:
        signal_group(escaped, signal.SIGKILL)
        leader.kill()
        leader.wait()
    eventually(lambda: not pid_alive(escaped), "the escaped process to be killed")


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen(["true"], start_new_session=True)
    try:
        eventually(lambda: not pid_alive(child.pid), "the child to exit")
        os.kill(child.pid, 0)  # it still exists, as a zombie: nobody reaped it yet
        assert not group_alive(child.pid) and live_group_members(child.pid) == []
    finally:
        child.wait()
    assert not pid_alive(child.pid)


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
