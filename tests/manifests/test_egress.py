"""The egress proxy: its committed config is the rendered one, and a real Squid
running that config lets allowlisted names through and refuses everything else.

How the real Squid is set up (all on loopback; nothing leaves this machine):
- The production rules are rendered by functions/egress.py with four test
  changes, all keyword arguments of `render_squid_conf`: Squid listens on a free
  127.0.0.1 port; clients may come from 127.0.0.0/8; the ports 80/443 become
  80/P, where P is the port of a local HTTP server (the "443" of the test); and
  the loopback deny range 127.0.0.0/8 narrows to 127.0.0.1/32, because the
  allowed test server must itself sit on a loopback address: it listens on
  127.0.0.5, which stays allowed, while 127.0.0.1 stays refused.
- `hosts_file` maps the test names: allowed.test -> 127.0.0.5, and allowlisted
  names to refused addresses (127.0.0.1, 10.0.0.1, 169.254.169.254, 10.43.0.1).
  `dns_nameservers 127.0.0.1` keeps any other lookup on this machine.
- `tcp_outgoing_address 127.0.0.1` is a guard: Linux will not route from a
  loopback source to any other address, so even a broken rule could only make
  Squid fail to connect, never send a packet to 10.0.0.1 or 169.254.169.254.
  A refusal is asserted as Squid's own 403 with no upstream contacted
  (TCP_DENIED ... HIER_NONE in its access log).
- A canary server on 127.0.0.1:P proves that refused loopback requests never
  reach it.

Squid runs in the foreground (`squid -N`) with pid, logs and spool in a temp
dir. As root it drops to the `proxy` (or `nobody`) user, which owns that dir.
The test is skipped only when squid is missing and CI is unset; in CI it runs
(scripts/install-test-packages installs squid).
"""

from __future__ import annotations

import http.server
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from functions.core import egress
from tests.conftest import eventually, free_port, port_open
from tests.manifests import KNATIVE_DIR, one, documents, pod_template

# One Squid per module and worker: under xdist (--dist loadgroup) the module stays on one worker.
pytestmark = pytest.mark.xdist_group("squid")

MARKER = b"dockyard-egress-test-server"
SERVER_ADDRESS = "127.0.0.5"
CANARY_ADDRESS = "127.0.0.1"
TEST_ALLOWLIST = [".allowed.test", "kubernetes.default"]
HOSTS = {
    "allowed.test": SERVER_ADDRESS,
    "www.allowed.test": SERVER_ADDRESS,
    "blocked.test": SERVER_ADDRESS,  # an allowed address, but not an allowed name
    "kubernetes.default": SERVER_ADDRESS,  # allowlisted here, but the API server by name
    "loopback.allowed.test": CANARY_ADDRESS,
    "private.allowed.test": "10.0.0.1",
    "metadata.allowed.test": "169.254.169.254",
    "apiserver.allowed.test": "10.43.0.1",
}


# --- the committed files ------------------------------------------------------------------


def test_the_committed_configmap_is_the_rendered_config():
    conf = egress.render_squid_conf(egress.read_allowlist())
    committed = egress.CONFIGMAP_FILE.read_text()
    assert committed == egress.render_configmap(conf), "stale: run `.venv/bin/python -m functions.core.egress`"
    assert yaml.safe_load(committed)["data"][egress.CONFIG_KEY] == conf


def test_the_deployment_restarts_on_a_new_config():
    conf = egress.render_squid_conf(egress.read_allowlist())
    deployment = one(documents(KNATIVE_DIR), "Deployment", "apps", "egress-proxy")
    pod = pod_template(deployment.body)
    assert pod["metadata"]["annotations"][egress.HASH_ANNOTATION] == egress.config_hash(conf)
    [container] = pod["spec"]["containers"]
    [config] = [v for v in pod["spec"]["volumes"] if v.get("configMap")]
    assert config["configMap"]["name"] == egress.CONFIGMAP_NAME
    mount = next(m for m in container["volumeMounts"] if m["name"] == config["name"])
    assert container["args"][-1] == f"{mount['mountPath']}/{egress.CONFIG_KEY}"


def test_deny_rules_come_before_the_allow_and_connect_only_to_443():
    lines = [line for line in egress.render_squid_conf(["pypi.org"]).splitlines() if line.startswith("http_access")]
    allow = lines.index("http_access allow allowed_domains")
    for rule in ("deny api_server", "deny api_server_addresses", "deny internal_addresses", "deny !allowed_domains"):
        assert lines.index(f"http_access {rule}") < allow, rule
    assert lines[-1] == "http_access deny all"
    conf = egress.render_squid_conf(["pypi.org"])
    assert "acl ssl_ports port 443\n" in conf and "http_access deny CONNECT !ssl_ports" in conf
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10"):
        assert f"acl internal_addresses dst {cidr}\n" in conf


