"""Attacks on the HTTP surface of `dockyard dev` (and so of the stream app it mounts), each asserting no harm.

Finding 1 (no authentication), the dev half of finding 2 (DNS rebinding, foreign
origins) and the forged X-Forwarded-For of finding 5, replayed against a real
`dockyard dev` over HTTP (tests/dev_process.py). "No harm" is checked where it
would show: no task directory, no task record, no open stream counted.
"""

from __future__ import annotations

import json
import uuid

import httpx
import nats
import pytest

from agent import contract
from functions.stream.auth import client_address, new_token, token_line
from tests.conftest import REPO_ROOT, eventually
from tests.dev_process import DevServer

pytestmark = pytest.mark.xdist_group("security-tokens")  # one dev stack per module, on one worker

CE = {"Content-Type": "application/cloudevents+json"}

# Every route a token guards, as (method, path); a POST carries a task submission.
GUARDED = [
    ("GET", "/api/tasks"),
    ("GET", "/api/tasks/t-victim"),
    ("GET", "/api/stream/t-victim"),
    ("POST", "/"),
    ("POST", "/api/session"),
]
PUBLIC = ["/", "/index.html", "/app.js", "/api.js", "/style.css", "/cockpit-config.json", "/healthz"]


def submission(task_id: str) -> bytes:
    event = {
        "specversion": "1.0", "type": contract.EVENT_TASK_SUBMITTED, "source": "tests/security", "id": str(uuid.uuid4()),
        "data": {"prompt": "spend the operator's model key", "model": "scripted:example", "task_id": task_id},
    }  # fmt: skip
    return json.dumps(event).encode()


def request(dev: DevServer, method: str, path: str, headers: dict | None = None, task_id: str = "t-attacker") -> httpx.Response:
    content = submission(task_id) if method == "POST" else None
    return httpx.request(method, f"{dev.url}{path}", content=content, headers={**CE, **(headers or {})}, timeout=10)


def launched(dev: DevServer) -> list[str]:
    """Task directories of the runtime: a task launched leaves one."""
    tasks = dev.data_dir / "tasks"
    return sorted(p.name for p in tasks.iterdir()) if tasks.exists() else []


