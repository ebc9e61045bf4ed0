"""The images scripts/build-images makes, run with real podman the way a Job runs them: as uid 1000 on a
read-only root without capabilities, with /workspace, /home/agent and /tmp the only writable places.

The images must exist (scripts/test builds them first); in CI a missing podman or image fails, elsewhere
the test skips with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import pytest
import yaml

from agent import contract
from functions.core.probes import heartbeat_probe_command
from functions.core.nats_leaf import NATS_LEAF_CONF_ENV, leaf_launch_command
from functions.core.settings import DEFAULT_IMAGE_PATH, Settings
from tests.conftest import REPO_ROOT

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-images"
IMAGE_NAME = re.compile(r"^(AGENT|FUNCTIONS)_IMAGE=(\S+)$", re.MULTILINE)
IMAGES = dict(IMAGE_NAME.findall(BUILD_SCRIPT.read_text()))
AGENT_IMAGE, FUNCTIONS_IMAGE = IMAGES["AGENT"], IMAGES["FUNCTIONS"]
# How a Job runs every container of the pod (functions/core/factory.py's securityContext and volumes).
RESTRICTED = [
    "--read-only", "--user", "1000:1000", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
    "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", f"{contract.HOME_DIR}:rw,U", "--tmpfs", f"{contract.WORKSPACE_MOUNT}:rw,U",
]  # fmt: skip  (U: owned by the container's user, as the Job's fsGroup makes its volumes writable)
# The agent container's PATH as the Job sets it.
JOB_PATH = f"{contract.PYTHONUSERBASE}/bin:{DEFAULT_IMAGE_PATH}"
TIMEOUT = 120  # seconds for one container run, generous for a loaded machine


def podman(*args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO_ROOT / "images" / "containers.conf"))}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run the image tests: scripts/test installs podman and runs scripts/build-images")
    pytest.skip(f"{reason} (scripts/build-images builds the images); CI runs these tests")


@pytest.fixture(scope="module")
def images() -> None:
    if shutil.which("podman") is None:
        _missing("podman is not installed")
    for image in (AGENT_IMAGE, FUNCTIONS_IMAGE):
        if podman("image", "exists", image, check=False).returncode != 0:
            _missing(f"{image} is not built")


def run(image: str, *command: str, options: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    """`command` in a fresh container of `image` (its own entrypoint when `command` is empty)."""
    entrypoint = ["--entrypoint", command[0]] if command else []
    return podman("run", "--rm", *RESTRICTED, *options, *entrypoint, image, *command[1:], check=check)


# --- static: what scripts/build-images relies on ------------------------------------------------


@pytest.mark.parametrize("name", ["agent.Dockerfile", "functions.Dockerfile"])
def test_the_dockerfiles_build_from_the_base_image_argument(name):
    text = (REPO_ROOT / "images" / name).read_text()
    instructions = [line.split()[:2] for line in text.splitlines() if line and not line.startswith(("#", " "))]
    froms = [args for args in instructions if args[0] == "FROM"]
    assert froms == [["FROM", "${BASE_IMAGE}"]], f"{name}: one stage, FROM the BASE_IMAGE argument"
    assert instructions.index(["ARG", "BASE_IMAGE=python:3.11-slim"]) < instructions.index(froms[0])
    assert '--build-arg "BASE_IMAGE=$base"' in BUILD_SCRIPT.read_text()


def test_the_script_tags_the_images_the_settings_and_manifests_run():
    assert Settings.model_fields["agent_image"].default == AGENT_IMAGE
    for manifest in ("functions.yaml", "stream.yaml"):
        docs = yaml.safe_load_all((REPO_ROOT / "knative" / manifest).read_text())
        named = {c["image"] for d in docs if d for c in d["spec"]["template"]["spec"]["containers"]}
        assert named == {FUNCTIONS_IMAGE}, manifest


# --- the agent image ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["python", "-m", "agent", "--help"], "usage: python -m agent"),
        (["python", "-m", "gateway", "--help"], "usage: python -m gateway"),
        (["git", "--version"], "git version"),
        (["nats-server", "--version"], "nats-server: v"),
        (["sh", "-c", "id -u; id -g; echo $HOME"], f"1000\n1000\n{contract.HOME_DIR}"),
    ],
    ids=["agent", "gateway", "git", "nats-server", "user"],
)
def test_the_agent_image_runs_the_jobs_commands_restricted(images, command, expected):
    result = run(AGENT_IMAGE, "env", f"PATH={JOB_PATH}", *command)
    assert expected in result.stdout


def test_the_agent_image_runs_as_uid_1000_by_default(images):
    assert podman("run", "--rm", "--entrypoint", "id", AGENT_IMAGE, "-u").stdout.strip() == "1000"


def test_the_agent_commits_with_git_in_the_workspace(images):
    script = "git init -q . && git -c user.name=a -c user.email=a@example.com commit -q --allow-empty -m x && git log --format=%s"
    assert run(AGENT_IMAGE, "sh", "-c", script).stdout.strip() == "x"


def test_the_agents_commands_find_the_venvs_python_and_pip_on_the_system_path(images):
    """agent/execute.py runs commands with the system PATH: `python` there is the venv's, user site on."""
    code = "import site, sys, langgraph; print(sys.prefix, site.ENABLE_USER_SITE)"
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    out = run(AGENT_IMAGE, "env", f"PATH={system_path}", "sh", "-c", f"python -c {code!r} && pip --version").stdout
    assert out.startswith("/opt/venv True\n") and "/opt/venv/" in out