@pytest.mark.parametrize(
    "text, problem",
    [
        ("10.0.0.1\n", "is an address"),
        ("exa mple.com\n", "is not a domain"),
        ("localhost\n", "is not a domain"),
        (".github.com\napi.github.com\n", "overlaps"),
        ("# nothing\n", "no domains"),
    ],
)
def test_the_allowlist_refuses_what_squid_would_misread(text, problem):
    with pytest.raises(egress.AllowlistError, match=problem):
        egress.parse_allowlist(text)


# --- a real Squid ---------------------------------------------------------------------------


def _squid_binary() -> str | None:
    return shutil.which("squid") or next((p for p in ("/usr/sbin/squid", "/usr/local/sbin/squid") if os.path.exists(p)), None)


def _require_squid() -> str:
    binary = _squid_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("squid is not installed, and CI must run the egress test: run scripts/install-test-packages")
        pytest.skip("squid is not installed (scripts/install-test-packages installs it); CI runs this test")
    return binary


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = MARKER + b" " + self.server.server_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address):
        self.connections = 0
        super().__init__(address, _Handler)

    def verify_request(self, request, client_address):
        self.connections += 1
        return True


def _servers() -> tuple[_Server, _Server]:
    """The test server on 127.0.0.5:P and a canary on 127.0.0.1:P (the same P)."""
    for _ in range(20):
        server = _Server((SERVER_ADDRESS, 0))
        try:
            canary = _Server((CANARY_ADDRESS, server.server_address[1]))
        except OSError:
            server.server_close()
            continue
        return server, canary
    raise RuntimeError("no port free on both 127.0.0.5 and 127.0.0.1")


def _listening(port: int, process: subprocess.Popen, log: Path) -> bool:
    if process.poll() is not None:
        pytest.fail(f"squid exited with {process.returncode}:\n{log.read_text() if log.exists() else ''}")
    return port_open(port, CANARY_ADDRESS)


