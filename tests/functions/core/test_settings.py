"""functions.core.settings: one model of every DOCKYARD_* variable, its errors, and the README table made from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from functions.core.settings import TABLE_BEGIN, TABLE_END, Resources, Settings, markdown_table
from functions.errors import SettingsError
from tests.conftest import REPO_ROOT


# --- reading ---------------------------------------------------------------------
def test_from_env_reads_every_kind_of_variable(tmp_path):
    settings = Settings.from_env(
        {
            "DOCKYARD_NATS_URL": "nats://bus:4222",
            "DOCKYARD_DATA_DIR": str(tmp_path),
            "DOCKYARD_RUNTIME": "kubernetes",
            "DOCKYARD_MAX_DEADLINE_SECONDS": "7200",
            "DOCKYARD_SNAPSHOT_STALE_SECONDS": "60",
            "DOCKYARD_TTL_FAILED_SECONDS": "10",
            "DOCKYARD_STREAM_SEND_TIMEOUT_SECONDS": "12.5",
            "DOCKYARD_CORS_ORIGINS": " https://a.example, https://b.example:8443 ,",
            "DOCKYARD_AGENT_IMAGE": "registry.local/agent:1",
            "DOCKYARD_IMAGE_PULL_POLICY": "Always",
            "DOCKYARD_AGENTS_NAMESPACE": "agents-2",  # a variable not named after its field
            "DOCKYARD_NO_PROXY": "a.example, b.example",
            "DOCKYARD_JOB_TTL_SECONDS": "60",
            "DOCKYARD_KUEUE_QUEUE": "q",
            "DOCKYARD_AGENT_MEMORY_LIMIT": "16Gi",
            "DOCKYARD_SIDECAR_CPU_REQUEST": "5m",
            "DOCKYARD_UNRELATED": "ignored",
        }
    )
    assert settings.nats_url == "nats://bus:4222" and settings.runtime == "kubernetes"
    assert settings.data_dir == tmp_path and settings.store == (tmp_path / "store").as_uri()
    assert settings.limits.max_deadline_seconds == 7200 and settings.limits.default_deadline_seconds == 3600
    assert settings.snapshot_stale_seconds == 60 and settings.stream_send_timeout_seconds == 12.5
    assert settings.ttl_failed_seconds == 10 and settings.ttl_succeeded_seconds == 3600
    assert settings.cors_origins == ("https://a.example", "https://b.example:8443")
    assert settings.agent_image == "registry.local/agent:1" and settings.image_pull_policy == "Always"
    assert settings.namespace == "agents-2" and settings.no_proxy == ("a.example", "b.example")
    assert settings.ttl_seconds_after_finished == 60 and settings.kueue_queue == "q"
    assert settings.agent_resources == Resources("500m", "1Gi", "2", "16Gi")
    assert settings.sidecar_resources.cpu_request == "5m"


def test_blank_keeps_the_default_except_where_it_means_none():
    blank = {Settings.variable(name): " " for name in Settings.model_fields}
    settings = Settings.from_env(blank)
    assert (settings.egress_proxy, settings.no_proxy, settings.storage_class) == ("", (), "")
    for name in Settings.model_fields:
        if name not in ("egress_proxy", "no_proxy", "storage_class"):
            assert getattr(settings, name) == getattr(Settings(), name), name


def test_keyword_construction_does_not_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKYARD_RUNTIME", "kubernetes")
    monkeypatch.setenv("DOCKYARD_AGENT_IMAGE", "from-the-environment:1")
    settings = Settings(data_dir=tmp_path)
    assert settings.runtime == "local" and settings.agent_image == Settings.default("agent_image")
    assert settings.store == (tmp_path / "store").as_uri()
    assert Settings.from_env().runtime == "kubernetes"  # the process environment, when asked


def test_from_env_of_nothing_is_the_defaults():
    assert Settings.from_env({}) == Settings()


# --- errors name the variable ----------------------------------------------------
@pytest.mark.parametrize(
    "variables, message",
    [
        ({"DOCKYARD_RUNTIME": "docker"}, "DOCKYARD_RUNTIME='docker': Input should be 'local', 'kubernetes' or 'podman'"),
        ({"DOCKYARD_SNAPSHOT_STALE_SECONDS": "soon"}, "DOCKYARD_SNAPSHOT_STALE_SECONDS='soon': Input should be a valid number"),
        ({"DOCKYARD_STREAM_MAX_SECONDS": "inf"}, "DOCKYARD_STREAM_MAX_SECONDS='inf': Input should be a finite number"),
        ({"DOCKYARD_TTL_FAILED_SECONDS": "1.5"}, "DOCKYARD_TTL_FAILED_SECONDS='1.5': Input should be a valid integer"),
        ({"DOCKYARD_IMAGE_PULL_POLICY": "Sometimes"}, "DOCKYARD_IMAGE_PULL_POLICY='Sometimes'"),
        ({"DOCKYARD_JOB_TTL_SECONDS": "soon"}, "DOCKYARD_JOB_TTL_SECONDS='soon'"),
        ({"DOCKYARD_TERMINATION_GRACE_SECONDS": "-1"}, "DOCKYARD_TERMINATION_GRACE_SECONDS='-1': Input should be greater than or equal to 0"),
        ({"DOCKYARD_STREAM_CLIENT_BUFFER_BYTES": "10"}, "DOCKYARD_STREAM_CLIENT_BUFFER_BYTES='10'"),
        ({"DOCKYARD_STREAM_MAX_PER_IP": "many"}, "DOCKYARD_STREAM_MAX_PER_IP='many'"),
        ({"DOCKYARD_NATS_URL": "http://nats:4222"}, "DOCKYARD_NATS_URL='http://nats:4222': use a URL starting with nats://"),
        ({"DOCKYARD_STORE": "/var/store"}, "DOCKYARD_STORE='/var/store': use a URL starting with s3:// or file://"),
        ({"DOCKYARD_STORE": "file://relative/dir"}, "DOCKYARD_STORE='file://relative/dir': a file store needs an absolute path"),
        ({"DOCKYARD_BROKER_URL": "broker.local"}, "DOCKYARD_BROKER_URL='broker.local'"),
        ({"DOCKYARD_CORS_ORIGINS": "https://cockpit.example/"}, "DOCKYARD_CORS_ORIGINS='https://cockpit.example/': 'https://cockpit.example/' is not an origin"),
        ({"DOCKYARD_AGENT_CPU_LIMIT": "two"}, "DOCKYARD_AGENT_CPU_LIMIT='two': not a Kubernetes quantity"),
        ({"DOCKYARD_DEFAULT_MODEL": "gpt-4o"}, "DOCKYARD_DEFAULT_MODEL='gpt-4o': use provider:model"),
        ({"DOCKYARD_MODEL_PRICES": "gpt-4o=2.5"}, "DOCKYARD_MODEL_PRICES='gpt-4o=2.5': 'gpt-4o=2.5': use model=input/output[/cached]"),
        ({"DOCKYARD_DEFAULT_MAX_TOKENS": "-1"}, "DOCKYARD_DEFAULT_MAX_TOKENS='-1'"),
    ],
)
def test_a_wrong_variable_is_a_settings_error_naming_it(variables, message):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(variables)
    assert str(raised.value).startswith(message)
    assert raised.value.field == next(iter(variables)) and "pydantic" not in str(raised.value)


def test_errors_mask_url_passwords():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"DOCKYARD_NATS_URL": "http://user:hunter2@nats:4222"})
    assert "hunter2" not in str(raised.value) and "user:***@nats" in str(raised.value)


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"DOCKYARD_DEFAULT_DEADLINE_SECONDS": "7201", "DOCKYARD_MAX_DEADLINE_SECONDS": "7200"},
         "DOCKYARD_DEFAULT_DEADLINE_SECONDS=7201 is above DOCKYARD_MAX_DEADLINE_SECONDS=7200"),
        ({"DOCKYARD_DEFAULT_RETRIES": "11"}, "DOCKYARD_DEFAULT_RETRIES=11 is above DOCKYARD_MAX_RETRIES=10"),
        ({"DOCKYARD_DEFAULT_STORAGE": "5G"}, "DOCKYARD_DEFAULT_STORAGE='5G': limits.storage '5G' is not a size"),
        ({"DOCKYARD_DEFAULT_STORAGE": "8Gi", "DOCKYARD_MAX_STORAGE_GI": "4"}, "DOCKYARD_DEFAULT_STORAGE='8Gi': limits.storage must be at most 4Gi"),
    ],
)
def test_a_task_without_limits_gets_valid_ones(variables, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(variables)
    at_the_maximum = {**variables, "DOCKYARD_MAX_DEADLINE_SECONDS": "86400", "DOCKYARD_MAX_RETRIES": "11", "DOCKYARD_MAX_STORAGE_GI": "100"}
    at_the_maximum.pop("DOCKYARD_DEFAULT_STORAGE", None)
    Settings.from_env(at_the_maximum)


def test_keyword_construction_is_validated_too():
    with pytest.raises(SettingsError, match="DOCKYARD_RUNTIME='docker'"):
        Settings(runtime="docker")
    with pytest.raises(SettingsError, match="imagee: Extra inputs are not permitted"):
        Settings(imagee="x")


# --- a settings file over the environment (`dockyard manifests job --settings`) --------
def test_updated_from_a_mapping():
    settings = Settings().updated({"agent_image": "x:1", "agent_resources": {"cpu_limit": 3}, "no_proxy": ["a", "b"]})
    assert settings.agent_image == "x:1" and settings.agent_resources.cpu_limit == "3" and settings.no_proxy == ("a", "b")
    assert settings.agent_resources.memory_limit == Settings().agent_memory_limit  # the other parts stay
    assert Settings(agent_resources=Resources("1", "2Gi", "4", "8Gi")).agent_cpu_limit == "4"
    with pytest.raises(SettingsError, match="jobs.yaml: unknown setting 'imagee'; known: .*agent_image"):
        Settings().updated({"imagee": "x"}, source="jobs.yaml")
    with pytest.raises(SettingsError, match="jobs.yaml: image_pull_policy: DOCKYARD_IMAGE_PULL_POLICY='Sometimes'"):
        Settings().updated({"image_pull_policy": "Sometimes"}, source="jobs.yaml")
    with pytest.raises(SettingsError, match="agent_resources must be a mapping with keys among cpu_request"):
        Settings().updated({"agent_resources": {"gpu": 1}})


def test_describe_masks_url_passwords(tmp_path):
    settings = Settings(nats_url="nats://user:hunter2@nats:4222", broker_url="https://relay:s3cret@broker.example/ns/default", data_dir=tmp_path)
    text = settings.describe()
    assert "hunter2" not in text and "s3cret" not in text
    assert "nats_url = nats://user:***@nats:4222" in text and "broker_url = https://relay:***@broker.example/ns/default" in text
    assert len(text.splitlines()) == len(Settings.model_fields)  # one line per setting, all of them


# --- one definition per variable ----------------------------------------------------
def test_every_variable_is_defined_once_with_a_description():
    variables = Settings.variables()
    assert len(set(variables.values())) == len(variables)
    assert all(var.startswith("DOCKYARD_") and var == var.upper() for var in variables.values())
    for name, field in Settings.model_fields.items():
        assert field.description and field.json_schema_extra["used_by"], name


def test_the_cli_data_dir_default_is_the_models():
    from functions.cli.main import build_parser

    args = build_parser().parse_args(["dev"])
    assert Path(args.data_dir) == Settings.default("data_dir") == Path(".dockyard")


# --- the README's configuration table -------------------------------------------------
def test_the_readme_table_is_the_generated_one():
    readme = (REPO_ROOT / "README.md").read_text()
    assert TABLE_BEGIN in readme and TABLE_END in readme, (
        "README.md has no generated settings table: paste the output of `python -m functions.core.settings --markdown`"
    )
    start = readme.index(TABLE_BEGIN)
    current = readme[start : readme.index(TABLE_END, start) + len(TABLE_END)]
    assert current == markdown_table(), "README.md's settings table is stale: replace it with `python -m functions.core.settings --markdown`"


def test_the_table_has_a_row_per_variable():
    table = markdown_table().splitlines()
    assert table[0] == TABLE_BEGIN and table[-1] == TABLE_END
    rows = [line for line in table if line.startswith("| `DOCKYARD_")]
    assert [row.split("`")[1] for row in rows] == list(Settings.variables().values())
    assert "| `DOCKYARD_DATA_DIR` | `./.dockyard` |" in markdown_table()


def run_module(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "functions.core.settings", *args], check=False, env=env, capture_output=True, text=True, timeout=60)


def test_the_module_prints_the_table_and_checks_the_environment(agent_env):
    assert run_module("--markdown", env=agent_env).stdout == markdown_table() + "\n"

    ok = run_module(env={**agent_env, "DOCKYARD_NATS_URL": "nats://u:pw-123@bus:4222"})
    assert ok.returncode == 0 and "nats_url = nats://u:***@bus:4222" in ok.stdout and "pw-123" not in ok.stdout

    bad = run_module(env={**agent_env, "DOCKYARD_MAX_RETRIES": "lots"})
    assert bad.returncode == 3
    assert bad.stderr.startswith("settings: DOCKYARD_MAX_RETRIES='lots':") and "Traceback" not in bad.stderr


def test_file_repositories_are_never_allowed_with_the_kubernetes_runtime():
    assert Settings.from_env({"DOCKYARD_ALLOW_FILE_REPOS": "true"}).allow_file_repos is True  # local runtime: dev may
    assert Settings.from_env({}).allow_file_repos is False
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"DOCKYARD_ALLOW_FILE_REPOS": "true", "DOCKYARD_RUNTIME": "kubernetes"})
    assert raised.value.field == "DOCKYARD_ALLOW_FILE_REPOS"