def test_the_agent_image_has_every_dependency_of_the_agent_and_the_gateway(images):
    """The image leaves out the functions' own dependencies (agent.Dockerfile): every module of agent/ and
    gateway/ still imports, and what is installed is consistent (`pip check`)."""
    code = (
        "import importlib, pkgutil, agent, gateway; "
        "names = [m.name for p in (agent, gateway) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.') "
        "if not m.name.endswith('__main__')]; "
        "[importlib.import_module(n) for n in names]; print(len(names))"
    )
    assert int(run(AGENT_IMAGE, "python", "-c", code).stdout) > 20
    assert "No broken requirements" in run(AGENT_IMAGE, "python", "-m", "pip", "check").stdout
    assert run(AGENT_IMAGE, "python", "-c", "import kubernetes", check=False).returncode != 0  # ~130 MB it does not need


@pytest.mark.parametrize(("age_seconds", "code"), [(None, 0), (0, 0), (3600, 1)], ids=["no-file", "fresh", "stale"])
def test_the_heartbeat_probe(images, age_seconds, code):
    probe = heartbeat_probe_command(stale_seconds=60)
    heartbeat = f"{contract.WORKSPACE_MOUNT}/{contract.HEARTBEAT_FILE}"
    setup = "true" if age_seconds is None else f"mkdir -p {os.path.dirname(heartbeat)} && touch -d @$(($(date +%s) - {age_seconds})) {heartbeat}"
    script = f'{setup} && exec "$@"'
    result = run(AGENT_IMAGE, "env", f"PATH={JOB_PATH}", "sh", "-c", script, "sh", *probe, check=False)
    assert result.returncode == code, result.stderr