def assert_refused(response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["field"] == field and body["error"], body


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    server = DevServer(tmp_path_factory.mktemp("security-dev"), env={"DOCKYARD_STREAM_MAX_PER_IP": "1"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def read_token(dev) -> str:
    """A read token, added to dev's tokens file while it runs (the file is read again when it changes)."""
    token = new_token()
    with open(dev.data_dir / "api-tokens", "a") as tokens:
        tokens.write(token_line("viewer", "read", token) + "\n")
    return token


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize("presented", ["none", "unknown", "cookie-unknown", "basic"])
def test_without_a_known_token_every_route_is_401_and_nothing_runs(dev, method, path, presented):
    headers = {
        "none": {},
        "unknown": {"Authorization": f"Bearer {new_token()}"},
        "cookie-unknown": {"Cookie": f"dockyard_token={new_token()}"},
        "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    }[presented]
    response = request(dev, method, path, headers)
    assert_refused(response, 401, "authorization")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "set-cookie" not in response.headers
    assert launched(dev) == []


def test_the_cockpit_page_its_assets_and_healthz_need_no_token(dev):
    for path in PUBLIC:
        assert httpx.get(f"{dev.url}{path}", timeout=10).status_code == 200, path


def test_a_hash_of_a_token_is_not_a_token(dev):
    """The tokens file holds sha256 hashes: presenting a line's hash gets nothing."""
    (line,) = [line for line in (dev.data_dir / "api-tokens").read_text().splitlines() if line.startswith("dev ")]
    response = request(dev, "GET", "/api/tasks", {"Authorization": f"Bearer {line.split()[2]}"})
    assert_refused(response, 401, "authorization")


def test_a_read_token_reads_but_cannot_submit_cancel_or_message(dev, read_token):
    auth = {"Authorization": f"Bearer {read_token}"}
    assert eventually(lambda: request(dev, "GET", "/api/tasks", auth).status_code == 200, "the read token to be known")
    for data in ({"task_id": "t-victim", "op": "cancel"}, {"task_id": "t-victim", "op": "message", "text": "rm -rf"}):
        event = {"specversion": "1.0", "type": contract.EVENT_TASK_COMMAND, "source": "tests/security", "id": "c1", "data": data}
        response = httpx.post(f"{dev.url}/", json=event, headers={**CE, **auth}, timeout=10)
        assert_refused(response, 403, "authorization")
    assert_refused(request(dev, "POST", "/", auth), 403, "authorization")
    assert launched(dev) == []
    assert request(dev, "GET", "/api/tasks", dev.headers).json() == []


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.nip.io:{port}", "127.0.0.1:1", "127.0.0.1"])
@pytest.mark.parametrize(("method", "path"), [("POST", "/"), ("GET", "/api/tasks"), ("GET", "/")])
def test_dns_rebinding_a_foreign_host_is_421_even_with_the_token(dev, host, method, path):
    """A page on attacker.example, rebound to 127.0.0.1, sends its own name as Host: refused before anything else."""
    headers = {**dev.headers, "Host": host.format(port=dev.port)}
    assert_refused(request(dev, method, path, headers, task_id="t-rebound"), 421, "host")
    assert launched(dev) == []


@pytest.mark.parametrize("origin", ["http://attacker.example", "null", "https://127.0.0.1:{port}", "http://127.0.0.1:1"])
def test_a_state_changing_request_from_a_foreign_origin_is_403(dev, origin):
    headers = {**dev.headers, "Origin": origin.format(port=dev.port)}
    assert_refused(request(dev, "POST", "/", headers, task_id="t-cross-site"), 403, "origin")
    assert_refused(request(dev, "POST", "/api/session", headers), 403, "origin")
    assert launched(dev) == []


def test_the_own_origin_and_localhost_still_work(dev):
    """The guard is not a wall against the operator: own Host and Origin, or none (the CLI), pass."""
    for host in (f"127.0.0.1:{dev.port}", f"localhost:{dev.port}"):
        assert request(dev, "GET", "/api/tasks", {**dev.headers, "Host": host}).status_code == 200
    response = request(dev, "POST", "/api/session", {**dev.headers, "Origin": dev.url})
    assert response.status_code == 204
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert request(dev, "GET", "/api/tasks", {"Cookie": cookie.split(";")[0]}).status_code == 200


async def test_a_forged_x_forwarded_for_does_not_move_the_per_address_cap(dev):
    """With a cap of 1 stream per address, a second stream claiming another address is still the same client: 429."""
    connection = await nats.connect(dev.nats_url, **dev.nats_connect_options)
    try:
        js = connection.jetstream()
        running = {"type": contract.EV_STATUS, "task_id": "t-held", "state": contract.STATE_STARTED}
        await js.publish(contract.subject_events("t-held"), json.dumps(running).encode())
    finally:
        await connection.close()
    url = f"{dev.url}/api/stream/t-held"
    async with httpx.AsyncClient(headers=dev.headers, timeout=httpx.Timeout(10, read=30)) as client:
        async with client.stream("GET", url) as held:
            assert held.status_code == 200
            for forged in ("10.1.2.3", "203.0.113.9, 10.1.2.3", "unknown"):
                response = await client.get(url, headers={"X-Forwarded-For": forged, "X-Real-IP": forged, "Forwarded": f"for={forged}"})
                assert_refused(response, 429, "client")


def test_x_forwarded_for_is_read_only_from_a_configured_proxy():
    trusted = ("10.0.0.5",)
    assert client_address("198.51.100.7", "10.1.2.3", ()) == "198.51.100.7"  # no proxies configured: the peer
    assert client_address("198.51.100.7", "10.1.2.3", trusted) == "198.51.100.7"  # the peer is no proxy: the peer
    # From the proxy: the rightmost entry it did not add itself; what the client wrote to the left is ignored.
    assert client_address("10.0.0.5", "6.6.6.6, 198.51.100.7", trusted) == "198.51.100.7"
    assert client_address("10.0.0.5", "6.6.6.6, 198.51.100.7, 10.0.0.5", trusted) == "198.51.100.7"
    assert client_address("10.0.0.5", None, trusted) == "10.0.0.5"
    ranges = ("127.0.0.1", "10.42.0.0/16")  # queue-proxy, and the gateway's pods
    assert client_address("127.0.0.1", "198.51.100.7, 10.42.3.4", ranges) == "198.51.100.7"
    assert client_address("10.43.0.1", "6.6.6.6", ranges) == "10.43.0.1"


def test_in_the_cluster_only_the_stream_is_exposed_and_it_needs_its_tokens_file():
    import yaml

    services = [
        d for path in (*(REPO_ROOT / "knative").glob("*.yaml"), *(REPO_ROOT / "eventing").glob("*.yaml")) if path.name != "kustomization.yaml"
        for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "Service" and d["apiVersion"].startswith("serving.knative.dev")
    ]  # fmt: skip
    public = {s["metadata"]["name"] for s in services if (s["metadata"].get("labels") or {}).get("networking.knative.dev/visibility") != "cluster-local"}
    assert public == {"stream"}
    (stream,) = [s for s in services if s["metadata"]["name"] == "stream"]
    pod = stream["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "FORWARDED_ALLOW_IPS" not in env  # uvicorn's proxy headers are off; DOCKYARD_TRUSTED_PROXIES decides
    tokens_file = env["DOCKYARD_API_TOKENS_FILE"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if tokens_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] and volume["secret"]["secretName"] == "dockyard-api-tokens" and not volume["secret"].get("optional")
