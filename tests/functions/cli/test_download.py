"""`dockyard download` and `dockyard diff --url` on a task finished by a real `dockyard dev`:
from its store directly, and through its stream routes with the dev token."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent import changes, contract
from tests.functions.cli.test_diff import dockyard, finished_task  # noqa: F401  (a fixture: the finished task)

pytestmark = pytest.mark.timeout(240)


def tree(root: Path) -> dict[str, str]:
    """Every file below `root` (relative path -> sha256), and every symlink (-> its target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "-> " + str(path.readlink())
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def source_flags(server, how: str) -> list[str]:
    return ["--data-dir", str(server.data_dir), *(["--url", server.url] if how == "url" else [])]


@pytest.mark.parametrize("how", ["local", "url"])
def test_download_unpacks_the_final_workspace(finished_task, tmp_path, how):  # noqa: F811
    dest = tmp_path / "ws"
    done = dockyard("download", "diff-me", "--to", str(dest), *source_flags(finished_task, how))
    assert done.returncode == 0, done.stderr
    assert f"into {dest}" in done.stdout and "skipped" not in done.stdout
    assert (dest / "repo" / "edit.txt").read_text() == "first\nsecond changed\n"
    assert (dest / "repo" / "added.txt").read_text() == "added\n"
    assert not (dest / "repo" / "gone.txt").exists()
    assert not (dest / "checkpoints").exists()  # the snapshotter keeps checkpoints out of the archive


def test_local_and_url_give_the_same_tree(finished_task, tmp_path):  # noqa: F811
    for how in ("local", "url"):
        done = dockyard("download", "diff-me", "--to", str(tmp_path / how), *source_flags(finished_task, how))
        assert done.returncode == 0, done.stderr
    assert tree(tmp_path / "local") == tree(tmp_path / "url") != {}


def test_download_refuses_a_non_empty_directory_unless_forced(finished_task, tmp_path):  # noqa: F811
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me\n")
    refused = dockyard("download", "diff-me", "--to", str(dest), *source_flags(finished_task, "local"))
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--force" in refused.stderr
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    forced = dockyard("download", "diff-me", "--to", str(dest), "--force", *source_flags(finished_task, "local"))
    assert forced.returncode == 0, forced.stderr
    assert (dest / "mine.txt").read_text() == "keep me\n" and (dest / "repo" / "edit.txt").exists()


def test_the_default_directory_is_the_task_id(finished_task, tmp_path):  # noqa: F811
    import subprocess
    import sys

    from tests.conftest import agent_environment

    done = subprocess.run(
        [sys.executable, "-m", "functions.cli", "download", "diff-me", "--data-dir", str(finished_task.data_dir)],
        cwd=tmp_path, env=agent_environment(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "diff-me" / "repo" / "edit.txt").exists()


@pytest.mark.parametrize("how", ["local", "url"])
def test_download_patch_writes_or_prints_the_stored_patch(finished_task, tmp_path, how):  # noqa: F811
    stored = (finished_task.data_dir / "store" / changes.patch_key("diff-me")).read_bytes()
    done = dockyard("download", "diff-me", "--patch", "--to", str(tmp_path), *source_flags(finished_task, how))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "changes.patch").read_bytes() == stored
    again = dockyard("download", "diff-me", "--patch", "--to", str(tmp_path), *source_flags(finished_task, how))
    assert again.returncode == 2 and "--force" in again.stderr
    printed = dockyard("download", "diff-me", "--patch", "--to", "-", *source_flags(finished_task, how))
    assert printed.returncode == 0 and printed.stdout.encode() == stored


def test_diff_through_the_url_matches_the_local_one(finished_task):  # noqa: F811
    for args in ((), ("--stat",), ("--color", "always")):
        local = dockyard("diff", "diff-me", *args, *source_flags(finished_task, "local"))
        remote = dockyard("diff", "diff-me", *args, *source_flags(finished_task, "url"))
        assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
        assert remote.stdout == local.stdout and "edit.txt" in remote.stdout


def test_url_errors_say_what_is_wrong(finished_task, tmp_path):  # noqa: F811
    url = ["--url", finished_task.url]
    unknown = dockyard("download", "never-ran", "--to", str(tmp_path / "a"), "--data-dir", str(finished_task.data_dir), *url)
    assert unknown.returncode == 1 and "no task 'never-ran'" in unknown.stderr
    no_token = dockyard("diff", "diff-me", "--data-dir", str(tmp_path / "empty"), *url)  # no dev token there
    assert no_token.returncode == 2 and "token" in no_token.stderr.lower()
    bad_id = dockyard("download", "../etc", "--data-dir", str(finished_task.data_dir), *url)
    assert bad_id.returncode == 2 and "task id" in bad_id.stderr
    assert not (tmp_path / "a").exists()


def test_a_long_tool_output_is_kept_whole_and_served_by_its_call_id(finished_task, tmp_path):  # noqa: F811
    """The agent kept `seq 1 100000` (588,895 bytes; the model and the trace saw head and tail) in
    .dockyard/outputs/; the final archive carries it, and the stream serves it by its call id."""
    import httpx

    whole = "".join(f"{n}\n" for n in range(1, 100001)).encode()
    dest = tmp_path / "ws"
    assert dockyard("download", "diff-me", "--to", str(dest), *source_flags(finished_task, "url")).returncode == 0
    kept = {p.name: p.read_bytes() for p in (dest / contract.OUTPUTS_DIR).iterdir()}
    (name,) = [n for n, body in kept.items() if body == whole]
    served = httpx.get(f"{finished_task.url}/api/tasks/diff-me/outputs/{name.removesuffix('.log')}", headers=finished_task.headers, timeout=30)
    assert served.status_code == 200 and served.content == whole