def test_the_nats_leaf_launch_command_becomes_nats_server(images):
    name = f"dockyard-test-leaf-{uuid.uuid4().hex[:8]}"
    conf = 'listen: "127.0.0.1:4222"\nhttp: "127.0.0.1:8222"\n'
    podman("run", "-d", "--rm", "--name", name, *RESTRICTED, "--env", f"{NATS_LEAF_CONF_ENV}={conf}", "--env", f"PATH={JOB_PATH}",
           "--entrypoint", leaf_launch_command()[0], AGENT_IMAGE, *leaf_launch_command()[1:])  # fmt: skip
    try:
        check = "import json, urllib.request as u; print(json.load(u.urlopen('http://127.0.0.1:8222/varz', timeout=2))['server_name'])"
        deadline = time.monotonic() + TIMEOUT
        while (answer := podman("exec", name, "python", "-I", "-S", "-c", check, check=False)).returncode != 0:
            assert time.monotonic() < deadline, f"the leaf's nats-server never answered: {answer.stderr}"
            time.sleep(0.2)
        assert answer.stdout.strip()
        # python exec'd nats-server: it is PID 1, so the kubelet's signals reach it.
        assert podman("exec", name, "cat", "/proc/1/comm").stdout.strip() == "nats-server"
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def test_the_agent_image_keeps_no_build_tooling_and_compiled_its_bytecode(images):
    leftovers = "find / -xdev \\( -name uv -o -name 'uv-*.dist-info' -o -path /root/.cache -o -path '/var/cache/dockyard-build/*' -o -path /src \\) -print"
    assert podman("run", "--rm", "--user", "0", "--entrypoint", "sh", AGENT_IMAGE, "-c", leftovers).stdout == ""
    code = "import importlib.util as u, agent.run, langgraph.graph as g; print(all(__import__('os').path.exists(u.cache_from_source(m.__file__)) for m in (agent.run, g)))"
    assert run(AGENT_IMAGE, "python", "-c", code).stdout.strip() == "True"


def test_the_images_ca_bundle_is_debians_not_the_build_machines(images):
    """The build mounts the machine's bundle for pip/uv; what the image has is its ca-certificates
    package's: exactly the certificates /etc/ca-certificates.conf enables, so none the machine added
    (this sandbox's bundle has its own CA; a baked bundle would carry it)."""
    code = (
        "import re; pem = lambda t: set(re.findall(r'-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----', t)); "
        "names = [l.strip() for l in open('/etc/ca-certificates.conf') if l.strip() and l[0] not in '#!']; "
        "enabled = set().union(*(pem(open('/usr/share/ca-certificates/' + n).read()) for n in names)); "
        "bundle = pem(open('/etc/ssl/certs/ca-certificates.crt').read()); "
        "print(len(bundle), bundle == enabled)"
    )
    for image in (AGENT_IMAGE, FUNCTIONS_IMAGE):
        count, same = run(image, "python", "-c", code).stdout.split()
        assert int(count) > 50 and same == "True", image


# --- the functions image --------------------------------------------------------------------------


def test_the_functions_image_starts_functions_framework_as_uid_1000(images):
    assert "Usage: functions-framework" in run(FUNCTIONS_IMAGE, "functions-framework", "--help").stdout
    assert podman("run", "--rm", "--entrypoint", "id", FUNCTIONS_IMAGE, "-u").stdout.strip() == "1000"


def test_the_functions_image_serves_a_function_restricted(images):
    """As a Knative Service runs it: FUNCTION_TARGET and PORT set, read-only root, /tmp writable. Input that is
    not a CloudEvent gets its 400 naming the field, so the function itself answered."""
    name = f"dockyard-test-functions-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--rm", "--name", name, *RESTRICTED, "--env", "FUNCTION_TARGET=task_submitted", "--env", "PORT=8080", FUNCTIONS_IMAGE)
    try:
        post = (
            "import urllib.request as u, urllib.error as e\n"
            "try: u.urlopen(u.Request('http://127.0.0.1:8080/', data=b'{}', headers={'content-type': 'application/json'}), timeout=5)\n"
            "except e.HTTPError as x: print(x.code, x.read().decode())\n"
        )
        deadline = time.monotonic() + TIMEOUT
        while (answer := podman("exec", name, "python", "-c", post, check=False)).returncode != 0 or not answer.stdout:
            assert time.monotonic() < deadline, f"the function never answered: {answer.stderr}\n{podman('logs', name, check=False).stderr}"
            time.sleep(0.2)
        code, body = answer.stdout.split(" ", 1)
        assert code == "400" and '"field":"ce-specversion"' in body.replace(" ", "")
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