class Proxy:
    def __init__(self, port: int, server_port: int, access_log: Path, canary: _Server):
        self.port = port
        self.server_port = server_port
        self.access_log = access_log
        self.canary = canary

    def get(self, url: str) -> tuple[int, bytes]:
        """GET `url` through the proxy: (status, body)."""
        import http.client

        connection = http.client.HTTPConnection(CANARY_ADDRESS, self.port, timeout=10)
        try:
            connection.request("GET", url)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def connect(self, target: str) -> tuple[int, bytes]:
        """CONNECT to `target` (host:port); on 200, a GET through the tunnel. (status, body)."""
        with socket.create_connection((CANARY_ADDRESS, self.port), timeout=10) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = _read_head(sock)
            status = int(head.split()[1])
            if status != 200:
                return status, head
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return status, b"".join(chunks)

    def log_line(self, needle: str) -> str:
        """The access log line for the request that mentions `needle` (Squid writes it when the request ends)."""

        def line() -> str | None:
            lines = [line for line in self.access_log.read_text().splitlines() if needle in line]
            return lines[-1] if lines else None

        return eventually(line, f"an access log line for {needle}", detail=self.access_log.read_text)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def proxy():
    binary = _require_squid()
    server, canary = _servers()
    for s in (server, canary):
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()  # shutdown() waits one poll
    server_port = server.server_address[1]
    workdir = Path(tempfile.mkdtemp(prefix="dockyard-squid-"))
    port = free_port(CANARY_ADDRESS)
    access_log = workdir / "access.log"
    cache_log = workdir / "cache.log"
    conf = egress.render_squid_conf(
        TEST_ALLOWLIST,
        port=f"{CANARY_ADDRESS}:{port}",
        clients=("127.0.0.0/8",),
        deny_ranges=tuple(r for r in egress.DENY_RANGES if r != "127.0.0.0/8") + ("127.0.0.1/32",),
        safe_ports=(80, server_port),
        ssl_ports=(server_port,),
        pid_file=str(workdir / "squid.pid"),
        spool_dir=str(workdir),
        access_log=f"stdio:{access_log}",
        cache_log=str(cache_log),
    )
    conf += "\n".join(
        [
            "# test only",
            f"hosts_file {workdir / 'hosts'}",
            "dns_nameservers 127.0.0.1",
            "tcp_outgoing_address 127.0.0.1",
            "shutdown_lifetime 0 seconds",
            "",
        ]
    )
    if os.geteuid() == 0:  # Squid refuses to stay root: it switches to this user
        user = next((u for u in ("proxy", "nobody") if _user_exists(u)), None)
        assert user, "no unprivileged user for squid to switch to"
        conf += f"cache_effective_user {user}\n"
    (workdir / "hosts").write_text("".join(f"{address} {name}\n" for name, address in HOSTS.items()))
    (workdir / "squid.conf").write_text(conf)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    output = (workdir / "squid.out").open("wb")
    process = subprocess.Popen([binary, "-N", "-f", str(workdir / "squid.conf")], stdout=output, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        eventually(lambda: _listening(port, process, cache_log), f"squid listening on {port}", detail=lambda: cache_log.read_text() if cache_log.exists() else "")
        yield Proxy(port, server_port, access_log, canary)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()
        server.shutdown()
        canary.shutdown()
        server.server_close()
        canary.server_close()
        shutil.rmtree(workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _assert_refused_unforwarded(proxy: Proxy, status: int, needle: str) -> None:
    assert status == 403, f"{needle}: expected Squid's 403, got {status}"
    line = proxy.log_line(needle)
    assert "TCP_DENIED/403" in line and "HIER_NONE" in line, f"{needle} was not refused before forwarding: {line}"


def test_squid_accepts_the_production_config(tmp_path):
    binary = _require_squid()
    conf = yaml.safe_load(egress.CONFIGMAP_FILE.read_text())["data"][egress.CONFIG_KEY]
    (tmp_path / "squid.conf").write_text(conf)
    result = subprocess.run([binary, "-k", "parse", "-f", str(tmp_path / "squid.conf")], capture_output=True, text=True, timeout=30)
    complaints = [line for line in result.stderr.splitlines() if any(w in line for w in ("ERROR", "WARNING", "FATAL"))]
    assert result.returncode == 0 and not complaints, result.stderr


@pytest.mark.parametrize("name", ["allowed.test", "www.allowed.test"])
def test_an_allowlisted_name_reaches_its_server(proxy, name):
    status, body = proxy.get(f"http://{name}:{proxy.server_port}/")
    assert status == 200 and body.startswith(MARKER), body
    assert SERVER_ADDRESS.encode() in body


def test_connect_to_an_allowlisted_name_on_the_ssl_port_tunnels(proxy):
    status, body = proxy.connect(f"allowed.test:{proxy.server_port}")
    assert status == 200 and MARKER in body, body


@pytest.mark.parametrize(
    "url",
    [
        "http://blocked.test:{port}/",  # not on the list (though its address would be allowed)
        "http://169.254.169.254:{port}/latest/meta-data/",
        "http://127.0.0.1:{port}/",
        "http://10.0.0.1:{port}/",
        "http://[::1]:{port}/",
    ],
)
def test_names_off_the_list_and_addresses_are_refused(proxy, url):
    url = url.format(port=proxy.server_port)
    status, _ = proxy.get(url)
    _assert_refused_unforwarded(proxy, status, url)


@pytest.mark.parametrize(
    "name",
    [
        "loopback.allowed.test",  # -> 127.0.0.1
        "private.allowed.test",  # -> 10.0.0.1
        "metadata.allowed.test",  # -> 169.254.169.254
        "apiserver.allowed.test",  # -> 10.43.0.1, the k3s API server's ClusterIP
        "kubernetes.default",  # the API server by name, though allowlisted and pointing at the test server
    ],
)
def test_allowlisted_names_are_refused_when_they_point_inside(proxy, name):
    url = f"http://{name}:{proxy.server_port}/"
    status, _ = proxy.get(url)
    _assert_refused_unforwarded(proxy, status, url)
    status, _ = proxy.connect(f"{name}:{proxy.server_port}")
    assert status == 403


def test_refused_loopback_requests_never_reach_the_canary(proxy):
    before = proxy.canary.connections
    for url in (f"http://127.0.0.1:{proxy.server_port}/", f"http://loopback.allowed.test:{proxy.server_port}/"):
        assert proxy.get(url)[0] == 403
    assert proxy.connect(f"loopback.allowed.test:{proxy.server_port}")[0] == 403
    assert proxy.canary.connections == before == 0


def test_connect_only_to_the_ssl_port_and_http_only_to_safe_ports(proxy):
    status, _ = proxy.connect("allowed.test:80")  # a safe port, but not the SSL port
    assert status == 403
    url = f"http://allowed.test:{proxy.server_port + 1}/"
    status, _ = proxy.get(url)
    _assert_refused_unforwarded(proxy, status, url)
