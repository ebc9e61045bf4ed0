"""`repo.push` in a task: what is accepted, what is refused (naming the field), and the spec hash of
tasks without it. The branch rules are `git check-ref-format --branch`'s, checked against git itself."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from functions.core.task import PUSH_BRANCH_MAX, parse_task
from functions.errors import BadInput

URL = "https://git.example.org/team/repo.git"


def parse(data, **kwargs):
    return parse_task({"prompt": "p", "task_id": "t1", **data}, source="test/suite", event_id="e-1", **kwargs)


def test_a_task_without_push_has_the_spec_and_hash_it_had():
    task = parse({"repo": {"url": URL, "ref": "main"}})
    expected = {"task_id": "t1", "prompt": "p", "limits": {"deadline_seconds": 3600, "retries": 3, "storage": "5Gi"},
                "repo": {"url": URL, "ref": "main"}}
    assert task.to_dict() == expected
    assert task.spec_hash == hashlib.sha256(json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    for off in (None, False):
        assert parse({"repo": {"url": URL, "push": off}}).repo == {"url": URL}


@pytest.mark.parametrize("push, expected", [({}, {}), (True, {}), ({"branch": "fix/typo-1"}, {"branch": "fix/typo-1"})])
def test_push_is_kept_in_the_spec(push, expected):
    task = parse({"repo": {"url": URL, "push": push}})
    assert task.repo == {"url": URL, "push": expected}
    assert task.spec_hash != parse({"repo": {"url": URL}}).spec_hash


BRANCHES = ["main", "fix/typo", "dockyard/t-1", "a.b", "UPPER_case-9", "x" * PUSH_BRANCH_MAX,
            "a..b", "-x", "HEAD", "a b", "a/.x", ".x", "x.lock", "a/b.lock/c", "a\x01b", "a\x7fb", "a~b", "a^b", "a:b",
            "a?b", "a*b", "a[b", "a\\b", "a@{b", "@", "a/", "/a", "a//b", "a.", "x" * (PUSH_BRANCH_MAX + 1), ""]


@pytest.mark.parametrize("branch", BRANCHES)
def test_a_branch_is_accepted_exactly_when_git_would_take_it(branch, tmp_path):
    # `--branch` adds "not starting with '-'" but also expands `@` and `@{-1}`: the plain check on refs/heads/ instead.
    by_git = subprocess.run(["git", "check-ref-format", f"refs/heads/{branch}"], cwd=tmp_path, capture_output=True).returncode == 0
    # HEAD and @ are names git takes but revision syntax reads as the current commit: refused too.
    by_git = by_git and not branch.startswith("-") and len(branch) <= PUSH_BRANCH_MAX and branch not in ("HEAD", "@")
    try:
        parse({"repo": {"url": URL, "push": {"branch": branch}}})
        accepted = True
    except BadInput as exc:
        assert exc.field == "repo.push.branch"
        accepted = False
    assert accepted == by_git, branch


@pytest.mark.parametrize("repo, field", [
    ({"url": URL, "push": {"branch": 3}}, "repo.push.branch"),
    ({"url": URL, "push": {"name": "x"}}, "repo.push"),
    ({"url": URL, "push": "main"}, "repo.push"),
    ({"url": "ssh://git@git.example.org/r.git", "push": {}}, "repo.push"),
    ({"url": "git@git.example.org:r.git", "push": {}}, "repo.push"),
])
def test_bad_push_names_its_field(repo, field):
    with pytest.raises(BadInput) as caught:
        parse({"repo": repo})
    assert caught.value.field == field


def test_a_file_repository_may_push_on_a_dev_machine():
    assert parse({"repo": {"url": "file:///srv/r.git", "push": {}}}, allow_file_repos=True).repo["push"] == {}
