"""functions.core.task: untrusted task data in, a valid Task or a BadInput naming the field out."""

from __future__ import annotations

import pytest

from agent import contract
from functions.core.task import MAX_PROMPT_BYTES, LimitsPolicy, parse_task
from functions.errors import BadInput


def parse(data, **kwargs):
    return parse_task(data, source="test/suite", event_id="e-1", **kwargs)


def test_minimal_task_gets_defaults_and_a_derived_id():
    task = parse({"prompt": "fix the bug"})
    assert task.task_id == contract.derive_task_id("test/suite", "e-1")
    assert contract.is_valid_task_id(task.task_id)
    policy = LimitsPolicy()
    assert (task.limits.deadline_seconds, task.limits.retries, task.limits.storage) == (
        policy.default_deadline_seconds,
        policy.default_retries,
        policy.default_storage,
    )


def test_same_event_same_id_and_spec_hash():
    a, b = parse({"prompt": "x"}), parse({"prompt": "x"})
    assert (a.task_id, a.spec_hash) == (b.task_id, b.spec_hash)
    assert parse({"prompt": "y"}).spec_hash != a.spec_hash


def test_full_task_round_trips():
    task = parse(
        {
            "task_id": "fix-42",
            "prompt": "fix it",
            "repo": {"url": "https://example.com/r.git", "ref": "main"},
            "model": "openai:gpt-4o",
            "limits": {"deadline_seconds": 600, "retries": 1, "storage": "512Mi"},
        }
    )
    assert task.to_dict() == {
        "task_id": "fix-42",
        "prompt": "fix it",
        "repo": {"url": "https://example.com/r.git", "ref": "main"},
        "model": "openai:gpt-4o",
        "limits": {"deadline_seconds": 600, "retries": 1, "storage": "512Mi"},
    }


@pytest.mark.parametrize(
    "data, field, status",
    [
        ("just a string", "data", 400),
        ([{"prompt": "x"}], "data", 400),
        ({}, "prompt", 400),
        ({"prompt": "   "}, "prompt", 400),
        ({"prompt": 7}, "prompt", 400),
        ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, "prompt", 413),
        ({"prompt": "x", "task_id": "Fix-42"}, "task_id", 400),
        ({"prompt": "x", "task_id": "../etc"}, "task_id", 400),
        ({"prompt": "x", "task_id": ".."}, "task_id", 400),
        ({"prompt": "x", "task_id": "a" * 41}, "task_id", 400),
        ({"prompt": "x", "task_id": "-a"}, "task_id", 400),
        ({"prompt": "x", "task_id": ""}, "task_id", 400),
        ({"prompt": "x", "task_id": 42}, "task_id", 400),
        ({"prompt": "x", "repo": 5}, "repo", 400),
        ({"prompt": "x", "repo": {"url": "http://plain.example/r.git"}}, "repo.url", 400),
        ({"prompt": "x", "repo": {"url": "https://e.com/r.git", "ref": "--upload-pack=evil"}}, "repo.ref", 400),
        ({"prompt": "x", "model": "gpt-4o"}, "model", 400),
        ({"prompt": "x", "limits": []}, "limits", 400),
        ({"prompt": "x", "limits": {"deadline_seconds": 0}}, "limits.deadline_seconds", 400),
        ({"prompt": "x", "limits": {"deadline_seconds": 10**9}}, "limits.deadline_seconds", 400),
        ({"prompt": "x", "limits": {"retries": True}}, "limits.retries", 400),
        ({"prompt": "x", "limits": {"storage": "5GB"}}, "limits.storage", 400),
        ({"prompt": "x", "limits": {"storage": "1000Gi"}}, "limits.storage", 400),
        ({"prompt": "x", "limits": {"max_tokens": 0}}, "limits.max_tokens", 400),
        ({"prompt": "x", "limits": {"max_tokens": "1000"}}, "limits.max_tokens", 400),
        ({"prompt": "x", "limits": {"max_tokens": 10**12}}, "limits.max_tokens", 400),
        ({"prompt": "x", "limits": {"max_cost_usd": 0}}, "limits.max_cost_usd", 400),
        ({"prompt": "x", "limits": {"max_cost_usd": "5"}}, "limits.max_cost_usd", 400),
        ({"prompt": "x", "limits": {"max_cost_usd": True}}, "limits.max_cost_usd", 400),
        ({"prompt": "x", "limits": {"max_cost_usd": float("nan")}}, "limits.max_cost_usd", 400),
        ({"prompt": "x", "limits": {"max_cost_usd": 1e9}}, "limits.max_cost_usd", 400),
    ],
)
def test_bad_input_names_the_field(data, field, status):
    with pytest.raises(BadInput) as caught:
        parse(data)
    assert caught.value.field == field
    assert caught.value.status == status
    assert caught.value.body() == {"error": caught.value.message, "field": field}


def test_forty_character_id_is_accepted():
    assert parse({"prompt": "x", "task_id": "a" * 40}).task_id == "a" * 40


def test_policy_bounds_limits():
    policy = LimitsPolicy(max_deadline_seconds=60, default_deadline_seconds=30)
    assert parse({"prompt": "x"}, policy=policy).limits.deadline_seconds == 30
    with pytest.raises(BadInput):
        parse({"prompt": "x", "limits": {"deadline_seconds": 61}}, policy=policy)


def test_token_and_cost_budgets_are_kept_and_only_then_change_the_spec():
    plain = parse({"prompt": "x", "task_id": "t1"})
    assert (plain.limits.max_tokens, plain.limits.max_cost_usd) == (None, None)
    assert "max_tokens" not in plain.to_dict()["limits"]  # a task without them hashes as before
    budgeted = parse({"prompt": "x", "task_id": "t1", "limits": {"max_tokens": 5000, "max_cost_usd": 2.5}})
    assert (budgeted.limits.max_tokens, budgeted.limits.max_cost_usd) == (5000, 2.5)
    assert budgeted.to_dict()["limits"]["max_tokens"] == 5000 and budgeted.spec_hash != plain.spec_hash
    assert parse({"prompt": "x"}, policy=LimitsPolicy(default_max_tokens=900)).limits.max_tokens == 900


CONTROL = ["\x00", "\n", "\r", "\x1b", "\x07", "\x7f", "\x85", "\x9b"]  # NUL, LF, CR, ESC, BEL, DEL, C1 NEL and CSI


@pytest.mark.parametrize("char", CONTROL)
@pytest.mark.parametrize(
    "data, field",
    [
        ({"task_id": "x{c}"}, "task_id"),
        ({"model": "openai:gpt-4o{c}"}, "model"),
        ({"model": "scripted:ex{c}ample"}, "model"),
        ({"repo": {"url": "https://example.com/r{c}.git"}}, "repo.url"),
        ({"repo": "https://example.com/r.git{c}"}, "repo.url"),
        ({"repo": {"url": "https://example.com/r.git", "ref": "main{c}"}}, "repo.ref"),
    ],
)
def test_control_characters_in_identifiers_are_refused(data, field, char):
    filled = {key: (value.replace("{c}", char) if isinstance(value, str)
                    else {k: v.replace("{c}", char) for k, v in value.items()}) for key, value in data.items()}
    with pytest.raises(BadInput) as caught:
        parse({"prompt": "x", **filled})
    assert (caught.value.field, caught.value.status) == (field, 400)


def test_a_task_id_with_a_trailing_newline_is_not_valid():
    """`$` matches before a final newline: the check is a fullmatch."""
    assert not contract.is_valid_task_id("x\n")
    assert contract.is_valid_task_id("x")


@pytest.mark.parametrize(
    "model",
    ["scripted:/tmp/turns.yaml", "scripted:../../t-a/ws/repo/turns.yaml", "scripted:sub/turns.yaml", "scripted:..",
     "scripted:.hidden", "scripted:~/turns.yaml", "scripted:turns.py", "scripted:" + "a" * 101],
)
def test_a_scripted_model_is_a_bare_name_never_a_path(model):
    with pytest.raises(BadInput) as caught:
        parse({"prompt": "x", "model": model})
    assert caught.value.field == "model"


@pytest.mark.parametrize("model", ["scripted:example", "scripted:gated", "scripted:turns.yaml", "scripted:t_1.json", "openai:gpt-4o"])
def test_bare_script_names_and_providers_are_accepted(model):
    assert parse({"prompt": "x", "model": model}).model == model


@pytest.mark.parametrize("model", ["nosuch:gpt-4o", "OpenAI:gpt-4o", "openai:", "gpt-4o:latest"])
def test_a_model_of_no_known_provider_is_refused_naming_the_field(model):
    """Launched, it could only fail (fatal, in the agent): it is a 400 at the door instead."""
    with pytest.raises(BadInput) as caught:
        parse({"prompt": "x", "model": model})
    assert (caught.value.field, caught.value.status) == ("model", 400)
    assert "openai-compatible" in caught.value.message


@pytest.mark.parametrize("url", ["file:///srv/evilrepo", "FILE:///srv/evilrepo", "file://localhost/srv/evilrepo"])
def test_file_repositories_only_when_allowed(url):
    with pytest.raises(BadInput) as caught:
        parse({"prompt": "x", "repo": {"url": url}})
    assert (caught.value.field, caught.value.status) == ("repo.url", 400)
    assert "--allow-file-repos" in caught.value.message
    assert parse({"prompt": "x", "repo": {"url": url}}, allow_file_repos=True).repo == {"url": url}


@pytest.mark.parametrize("url", ["/srv/evilrepo", "ext::sh -c id", "http://example.com/r.git"])
def test_local_paths_and_other_transports_are_refused_even_when_file_repos_are_allowed(url):
    with pytest.raises(BadInput) as caught:
        parse({"prompt": "x", "repo": {"url": url}}, allow_file_repos=True)
    assert caught.value.field == "repo.url"
